"""The PyTorch peer of benchmarks/benchmark.py: diffusers' `UNet2DModel` built to the same widths,
blocks, attention resolutions, normalisation and timestep embedding as a jaxdiff config, with
the same training step (noising, ε-MSE, Adam, gradient clipping at the config's norm, EMA) and
a DDIM sampling loop with diffusers' own scheduler. Needs `pip install -e ".[bench]"`.

Fairness: the peer runs in float32 (bfloat16 with autocast where the jaxdiff side does), on the
GPU where torch sees one, else on all CPU cores (`torch.set_num_threads(os.cpu_count())`), in
PyTorch's default NCHW layout, eager (`torch.compile` needs a C++ toolchain per shape and is left
to `--peer_compile`).
"""

import argparse
import json
import os
import resource

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

from benchmarks import benchmark
from jaxdiff.models.unet import num_groups


def unet2d_from_config(config) -> UNet2DModel:
  """diffusers' UNet2DModel with the DDPM layout of `config.model` (as google/ddpm-cifar10-32)."""
  model_config, size = config.model, config.data.image_size
  widths = [model_config.ch * mult for mult in model_config.ch_mult]
  attention = [size // 2**level in model_config.attn_resolutions for level in range(len(widths))]
  return UNet2DModel(
      sample_size=size, in_channels=config.data.num_channels,
      out_channels=model_config.out_channels, layers_per_block=model_config.num_res_blocks,
      block_out_channels=widths,
      down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
      up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
      attention_head_dim=widths[0] // model_config.num_heads if model_config.num_heads > 1
      else None,
      norm_num_groups=num_groups(model_config.ch), norm_eps=1e-6, dropout=model_config.dropout,
      act_fn="silu", time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
      downsample_padding=0,
      num_class_embeds=model_config.num_classes + 1 if model_config.num_classes else None)


class PeerBench:
  """The peer's train step, forward pass and DDIM loop, each a blocking call."""

  name = f"diffusers UNet2DModel (torch {torch.__version__})"

  def __init__(self, config, batch_size: int, dtype: str = "float32"):
    self.threads = os.cpu_count()
    torch.set_num_threads(self.threads)
    torch.manual_seed(0)
    self.config, self.batch_size = config, batch_size
    self.autocast = dtype == "bfloat16"
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.model = unet2d_from_config(config).to(self.device)
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.ema = [p.detach().clone() for p in self.model.parameters()]
    train = config.train
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.learning_rate,
                                      betas=(train.adam_b1, train.adam_b2), eps=train.adam_eps)
    betas = np.linspace(config.diffusion.schedule_kwargs.beta_start,
                        config.diffusion.schedule_kwargs.beta_end,
                        config.diffusion.num_timesteps)
    self.alpha_bars = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32,
                                   device=self.device)
    size, channels = config.data.image_size, config.data.num_channels
    self.image_shape = (channels, size, size)
    self.batch = torch.rand(batch_size, *self.image_shape, device=self.device) * 2 - 1

  def _context(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

  def train_step(self):
    """x_t = √ᾱ x0 + √(1−ᾱ) ε, loss = ‖ε − ε_θ(x_t, t)‖², Adam, clip, EMA."""
    self.model.train()
    x0 = self.batch
    t = torch.randint(0, len(self.alpha_bars), (len(x0),), device=self.device)
    noise = torch.randn_like(x0)
    alpha_bar = self.alpha_bars[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    with self._context():
      loss = torch.nn.functional.mse_loss(self.model(x_t, t).sample.float(), noise)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
    self.optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()],
                           1 - self.config.train.ema_decay)
    loss.item()

  def forward_fn(self, num_samples: int):
    """A blocking call of the forward pass on `num_samples` images at t = 500."""
    x = torch.randn(num_samples, *self.image_shape, device=self.device)
    t = torch.full((num_samples,), 500, device=self.device)
    self.model.eval()

    def forward():
      with torch.no_grad(), self._context():
        self.model(x, t).sample.float().sum().item()
    return forward

  def ddim_fn(self, num_steps: int, num_samples: int):
    """A blocking call of `num_steps` DDIM steps (η = 0) with diffusers' DDIMScheduler."""
    kwargs = self.config.diffusion.schedule_kwargs
    scheduler = DDIMScheduler(num_train_timesteps=self.config.diffusion.num_timesteps,
                              beta_start=kwargs.beta_start, beta_end=kwargs.beta_end,
                              beta_schedule="linear", clip_sample=True)
    scheduler.set_timesteps(num_steps)
    noise = torch.randn(num_samples, *self.image_shape, device=self.device)
    self.model.eval()

    def sample():
      x = noise
      with torch.no_grad(), self._context():
        for t in scheduler.timesteps:
          eps = self.model(x, t).sample.float()
          x = scheduler.step(eps, t, x).prev_sample
      x.sum().item()
    return sample


def main():
  """Times the peer for benchmarks/benchmark.py and prints its numbers as one JSON line."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch_size", type=int, required=True)
  parser.add_argument("--num_samples", type=int, required=True)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--ddim_steps", default="", help="Comma-separated DDIM step counts.")
  args = parser.parse_args()
  peer = PeerBench(benchmark.load_config(args.config, args.dtype), args.batch_size, args.dtype)
  result = {"name": peer.name, "params": peer.num_params, "threads": peer.threads}
  for name, fn, images in (("train_step", peer.train_step, args.batch_size),
                           ("forward", peer.forward_fn(args.num_samples), args.num_samples)):
    seconds = benchmark.median_seconds(fn, args.repeats)
    result[f"{name}_seconds"], result[f"{name}_images_per_sec"] = seconds, images / seconds
  result["samplers"] = {}
  for num_steps in [int(steps) for steps in args.ddim_steps.split(",") if steps]:
    seconds = benchmark.median_seconds(peer.ddim_fn(num_steps, args.num_samples), args.repeats)
    result["samplers"][f"ddim:{num_steps}"] = {"images_per_sec": args.num_samples / seconds,
                                               "seconds": seconds}
  result["peak_host_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(result))


if __name__ == "__main__":
  main()
