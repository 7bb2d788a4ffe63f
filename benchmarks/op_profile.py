"""Where the train step's time goes, by HLO instruction: a `jax.profiler` trace of the compiled
step, each executed instruction attributed to the part of the model that emitted it.

    python -m benchmarks.op_profile --config=configs/cifar10.py --batch_size=16 --steps=3

XLA:CPU records one trace event per executed instruction (its thunk), on the thread that ran
it: the client thread or one of the intra-op pool's. The CPU time of an instruction is the sum
of its events over every thread, per step. Each instruction is looked up in the compiled HLO
module, where its metadata names the JAX operation and the Flax module path that produced it
(`jit(step)/jvp(UNet)/ResBlock_0/GroupNorm_0/...`, with `transpose(` around the backward pass).
Reported, as shares of the summed CPU time and in milliseconds per step:
  * by pass: forward, backward (the transpose of the forward), update (noise draws, loss, Adam,
    clipping, EMA: everything outside the network) and copies with no source operation;
  * by kind: convolutions (weight gradients, with a [k, k, in, out] output, separately),
    GroupNorm, attention and dense layers, SiLU, the network's other operations;
  * the most expensive instructions, each with its opcode and source operation.
Prints tables and writes JSON (`--output`).
"""

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time

import jax

from benchmarks import benchmark
from jaxdiff import parallel

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [^=]*?\b([a-z][\w\-]*)\(")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def instruction_table(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """{instruction name: (opcode, JAX op_name metadata, output type)} of a compiled HLO module's
  text."""
  table = {}
  for line in hlo_text.splitlines():
    match = INSTRUCTION.match(line)
    if match:
      name, output_type, opcode = match.groups()
      op_name = OP_NAME.search(line)
      table[name] = (opcode, op_name.group(1) if op_name else "", output_type)
  return table


def is_kernel_shaped(output_type: str) -> bool:
  """A [k, k, in, out] or [out, k, k, in] output with k ≤ 3: what a convolution's weight gradient
  produces (the network's smallest activations are 4×4)."""
  dims = re.match(r"\w+\[(\d+),(\d+),(\d+),(\d+)\]", output_type)
  if not dims:
    return False
  sizes = [int(size) for size in dims.groups()]
  return any(sizes[i] == sizes[i + 1] <= 3 for i in (0, 1))


def pass_of(opcode: str, op_name: str, output_type: str) -> str:
  if is_weight_gradient(opcode, op_name, output_type) or "transpose(jvp(UNet" in op_name:
    return "backward"
  if not op_name:
    return "no source (layout copies)"
  return "forward" if "UNet" in op_name else "update (noise, loss, optimizer, EMA)"


def is_convolution(opcode: str, op_name: str) -> bool:
  """XLA's own convolution, or a fusion (handed to YNNPACK) around a `conv_general_dilated`."""
  return opcode == "convolution" or op_name.endswith("conv_general_dilated")


def is_weight_gradient(opcode: str, op_name: str, output_type: str) -> bool:
  """A convolution with a kernel-shaped output. XLA drops the op_name of the weight gradients it
  hands to YNNPACK, so the output's shape decides."""
  return (is_convolution(opcode, op_name) or not op_name) and is_kernel_shaped(output_type)


def kind_of(opcode: str, op_name: str, output_type: str) -> str:
  """What an instruction computes, from the model part named in its op_name (the U-Net's module
  path, e.g. `down_0_block_1/norm1/...`, and the JAX primitive): a convolution (a fusion around
  one, too) is a weight gradient if its output is kernel-shaped."""
  if is_weight_gradient(opcode, op_name, output_type):
    return "convolution (weight gradient)"
  if is_convolution(opcode, op_name):
    return "convolution"
  if not op_name:
    return "layout copies"
  if "UNet" not in op_name:
    return "outside the network"
  parts = op_name.split("/")
  if any(part.startswith("norm") for part in parts):
    return "GroupNorm"
  if any("attn" in part for part in parts) or op_name.endswith("dot_general"):
    return "attention and dense"
  if "jit(silu)" in parts:
    return "SiLU"
  return "other network ops (adds, concatenation, resampling)"


def trace_instruction_seconds(call, num_calls: int) -> dict[str, float]:
  """{instruction name: CPU seconds summed over threads} of `num_calls` blocking calls of
  `call`, from a profiler trace."""
  with tempfile.TemporaryDirectory(prefix="jaxdiff-op-profile-") as directory:
    with jax.profiler.trace(directory):
      for _ in range(num_calls):
        call()
    (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    planes = jax.profiler.ProfileData.from_file(path).planes
  seconds = collections.Counter()
  for plane in planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        seconds[event.name] += event.duration_ns * 1e-9
  return seconds


def profile(args) -> dict:
  load_average_before = os.getloadavg()
  config = benchmark.load_config(args.config, args.dtype, args.override)
  mesh = parallel.make_mesh(mesh_config=benchmark.mesh_config(args.mesh))
  bench = benchmark.JaxdiffBench(config, args.batch_size, mesh)
  table = instruction_table(bench.compiled_step.as_text())
  step_seconds = benchmark.median_seconds(bench.train_step, args.steps)
  traced = trace_instruction_seconds(bench.train_step, args.steps)
  per_step = {name: seconds / args.steps for name, seconds in traced.items() if name in table}
  total = sum(per_step.values())
  by_pass, by_kind = collections.Counter(), collections.Counter()
  for name, seconds in per_step.items():
    opcode, op_name, output_type = table[name]
    by_pass[pass_of(opcode, op_name, output_type)] += seconds
    by_kind[kind_of(opcode, op_name, output_type)] += seconds
  top = sorted(per_step.items(), key=lambda item: -item[1])[:args.top]
  return {
      "config": args.config, "overrides": list(args.override), "batch_size": args.batch_size,
      "dtype": args.dtype, "load_average_before": load_average_before,
      "step_seconds": step_seconds, "instruction_cpu_seconds_per_step": total,
      "train_flops_per_image": bench.train_flops_per_image,
      "by_pass": dict(by_pass.most_common()), "by_kind": dict(by_kind.most_common()),
      "top_instructions": [
          {"name": name, "opcode": table[name][0], "op_name": table[name][1],
           "output_type": table[name][2], "cpu_seconds_per_step": seconds} for name, seconds in top],
  }


def format_tables(result: dict) -> str:
  total = result["instruction_cpu_seconds_per_step"]
  lines = [f"{result['config']} batch {result['batch_size']} {result['dtype']}: step "
           f"{result['step_seconds'] * 1e3:.0f} ms wall, instructions {total * 1e3:.0f} ms CPU "
           "(summed over threads)"]
  for title in ("by_pass", "by_kind"):
    lines.append(f"\n{title.replace('_', ' ')}:")
    for name, seconds in result[title].items():
      lines.append(f"  {name:<52} {seconds * 1e3:9.1f} ms  {100 * seconds / total:5.1f} %")
  lines.append("\ntop instructions:")
  for entry in result["top_instructions"]:
    source = re.sub(r"^jit\([^)]*\)/", "", entry["op_name"])[-70:]
    lines.append(f"  {entry['cpu_seconds_per_step'] * 1e3:8.1f} ms "
                 f"{100 * entry['cpu_seconds_per_step'] / total:5.1f} %  "
                 f"{entry['opcode']:<12} {entry['name']:<28} {entry['output_type'][:24]:<24} "
                 f"{source}")
  return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  benchmark.add_model_arguments(parser)
  parser.add_argument("--steps", type=int, default=3, help="Traced (and timed) steps.")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--output", default="")
  return parser


def main(argv=None):
  args = make_parser().parse_args(argv)
  result = profile(args)
  print(format_tables(result))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
