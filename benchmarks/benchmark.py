"""Speed of jaxdiff's train step and samplers, side by side with the PyTorch peer, on whatever
devices are present.

    python -m benchmarks.benchmark --config=configs/cifar10.py --batch_size=16 --peer
    python -m benchmarks.benchmark --config=configs/cifar10.py --batch_size=128 --dtype=bfloat16
    python -m benchmarks.benchmark --mesh=2,2 --grad_accum_steps=4 --steps_per_call=5
    python -m benchmarks.benchmark --memory   # per-device memory at fsdp 1, 2, 4; runs nothing

Each number is the median of `--repeats` timed calls after a warm-up call, synchronised with
`block_until_ready` (and, for the peer, by reading its outputs back). The peer runs after
jaxdiff in a process of its own (`benchmarks/peer_diffusers.py`), the same way; run the
benchmark on an otherwise idle machine. Reported:
  * train: images/s and steps/s of the real train step (`train_step.make_train_step`: loss,
    Adam, gradient clipping, EMA, over a `--mesh=DATA,FSDP` of every device, with
    `--grad_accum_steps` micro-batches and `--steps_per_call` steps a call), its compile time,
    its FLOPs per image from XLA's cost analysis (`telemetry.step_flops`), and the model FLOPs
    utilisation (MFU): achieved
    FLOP/s over the devices' peak (one device's, measured in the same run with a large matmul
    of the dtype, times the device count);
  * forward: images/s of the U-Net's forward pass at the sampling batch (one sampler step);
  * samplers: images/s of each whole sampler run (`--samplers=ddim:10,...`) and its compile
    time, with the compile time of the same sampler at 10× the steps (a scan: about equal);
  * peak host memory (ru_maxrss) and device memory where the backend reports it.
Prints a table and writes JSON with the device, versions, config and load average.

`--trainer` instead times the real training loop (`jobs.train.run`: data pipeline, step
dispatch, health checks, metrics) next to the bare compiled step at the same batch, alternating
the two `--repeats` times in one process: the loop trains `--trainer_steps` steps in a fresh
workdir, logging every `--log_every` (sample grids and evaluation off; one checkpoint, at the last
step), and its images/s is the median of its metrics windows after the first (compilation comes
before every window; the first holds the first call and the pipeline's start); the bare step's is
`--log_every` calls dispatched back to back. Reported: both medians and their ratio.

`--override=model.ch=16` (repeatable) sets any config field of `--config` (not with `--peer`,
which builds its model from the config file alone).

`--memory` instead compiles, without running, the train step of `--memory_configs` (a config
path, or `large`: a U-Net of ch 256, ch_mult (1, 1, 2, 2, 4, 4) at 256×256, 481M parameters,
the size of ADM's large models) on meshes (4, 1), (2, 2) and (1, 4) of the first 4 devices, and
reports each device's share of the train state and XLA's memory analysis of the step (its
arguments, outputs and temporaries per device).
"""

import argparse
import ast
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import denoiser as denoiser_lib, parallel, samplers, telemetry, train_step
from jaxdiff.jobs import train
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


def load_config(path: str, dtype: str, overrides=()):
  """The config at `path` with compute `dtype` and `overrides` ('model.ch=16': a Python literal,
  or else a string) applied."""
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.dtype = dtype
  for override in overrides:
    field, value = override.split("=", 1)
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[name] = value
  return config


