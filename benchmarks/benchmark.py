"""Speed of jaxdiff's train step and samplers, side by side with the PyTorch peer, on whatever
devices are present.

  python -m benchmarks.benchmark --config=configs/cifar10.py --batch_size=16 --peer
  python -m benchmarks.benchmark --config=configs/cifar10.py --batch_size=128 --dtype=bfloat16

Each number is the median of `--repeats` timed calls after a warm-up call, synchronised with
`block_until_ready` (and, for the peer, by reading its outputs back). The peer runs after
jaxdiff in a process of its own (`benchmarks/peer_diffusers.py`), the same way; run the
benchmark on an otherwise idle machine. Reported:
  * train: images/s and steps/s of the real train step (`train_step.make_train_step`: loss,
    Adam, gradient clipping, EMA, data parallel over every device), its compile time, its
    FLOPs per image from XLA's cost analysis, and the model FLOPs utilisation (MFU): achieved
    FLOP/s over the devices' peak (one device's, measured in the same run with a large matmul
    of the dtype, times the device count);
  * forward: images/s of the U-Net's forward pass at the sampling batch (one sampler step);
  * samplers: images/s of each whole sampler run (`--samplers=ddim:10,...`) and its compile
    time, with the compile time of the same sampler at 10× the steps (a scan: about equal);
  * peak host memory (ru_maxrss) and device memory where the backend reports it.
Prints a table and writes JSON with the device, versions, config and load average.
"""

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parallel, samplers, schedules, train_step
from jaxdiff.models import count_params


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `fn()` (which must block until its work is done), after one warm-up."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak_flops(dtype: str, size: int, repeats: int) -> float:
  """FLOP/s of a [size, size] @ [size, size] matmul: 2·size³ per call."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  return 2 * size**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def load_config(path: str, dtype: str):
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.dtype = dtype
  return config


class JaxdiffBench:
  """jaxdiff's compiled train step, forward pass and samplers for one config."""

  def __init__(self, config, batch_size: int, mesh):
    self.config, self.batch_size, self.mesh = config, batch_size, mesh
    config.train.batch_size = batch_size
    self.model = train_step.create_model(config)
    self.schedule = schedules.from_config(config.diffusion)
    size, channels = config.data.image_size, config.data.num_channels
    self.image_shape = (size, size, channels)
    self.state = jax.jit(lambda key: train_step.init_state(config, self.model, key),
                         out_shardings=parallel.replicated(mesh))(jax.random.key(0))
    self.num_params = count_params(self.state.params)
    rng = np.random.default_rng(0)
    self.batch = parallel.global_batch(
        {"image": rng.uniform(-1, 1, (batch_size, *self.image_shape)).astype(np.float32),
         "label": np.zeros(batch_size, np.int32)}, mesh)
    step_fn = train_step.make_train_step(self.model, self.schedule, config, mesh)
    start = time.perf_counter()
    self.compiled_step = step_fn.lower(self.state, self.batch).compile()
    self.train_compile_seconds = time.perf_counter() - start
    # XLA's cost analysis counts the partitioned program, i.e. one device's share.
    self.train_flops_per_image = (self.compiled_step.cost_analysis()["flops"]
                                  * mesh.devices.size / batch_size)

  def train_step(self):
    self.state, metrics = self.compiled_step(self.state, self.batch)
    jax.block_until_ready(metrics)

  def forward_fn(self, num_samples: int):
    """A blocking call of the network's forward pass on `num_samples` images."""
    x = parallel.global_batch(
        np.random.default_rng(1).standard_normal((num_samples, *self.image_shape),
                                                 dtype=np.float32), self.mesh)
    t = parallel.global_batch(np.full((num_samples,), 500, np.int32), self.mesh)
    apply = jax.jit(self.model.apply)
    variables = {"params": self.state.ema_params}
    apply(variables, x, t).block_until_ready()
    return lambda: apply(variables, x, t).block_until_ready()

  def sampler_fn(self, name: str, num_steps: int, num_samples: int):
    """(blocking call of one whole sampler run, its compile seconds)."""
    sharding = parallel.batch_sharding(self.mesh)

    def run(variables, key):
      images = samplers.sample(name, self.model.apply, variables, self.schedule, key,
                               (num_samples, *self.image_shape), num_steps=num_steps,
                               prediction=self.config.diffusion.prediction)
      return jax.lax.with_sharding_constraint(images, sharding)

    variables, key = {"params": self.state.ema_params}, jax.random.key(2)
    start = time.perf_counter()
    compiled = jax.jit(run).lower(variables, key).compile()
    compile_seconds = time.perf_counter() - start
    compiled(variables, key).block_until_ready()
    return lambda: compiled(variables, key).block_until_ready(), compile_seconds


