"""Compile time of each sampler against its number of steps, with a real (small) U-Net.

  python benchmarks/sampler_compile.py [--output benchmarks/results/sampler_compile.json]

A sampler is one `lax.scan`, so its compile time should not depend on the step count. Prints
a table and writes JSON (device, versions, timings).
"""

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from jaxdiff import models, samplers, schedules

STEP_COUNTS = (10, 100, 1000)


def compile_seconds(sampler_name, model, variables, num_steps, shape):
  schedule = schedules.linear(1000)
  timesteps = samplers.spaced_timesteps(schedule, num_steps, samplers.DEFAULT_SPACING[sampler_name])
  respaced = samplers.respace(schedule, timesteps)
  sample = jax.jit(functools.partial(samplers.SAMPLERS[sampler_name], model.apply, shape=shape))
  start = time.perf_counter()
  sample.lower(variables, respaced, jax.random.key(0), timesteps=jnp.asarray(timesteps)).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="benchmarks/results/sampler_compile.json")
  args = parser.parse_args()
  model = models.UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                      dropout=0.0, out_channels=3)
  shape = (16, 32, 32, 3)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape), jnp.zeros((16,), jnp.int32))
  rows = []
  print(f"{'sampler':<12}" + "".join(f"{f'{n} steps':>12}" for n in STEP_COUNTS) + f"{'ratio':>10}")
  for name in samplers.SAMPLERS:
    seconds = [compile_seconds(name, model, variables, n, shape) for n in STEP_COUNTS]
    ratio = seconds[-1] / seconds[0]
    rows.append({"sampler": name, "compile_seconds": dict(zip(map(str, STEP_COUNTS), seconds)),
                 "ratio_1000_to_10": ratio})
    print(f"{name:<12}" + "".join(f"{s:>11.2f}s" for s in seconds) + f"{ratio:>10.2f}")
  result = {"device": str(jax.devices()[0]), "jax": jax.__version__,
            "python": platform.python_version(), "model": "UNet ch=32 (1,2,2) 32x32x3, batch 16",
            "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