class JaxdiffBench:
  """jaxdiff's compiled train step, forward pass and samplers for one config."""

  def __init__(self, config, batch_size: int, mesh):
    self.config, self.batch_size, self.mesh = config, batch_size, mesh
    config.train.batch_size = batch_size
    self.denoiser = denoiser_lib.from_config(config)
    self.image_shape = self.denoiser.image_shape
    self.state = train_step.create_state(self.denoiser, config.train, mesh, jax.random.key(0))
    self.num_params = count_params(self.state.params)
    rng = np.random.default_rng(0)
    steps_per_call = config.train.steps_per_call
    stacked = (steps_per_call,) if steps_per_call > 1 else ()
    self.batch = parallel.global_batch(
        {"image": rng.uniform(-1, 1, (*stacked, batch_size, *self.image_shape)).astype(np.float32),
         "label": np.zeros((*stacked, batch_size), np.int32)}, mesh, stacked=bool(stacked))
    step_fn = train_step.make_train_step(self.denoiser, config, mesh)
    start = time.perf_counter()
    self.compiled_step = step_fn.lower(self.state, self.batch).compile()
    self.train_compile_seconds = time.perf_counter() - start
    self.train_flops_per_image = telemetry.step_flops(self.denoiser, config, mesh) / batch_size

  def train_step(self):
    self.state, metrics = self.compiled_step(self.state, self.batch)
    jax.block_until_ready(metrics)

  def train_steps(self, num_calls: int) -> float:
    """Seconds a call of `num_calls` calls dispatched back to back, blocking after the last."""
    start = time.perf_counter()
    for _ in range(num_calls):
      self.state, metrics = self.compiled_step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / num_calls

  def forward_fn(self, num_samples: int):
    """A blocking call of the network's forward pass on `num_samples` images."""
    x = parallel.global_batch(
        np.random.default_rng(1).standard_normal((num_samples, *self.image_shape),
                                                 dtype=np.float32), self.mesh)
    t = parallel.global_batch(np.full((num_samples,), 500, np.int32), self.mesh)
    output = jax.jit(self.denoiser.output)
    params = self.state.ema_params
    output(params, x, t).block_until_ready()
    return lambda: output(params, x, t).block_until_ready()

  def sampler_fn(self, name: str, num_steps: int, num_samples: int):
    """(blocking call of one whole sampler run, its compile seconds)."""
    sharding = parallel.batch_sharding(self.mesh)

    options = samplers.SamplingOptions(sampler=name, num_steps=num_steps, batch_size=num_samples)

    def run(params, key):
      images = samplers.sample(self.denoiser, params, key, options).images
      return jax.lax.with_sharding_constraint(images, sharding)

    params, key = self.state.ema_params, jax.random.key(2)
    start = time.perf_counter()
    compiled = jax.jit(run).lower(params, key).compile()
    compile_seconds = time.perf_counter() - start
    compiled(params, key).block_until_ready()
    return lambda: compiled(params, key).block_until_ready(), compile_seconds


def device_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def peak_host_memory_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_samplers(spec: str) -> list[tuple[str, int]]:
  pairs = [item.split(":") for item in spec.split(",") if item]
  return [(name, int(steps)) for name, steps in pairs]


def mesh_config(spec: str) -> ml_collections.ConfigDict:
  """'DATA,FSDP' -> config.mesh."""
  data, fsdp = (int(size) for size in spec.split(","))
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def with_defaults(args) -> argparse.Namespace:
  return argparse.Namespace(**{**vars(make_parser().parse_args([])), **vars(args)})


def bench_config(args):
  """`args.config` with the dtype, overrides, mesh and step layout of `args`."""
  config = load_config(args.config, args.dtype, args.override)
  config.mesh = mesh_config(args.mesh)
  config.train.update(grad_accum_steps=args.grad_accum_steps,
                      steps_per_call=args.steps_per_call)
  return config


def run_header(args, mesh) -> dict:
  devices = jax.devices()
  return {
      "device": f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform})",
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "python": platform.python_version()},
      "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
      "config": args.config, "overrides": list(args.override), "dtype": args.dtype,
      "batch_size": args.batch_size, "mesh": dict(mesh.shape),
      "grad_accum_steps": args.grad_accum_steps, "steps_per_call": args.steps_per_call,
      "num_samples": args.num_samples, "repeats": args.repeats,
      "load_average_before": os.getloadavg(),
  }


def run(args) -> dict:
  args = with_defaults(args)
  if args.peer and args.override:
    raise ValueError("--peer builds its model from --config alone: drop --override")
  config = bench_config(args)
  mesh = parallel.make_mesh(mesh_config=config.mesh)
  result = run_header(args, mesh)
  result["matmul_peak_flops"] = matmul_peak_flops(args.dtype, args.matmul_size, args.repeats)
  bench = JaxdiffBench(config, args.batch_size, mesh)
  result["jaxdiff"] = {"params": bench.num_params,
                       "train_compile_seconds": bench.train_compile_seconds,
                       "train_flops_per_image": bench.train_flops_per_image}
  result["jaxdiff"]["train_step_seconds"] = (  # per optimizer step
      median_seconds(bench.train_step, args.repeats) / args.steps_per_call)
  result["jaxdiff"]["forward_seconds"] = median_seconds(bench.forward_fn(args.num_samples),
                                                        args.repeats)
  for name, images in (("train_step", args.batch_size), ("forward", args.num_samples)):
    result["jaxdiff"][f"{name}_images_per_sec"] = images / result["jaxdiff"][f"{name}_seconds"]
  result["jaxdiff"]["train_mfu"] = (bench.train_flops_per_image
                                    * result["jaxdiff"]["train_step_images_per_sec"]
                                    / (result["matmul_peak_flops"] * mesh.devices.size))
  spec_peak = telemetry.peak_tflops(jax.devices()[0].device_kind, args.dtype)
  if spec_peak:  # against the chip's specified peak, as the trainer's metrics report MFU
    result["jaxdiff"]["train_mfu_of_spec_peak"] = (
        bench.train_flops_per_image * result["jaxdiff"]["train_step_images_per_sec"]
        / (spec_peak * 1e12 * mesh.devices.size))
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
    if result["peer"]["params"] != result["jaxdiff"]["params"]:
      raise RuntimeError(f"the peer has {result['peer']['params']:,} parameters where jaxdiff has "
                         f"{result['jaxdiff']['params']:,}: not the same network, so its timings "
                         "are no comparison")
    result["ratios"] = {
        metric: result["jaxdiff"][metric] / result["peer"][metric]
        for metric in ("train_step_images_per_sec", "forward_images_per_sec")}
    for key, entry in result["peer"]["samplers"].items():
      result["ratios"][f"{key}_images_per_sec"] = (
          result["jaxdiff"]["samplers"][key]["images_per_sec"] / entry["images_per_sec"])
  result["load_average_after"] = os.getloadavg()
  return result