def device_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def peak_host_memory_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_samplers(spec: str) -> list[tuple[str, int]]:
  pairs = [item.split(":") for item in spec.split(",") if item]
  return [(name, int(steps)) for name, steps in pairs]


def run(args) -> dict:
  config = load_config(args.config, args.dtype)
  mesh = parallel.make_mesh()
  devices = jax.devices()
  result = {
      "device": f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform})",
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "python": platform.python_version()},
      "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
      "config": args.config, "dtype": args.dtype, "batch_size": args.batch_size,
      "num_samples": args.num_samples, "repeats": args.repeats,
      "load_average_before": os.getloadavg(),
  }
  result["matmul_peak_flops"] = matmul_peak_flops(args.dtype, args.matmul_size, args.repeats)
  bench = JaxdiffBench(config, args.batch_size, mesh)
  result["jaxdiff"] = {"params": bench.num_params,
                       "train_compile_seconds": bench.train_compile_seconds,
                       "train_flops_per_image": bench.train_flops_per_image}
  result["jaxdiff"]["train_step_seconds"] = median_seconds(bench.train_step, args.repeats)
  result["jaxdiff"]["forward_seconds"] = median_seconds(bench.forward_fn(args.num_samples),
                                                        args.repeats)
  for name, images in (("train_step", args.batch_size), ("forward", args.num_samples)):
    result["jaxdiff"][f"{name}_images_per_sec"] = images / result["jaxdiff"][f"{name}_seconds"]
  result["jaxdiff"]["train_mfu"] = (bench.train_flops_per_image
                                    * result["jaxdiff"]["train_step_images_per_sec"]
                                    / (result["matmul_peak_flops"] * mesh.devices.size))
  result["jaxdiff"]["samplers"] = {}
  for name, num_steps in parse_samplers(args.samplers):
    sample, compile_seconds = bench.sampler_fn(name, num_steps, args.num_samples)
    _, compile_seconds_10x = bench.sampler_fn(name, 10 * num_steps, args.num_samples)
    seconds = median_seconds(sample, args.repeats)
    result["jaxdiff"]["samplers"][f"{name}:{num_steps}"] = {
        "images_per_sec": args.num_samples / seconds, "seconds": seconds,
        "compile_seconds": compile_seconds,
        f"compile_seconds_at_{10 * num_steps}_steps": compile_seconds_10x}
  result["peak_host_memory_bytes"] = peak_host_memory_bytes()
  result["peak_device_memory_bytes"] = device_memory_bytes()
  if args.peer:
    ddim_steps = [steps for name, steps in parse_samplers(args.samplers) if name == "ddim"]
    result["peer"] = run_peer(args, ddim_steps)
    result["ratios"] = {
        metric: result["jaxdiff"][metric] / result["peer"][metric]
        for metric in ("train_step_images_per_sec", "forward_images_per_sec")}
    for key, entry in result["peer"]["samplers"].items():
      result["ratios"][f"{key}_images_per_sec"] = (
          result["jaxdiff"]["samplers"][key]["images_per_sec"] / entry["images_per_sec"])
  result["load_average_after"] = os.getloadavg()
  return result


