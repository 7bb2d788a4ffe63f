"""Each deterministic sampler's error on Gaussian data, where the exact answer is known.

  python -m benchmarks.sampler_oracle [--steps 5 10 20 50]
  python -m benchmarks.sampler_oracle --by_process [--nfe 5 10 20 50]

Data x0 ~ N(0.3, 0.5²) per pixel, the exact MMSE denoiser (tests/oracles.py), the linear
schedule with T = 1000, no clipping. The samplers are affine in x_T here, x0 = a x_T + b, so
two runs (x_T = 0 and 1) give their output distribution N(b, a²) exactly. Each cell is
W2 to the data, √((b − 0.3)² + (|a| − 0.5)²), and in brackets the RMS distance to the exact
probability-flow ODE solution from the same x_T (ending with the denoiser at the first kept
timestep); * marks the sampler's default spacing.

--by_process: the ODE samplers on each noise process (DDPM's linear chain, EDM, rectified flow)
at their default spacing there, by network calls (NFE; Heun makes 2K − 1 in K steps, so it gets
the largest K within each budget): the RMS distance to the exact ODE end
(`tests.oracles.sampling_errors`), and the order of convergence p from the last two budgets,
error ∝ NFE^−p.
"""

import argparse
import math

from jaxdiff import processes, samplers, schedules
from tests.oracles import gaussian_denoiser, gaussian_process_denoiser, sampling_errors

MEAN, STD = 0.3, 0.5
SAMPLERS = ("ddim", "dpm_solver", "dpm_solver_3m", "unipc")
SPACINGS = ("uniform", "trailing", "logsnr", "karras")
ODE_SAMPLERS = ("ddim", "dpm_solver", "dpm_solver_3m", "unipc", "euler", "heun")
PROCESSES = {"ddpm (linear, ε)": processes.DDPM(schedules.linear(1000)),
             "edm": processes.EDM(), "flow": processes.Flow()}


def errors(name: str, num_steps: int, spacing: str, schedule) -> tuple[float, float]:
  """(W2 to the data distribution, RMS distance to the exact ODE solution) per pixel, on DDPM's
  chain of `schedule` (`tests.oracles.sampling_errors`)."""
  options = samplers.SamplingOptions(sampler=name, num_steps=num_steps, spacing=spacing,
                                     clip_x0=False)
  return sampling_errors(gaussian_denoiser(schedule, MEAN, STD), options, MEAN, STD)


def steps_within(sampler: str, nfe: int) -> int:
  """The most steps K whose network calls fit in `nfe`: K, or (nfe + 1) // 2 for Heun."""
  return (nfe + 1) // 2 if sampler == "heun" else nfe


def by_process(budgets) -> None:
  print("| process | sampler (spacing) | " + " | ".join(f"{n} NFE" for n in budgets)
        + " | order |")
  print("| --- | --- |" + " --- |" * (len(budgets) + 1))
  for label, process in PROCESSES.items():
    denoiser = gaussian_process_denoiser(process, MEAN, STD)
    for name in ODE_SAMPLERS:
      options = [samplers.SamplingOptions(sampler=name, num_steps=steps_within(name, n),
                                          clip_x0=False) for n in budgets]
      ode_errors = [sampling_errors(denoiser, o, MEAN, STD)[1] for o in options]
      calls = [2 * o.num_steps - 1 if name == "heun" else o.num_steps for o in options]
      order = math.log(ode_errors[-2] / ode_errors[-1]) / math.log(calls[-1] / calls[-2])
      spacing = options[0].resolved(process).spacing
      print(f"| {label} | {name} ({spacing}) | " + " | ".join(
          f"{e:.1e}" + ("" if c == n else f" ({c})") for e, c, n in zip(ode_errors, calls, budgets))
          + f" | {order:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
  parser.add_argument("--by_process", action="store_true")
  parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
  args = parser.parse_args()
  if args.by_process:
    by_process(args.nfe)
    return
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