def trainer_images_per_sec(config, workdir: str) -> float:
  """Steady-state images/s of `jobs.train.run(config, workdir)`: the median of its metrics
  windows after the first."""
  train.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    windows = [json.loads(line)["images_per_sec"] for line in f][1:]
  if not windows:
    raise ValueError(f"--trainer_steps={config.train.num_steps} with --log_every="
                     f"{config.train.log_every} leaves no window after the first: give at least "
                     f"two windows of steps")
  return statistics.median(windows)


def run_trainer(args) -> dict:
  """The training loop's images/s next to the bare step's, alternately, `args.repeats` times."""
  args = with_defaults(args)
  config = bench_config(args)
  config.train.update(batch_size=args.batch_size, num_steps=args.trainer_steps,
                      log_every=args.log_every, checkpoint_every=0, sample_every=0,
                      eval_every=0)
  mesh = parallel.make_mesh(mesh_config=config.mesh)
  result = run_header(args, mesh)
  result.update(trainer_steps=args.trainer_steps, log_every=args.log_every)
  bench = JaxdiffBench(config.copy_and_resolve_references(), args.batch_size, mesh)
  bench.train_steps(1)
  images_per_call = args.batch_size * args.steps_per_call
  bare, loop = [], []
  for _ in range(args.repeats):
    bare.append(images_per_call / bench.train_steps(args.log_every))
    with tempfile.TemporaryDirectory() as workdir:
      loop.append(trainer_images_per_sec(config.copy_and_resolve_references(), workdir))
  result["trainer"] = {
      "bare_step_images_per_sec": statistics.median(bare),
      "trainer_images_per_sec": statistics.median(loop),
      "ratio": statistics.median(loop) / statistics.median(bare),
      "bare_step_images_per_sec_each": bare, "trainer_images_per_sec_each": loop,
      "params": bench.num_params}
  result["load_average_after"] = os.getloadavg()
  return result


def format_trainer_table(result: dict) -> str:
  trainer = result["trainer"]
  each = lambda name: ", ".join(f"{value:.1f}" for value in trainer[f"{name}_each"])
  return "\n".join([
      f"{result['device']}, {result['config']} {' '.join(result['overrides'])}, "
      f"{trainer['params']:,} params, {result['dtype']}, batch {result['batch_size']}",
      f"bare step img/s  {trainer['bare_step_images_per_sec']:.2f}  "
      f"({each('bare_step_images_per_sec')})",
      f"trainer img/s    {trainer['trainer_images_per_sec']:.2f}  "
      f"({each('trainer_images_per_sec')})",
      f"trainer / bare   {trainer['ratio']:.3f}",
      "load average before / after  " + " / ".join(
          f"{load[0]:.2f}" for load in (result["load_average_before"],
                                        result["load_average_after"]))])


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
          ("params", f"{jaxdiff['params']:,}", f"{peer['params']:,}" if peer else ""),
          ("mesh / micro-batches / steps a call", f"{tuple(result['mesh'].values())} / "
           f"{result['grad_accum_steps']} / {result['steps_per_call']}", "")]
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


LARGE_UNET = dict(ch=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                  attn_resolutions=(32, 16, 8), num_heads=4)


