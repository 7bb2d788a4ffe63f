"""The training job: data → compiled train step → metrics, sample grids and checkpoints.

`train(config, workdir)` is everything `train.py` does. It resumes from the newest good
checkpoint in `workdir` and runs until `config.train.num_steps` steps in total. SIGTERM or
Ctrl-C saves a checkpoint at the current step and returns cleanly.
"""

import contextlib
import dataclasses
import os
import signal
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxdiff import checkpoint, data, generate, images, parallel, schedules, train_step, visualize
from jaxdiff.evaluation import metrics, panels
from jaxdiff.metric_writer import MetricWriter


class TrainingError(Exception):
  """Training cannot go on (e.g. the loss stayed non-finite); the message says why."""


@dataclasses.dataclass
class TrainSummary:
  first_step: int
  last_step: int
  seconds: float
  final_loss: float
  workdir: str
  preempted: bool = False

  def __str__(self) -> str:
    stopped = " (stopped by signal; rerun the same command to resume)" if self.preempted else ""
    return (f"trained steps {self.first_step}→{self.last_step} in {self.seconds:.0f}s, final loss "
            f"{self.final_loss:.4f}{stopped}; checkpoints, metrics.jsonl, tensorboard/ and "
            f"samples/ are in {self.workdir}")


class StopSignal:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received = None

  @contextlib.contextmanager
  def installed(self):
    def handler(signum, frame):
      del frame
      self.received = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in previous.items():
        signal.signal(s, h)


