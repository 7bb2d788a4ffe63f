"""Compile time of each sampler against its number of steps, with a real (small) U-Net.

  python benchmarks/sampler_compile.py [--output benchmarks/results/sampler_compile.json]

A sampler is one `lax.scan`, so its compile time should not depend on the step count: the
program is traced and compiled the way `generate.generate` builds it (`samplers.sample` under
`jax.jit`, the schedule closed over) and `.lower(...).compile()` is timed, with no compilation
cache. Prints a table and writes JSON (device, versions, timings, the 1000/10 ratios).
"""

import argparse
import json
import os
import platform
import time

import flax
import jax

from jaxdiff import models, processes, samplers, schedules
from jaxdiff.denoiser import Denoiser

STEP_COUNTS = (10, 100, 1000)
MAX_RATIO = 1.5


def compile_seconds(sampler_name: str, denoiser: Denoiser, params, num_steps: int,
                    batch_size: int, trajectory_every: int | None, repeats: int) -> float:
  """Wall time of `.lower(...).compile()` for one sampler program, the least of `repeats`."""
  options = samplers.SamplingOptions(sampler=sampler_name, num_steps=num_steps,
                                     batch_size=batch_size)
  times = []
  for _ in range(repeats):
    sample = jax.jit(lambda params, key: samplers.sample(
        denoiser, params, key, options, trajectory_every=trajectory_every))
    start = time.perf_counter()
    sample.lower(params, jax.random.key(0)).compile()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/sampler_compile.json")
  parser.add_argument("--repeats", type=int, default=3, help="Compiles per entry (least kept).")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  network = models.UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                        dropout=0.0, out_channels=3)
  denoiser = Denoiser(network=network, process=processes.DDPM(schedules.linear(1000), "eps"),
                      num_classes=0, image_shape=(32, 32, 3))
  params, batch_size = jax.jit(denoiser.init)(jax.random.key(0)), 16
  rows = []
  print(f"{'sampler':<24}" + "".join(f"{f'{n} steps':>12}" for n in STEP_COUNTS)
        + f"{'1000/10':>10}")
  for name in samplers.SAMPLERS:
    for trajectory_every in (None, 10):
      seconds = [compile_seconds(name, denoiser, params, n, batch_size, trajectory_every,
                                 args.repeats) for n in STEP_COUNTS]
      label = name if trajectory_every is None else f"{name} (trajectory)"
      rows.append({"sampler": name, "trajectory_every": trajectory_every,
                   "compile_seconds": dict(zip(map(str, STEP_COUNTS), seconds)),
                   "ratio_1000_to_10": seconds[-1] / seconds[0]})
      print(f"{label:<24}" + "".join(f"{s:>11.2f}s" for s in seconds)
            + f"{seconds[-1] / seconds[0]:>10.2f}")
  worst = max(row["ratio_1000_to_10"] for row in rows)
  print(f"largest 1000/10 ratio {worst:.2f} (must be ≤ {MAX_RATIO})")
  result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "jax": jax.__version__, "flax": flax.__version__,
            "python": platform.python_version(),
            "model": "UNet ch=32 ch_mult=(1,2,2) 2 res blocks, attention at 8; batch 16 of 32x32x3",
            "repeats": args.repeats, "rows": rows, "largest_ratio_1000_to_10": worst}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
  if worst > MAX_RATIO:
    raise SystemExit(f"compile time grows with the step count: ratio {worst:.2f} > {MAX_RATIO}")


if __name__ == "__main__":
  main()