def memory_config(name: str, dtype: str):
  """A config path, or 'large': configs/cifar10.py at 256×256 with LARGE_UNET."""
  if name != "large":
    return load_config(name, dtype)
  config = load_config("configs/cifar10.py", dtype)
  config.data.image_size = 256
  config.model.update(LARGE_UNET)
  return config


def state_memory(config, batch_size: int, grad_accum_steps: int, mesh_shapes) -> list[dict]:
  """Per device, on each (data, fsdp) mesh: the train state's share and XLA's memory analysis
  of the compiled step, from abstract inputs (`jax.eval_shape`): nothing is run or allocated."""
  config.train.update(batch_size=batch_size, grad_accum_steps=grad_accum_steps)
  denoiser = denoiser_lib.from_config(config)
  rows = []
  for data, fsdp in mesh_shapes:
    mesh = parallel.make_mesh(jax.devices()[:data * fsdp],
                              ml_collections.ConfigDict({"data": data, "fsdp": fsdp}))
    state = train_step.abstract_state(denoiser, config.train, mesh)
    start = time.perf_counter()
    compiled = train_step.make_train_step(denoiser, config, mesh).lower(
        state, train_step.abstract_batch(denoiser, config.train, mesh)).compile()
    memory = compiled.memory_analysis()
    shardings = jax.tree.map(lambda x: x.sharding, state)
    rows.append({
        "mesh": (data, fsdp), "grad_accum_steps": grad_accum_steps,
        "params": count_params(state.params),
        "state_bytes": parallel.bytes_per_device(state, shardings),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
        "compile_seconds": time.perf_counter() - start})
  return rows


def format_memory_table(tables: dict[str, list[dict]]) -> str:
  lines = ["| config | params | mesh (data, fsdp) | micro-batches | state / device | arguments | "
           "outputs | temporaries | compile |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  gib = lambda n: f"{n / 2**30:.3f} GiB"
  for name, rows in tables.items():
    for row in rows:
      lines.append(f"| {name} | {row['params'] / 1e6:.1f}M | {row['mesh']} | "
                   f"{row['grad_accum_steps']} | "
                   f"{gib(row['state_bytes'])} | {gib(row['argument_bytes'])} | "
                   f"{gib(row['output_bytes'])} | {gib(row['temp_bytes'])} | "
                   f"{row['compile_seconds']:.0f} s |")
  return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that choose the model and its train step: --config, --batch_size, --dtype, --mesh
  and --override (also benchmarks/op_profile.py's)."""
  parser.add_argument("--config", default="configs/cifar10.py")
  parser.add_argument("--batch_size", type=int, default=16, help="Global train batch.")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--mesh", default="-1,1", help="DATA,FSDP sizes (one may be -1).")
  parser.add_argument("--override", action="append", default=[],
                      help="FIELD=VALUE, e.g. model.ch=16 (repeatable).")


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_arguments(parser)
  parser.add_argument("--num_samples", type=int, default=16, help="Sampling batch.")
  parser.add_argument("--samplers", default="ddim:10,dpm_solver:10",
                      help="name:steps,… (each also compiled at 10× the steps).")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--peer", action="store_true",
                      help="Also time diffusers' UNet2DModel (pip install -e '.[bench]').")
  parser.add_argument("--grad_accum_steps", type=int, default=1)
  parser.add_argument("--steps_per_call", type=int, default=1)
  parser.add_argument("--trainer", action="store_true",
                      help="The training loop's images/s next to the bare step's.")
  parser.add_argument("--trainer_steps", type=int, default=60)
  parser.add_argument("--log_every", type=int, default=10,
                      help="--trainer: steps per metrics window, and bare calls per timing.")
  parser.add_argument("--memory", action="store_true",
                      help="Only the per-device memory table at fsdp 1, 2, 4 (runs nothing).")
  parser.add_argument("--memory_configs", default="configs/cifar10.py,large")
  parser.add_argument("--memory_batch_size", type=int, default=4)
  parser.add_argument("--output", default="benchmarks/results/benchmark.json")
  return parser


def main():
  args = make_parser().parse_args()
  if args.memory:
    tables = {name: state_memory(memory_config(name, args.dtype), args.memory_batch_size,
                                 args.grad_accum_steps, ((4, 1), (2, 2), (1, 4)))
              for name in args.memory_configs.split(",")}
    print(format_memory_table(tables))
    return
  if args.trainer:
    result = run_trainer(args)
    print(format_trainer_table(result))
  else:
    result = run(args)
    print(format_table(result))
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
  print("wrote", os.path.abspath(args.output))


if __name__ == "__main__":
  main()