def save_resolved_config(config, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def loss_by_t_scalars(bin_sum: np.ndarray, bin_count: np.ndarray) -> dict:
  """{'loss_t_bin_0': mean loss of the first tenth of t, …}; bins with no draws are left out."""
  return {f"loss_t_bin_{i}": s / c for i, (s, c) in enumerate(zip(bin_sum, bin_count)) if c}


def check_intervals(train_config) -> None:
  """Step intervals are whole numbers: log_every ≥ 1; the others ≥ 0, where 0 means never
  (checkpoint_every = 0: only at the end and on a stop signal)."""
  minimum = {"log_every": 1, "checkpoint_every": 0, "sample_every": 0, "eval_every": 0}
  for name, low in minimum.items():
    value = train_config.get(name, low)
    if not isinstance(value, int) or value < low:
      raise ValueError(f"config.train.{name} = {value!r}: expected a whole number of steps ≥ {low}"
                       f"{' (0 means never)' if low == 0 else ''}.")


def run(config, workdir: str) -> TrainSummary:
  """Train `config` in `workdir` until config.train.num_steps; returns a summary."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  train_config = config.train
  is_chief = jax.process_index() == 0
  mesh = parallel.make_mesh()
  parallel.check_divisible(train_config.batch_size, mesh)
  check_intervals(train_config)
  data.check_model_compatible(config.data, config.model)
  eval_every = train_config.get("eval_every", 0)  # 0: no in-training evaluation
  if eval_every:
    for metric in config.eval.metrics:
      metrics.check_metric(metric, config.data)
  os.makedirs(workdir, exist_ok=True)
  if is_chief:
    save_resolved_config(config, workdir)

  model = train_step.create_model(config)
  schedule = schedules.from_config(config.diffusion)
  key = jax.random.key(config.seed)
  init_key, sample_key = jax.random.split(key)
  train_iter = data.make_train_iterator(config.data, train_config.batch_size, config.seed, mesh)

  checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=train_config.max_to_keep)
  if checkpointer.latest_step() is None:
    state = train_step.create_state(config, model, mesh, init_key)
  else:
    abstract_state = train_step.abstract_state(config, model, mesh)
    state, data_state, _ = checkpointer.restore(abstract_state, config=config)
    train_iter.set_state(data_state)
  first_step = int(state.step)
  step_fn = train_step.make_train_step(model, schedule, config, mesh)
  writer = MetricWriter(workdir, enabled=is_chief)

  def save(step, wait=False):
    checkpointer.save(step, state, train_iter.get_state(), config, wait=wait)

  panel_key, eval_key, sample_key = jax.random.split(sample_key, 3)
  panel_x0, panel_noise = panels.panel_inputs(config, panel_key)

  def write_samples(step):
    grid = generate.sample_grid(model, state.ema_params, schedule, config, mesh,
                       jax.random.fold_in(sample_key, step))
    panel = panels.panel(model, state.ema_params, schedule, config, panel_x0, panel_noise)
    if is_chief:
      for folder, image in (("samples", grid), ("panels", panel)):
        images.save_png(os.path.join(workdir, folder, f"step_{step:07d}.png"), image)
        writer.write_image(step, folder, image)

  def evaluate(step):
    start = time.perf_counter()
    scalars = metrics.training_scalars(model, state.ema_params, config, mesh,
                                          jax.random.fold_in(eval_key, step))
    writer.write(step, {**scalars, "eval/seconds": time.perf_counter() - start})

  start_time = time.perf_counter()
  last_loss, nonfinite_in_a_row, step = float("nan"), 0, first_step
  window = {"metrics": [], "time": time.perf_counter()}
  pending = None  # the previous step's metrics, read after the next step is dispatched
  progress = tqdm(total=train_config.num_steps, initial=first_step, disable=not is_chief,
                  unit="step", dynamic_ncols=True)

  def finish_step(step, metrics):
    """Host-side bookkeeping for a completed step (its metrics are ready or nearly so)."""
    nonlocal last_loss, nonfinite_in_a_row
    metrics = jax.device_get(metrics)
    if metrics["finite"]:
      nonfinite_in_a_row, last_loss = 0, float(metrics["loss"])
    else:
      nonfinite_in_a_row += 1
      logging.warning("step %d: non-finite loss or gradient (%s in a row); update skipped",
                      step, nonfinite_in_a_row)
    window["metrics"].append(metrics)
    progress.update(1)
    if step % train_config.log_every == 0 or step == train_config.num_steps:
      log_window(step)
    if nonfinite_in_a_row >= train_config.max_nonfinite_steps:
      raise TrainingError(
          f"the loss or gradient was non-finite for {nonfinite_in_a_row} steps in a row (last: "
          f"step {step}); stopped without saving. The newest checkpoint in {workdir} holds the "
          f"last good state. Lower train.learning_rate or check the data, then rerun.")

  def log_window(step):
    seconds = time.perf_counter() - window["time"]
    history = window["metrics"]
    steps_per_sec = len(history) / max(seconds, 1e-9)
    finite = [m for m in history if m["finite"]]
    mean_of = lambda name: np.mean([m[name] for m in finite], axis=0) if finite else np.nan
    scalars = {
        "loss": mean_of("loss"),
        "grad_norm": mean_of("grad_norm"),
        "learning_rate": history[-1]["learning_rate"],
        "steps_per_sec": steps_per_sec,
        "images_per_sec": steps_per_sec * train_config.batch_size,
        "nonfinite_steps": len(history) - len(finite),
    }
    if finite:
      scalars.update(loss_by_t_scalars(mean_of("loss_bin_sum"), mean_of("loss_bin_count")))
    writer.write(step, scalars)
    progress.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_sec']:.0f}")
    window["metrics"], window["time"] = [], time.perf_counter()

  sample_every = train_config.sample_every  # 0: no sample grids
  stop = StopSignal()
  try:
    with stop.installed():
      for step in range(first_step + 1, train_config.num_steps + 1):
        state, step_metrics = step_fn(state, next(train_iter))
        if pending is not None:
          finish_step(*pending)
        pending = (step, step_metrics)
        if train_config.checkpoint_every and step % train_config.checkpoint_every == 0:
          save(step)
        if sample_every and step % sample_every == 0:
          write_samples(step)
        if eval_every and step % eval_every == 0:
          evaluate(step)
        if stop.received:
          break
      if pending is not None:
        finish_step(*pending)
      if stop.received:
        logging.warning("received %s: saving a checkpoint at step %d", stop.received, step)
      if step > first_step:
        save(step, wait=True)
        if sample_every and not stop.received and step % sample_every:
          write_samples(step)
        if eval_every and not stop.received and step % eval_every:
          evaluate(step)
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
  if is_chief:
    visualize.plot_losses(os.path.join(workdir, "metrics.jsonl"),
                          os.path.join(workdir, "losses.png"))
  return TrainSummary(first_step, step, time.perf_counter() - start_time, last_loss, workdir,
                      preempted=bool(stop.received))