def run_peer(args, ddim_steps) -> dict:
  """The peer's numbers, measured in a process of its own once jaxdiff's are done: in one
  process the two runtimes' thread pools slow each other (jaxdiff's train step lost ~20%)."""
  command = [sys.executable, "-m", "benchmarks.peer_diffusers", f"--config={args.config}",
             f"--batch_size={args.batch_size}", f"--num_samples={args.num_samples}",
             f"--dtype={args.dtype}", f"--repeats={args.repeats}",
             f"--ddim_steps={','.join(map(str, ddim_steps))}"]
  finished = subprocess.run(command, capture_output=True, text=True, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if finished.returncode:
    raise RuntimeError(f"the peer failed (pip install -e '.[bench]'?):\n{finished.stderr[-2000:]}")
  return json.loads(finished.stdout.strip().splitlines()[-1])


def format_table(result: dict) -> str:
  jaxdiff, peer = result["jaxdiff"], result.get("peer", {})
  rows = [("device", result["device"], ""), ("dtype / batch", f"{result['dtype']} / "
          f"{result['batch_size']}", ""),
          ("params", f"{jaxdiff['params']:,}", f"{peer['params']:,}" if peer else "")]
  for metric, label in (("train_step_images_per_sec", "train img/s"),
                        ("forward_images_per_sec", "forward img/s (sampling batch)")):
    rows.append((label, f"{jaxdiff[metric]:.2f}", f"{peer[metric]:.2f}" if peer else ""))
  rows.append(("train compile s", f"{jaxdiff['train_compile_seconds']:.1f}", ""))
  rows.append(("train GFLOP / image", f"{jaxdiff['train_flops_per_image'] / 1e9:.1f}", ""))
  rows.append((f"{result['dtype']} matmul peak GFLOP/s", f"{result['matmul_peak_flops'] / 1e9:.0f}",
               ""))
  rows.append(("train MFU", f"{jaxdiff['train_mfu']:.1%}", ""))
  for key, entry in jaxdiff["samplers"].items():
    peer_entry = peer.get("samplers", {}).get(key)
    rows.append((f"{key} img/s", f"{entry['images_per_sec']:.2f}",
                 f"{peer_entry['images_per_sec']:.2f}" if peer_entry else ""))
    steps = int(key.split(":")[1])
    rows.append((f"{key} compile s ({10 * steps} steps)",
                 f"{entry['compile_seconds']:.1f} ({entry[f'compile_seconds_at_{10 * steps}_steps']:.1f})",
                 ""))
  for metric, ratio in result.get("ratios", {}).items():
    rows.append((f"jaxdiff / peer {metric}", f"{ratio:.2f}×", ""))
  rows.append(("load average before / after",
               " / ".join(f"{load[0]:.2f}" for load in (result["load_average_before"],
                                                        result["load_average_after"])), ""))
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  header = ("", "jaxdiff", "peer (diffusers)" if peer else "")
  lines = [header] + rows
  return "\n".join(f"{a:<{widths[0]}}  {b:>{max(widths[1], 7)}}  {c:>{max(widths[2], 16)}}"
                   for a, b, c in lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--batch_size", type=int, default=16, help="Global train batch.")
  parser.add_argument("--num_samples", type=int, default=16, help="Sampling batch.")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--samplers", default="ddim:10,dpm_solver:10",
                      help="name:steps,… (each also compiled at 10× the steps).")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--peer", action="store_true",
                      help="Also time diffusers' UNet2DModel (pip install -e '.[bench]').")
  parser.add_argument("--output", default="benchmarks/results/benchmark.json")
  args = parser.parse_args()
  result = run(args)
  print(format_table(result))
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
  print("wrote", os.path.abspath(args.output))


if __name__ == "__main__":
  main()
