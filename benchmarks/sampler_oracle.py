"""Each deterministic sampler's error on Gaussian data, where the exact answer is known.

  python -m benchmarks.sampler_oracle [--steps 5 10 20 50]

Data x0 ~ N(0.3, 0.5²) per pixel, the exact MMSE denoiser (tests/oracles.py), the linear
schedule with T = 1000, no clipping. The samplers are affine in x_T here, x0 = a x_T + b, so
two runs (x_T = 0 and 1) give their output distribution N(b, a²) exactly. Each cell is
W2 to the data, √((b − 0.3)² + (|a| − 0.5)²), and in brackets the RMS distance to the exact
probability-flow ODE solution from the same x_T (ending with the denoiser at the first kept
timestep); * marks the sampler's default spacing.
"""

import argparse

import jax
import numpy as np

from jaxdiff import samplers, schedules
from tests.oracles import gaussian_denoiser, gaussian_flow_map

MEAN, STD = 0.3, 0.5
SAMPLERS = ("ddim", "dpm_solver", "dpm_solver_3m", "unipc")
SPACINGS = ("uniform", "trailing", "logsnr", "karras")


def errors(name: str, num_steps: int, spacing: str, schedule) -> tuple[float, float]:
  """(W2 to the data distribution, RMS distance to the exact ODE solution) per pixel."""
  x_init = np.array([0.0, 1.0], np.float32).reshape(2, 1, 1, 1)
  options = samplers.SamplingOptions(sampler=name, num_steps=num_steps, spacing=spacing,
                                     clip_x0=False, batch_size=len(x_init))
  images = samplers.sample(gaussian_denoiser(schedule, MEAN, STD, image_shape=x_init.shape[1:]),
                           None, jax.random.key(0), options, x_init=x_init).images
  b, a = np.asarray(images, np.float64).ravel()
  a -= b
  first_timestep = samplers.spaced_timesteps(schedule, num_steps, spacing)[0]
  b_exact, a_exact = gaussian_flow_map(schedule, MEAN, STD, x_init, first_timestep).ravel()
  a_exact -= b_exact
  return float(np.hypot(b - MEAN, abs(a) - STD)), float(np.hypot(b - b_exact, a - a_exact))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
  args = parser.parse_args()
  schedule = schedules.linear(1000)
  print("| sampler | spacing | " + " | ".join(f"{k} steps" for k in args.steps) + " |")
  print("| --- | --- |" + " --- |" * len(args.steps))
  for name in SAMPLERS:
    for spacing in SPACINGS:
      default = "*" if samplers.SAMPLERS[name].spacing == spacing else ""
      cells = [errors(name, k, spacing, schedule) for k in args.steps]
      print(f"| {name} | {spacing}{default} | "
            + " | ".join(f"{w2:.1e} ({ode:.1e})" for w2, ode in cells) + " |")


if __name__ == "__main__":
  main()
