"""The training job: data → compiled train step → metrics, sample grids and checkpoints.

`run(config, workdir)` is everything `train.py` does. It owns `workdir` while it runs (its
lock, `workdir_lock`: a second run on it is refused), resumes from the newest good checkpoint
there and runs until `config.train.num_steps` steps in total. SIGTERM or Ctrl-C, between steps
or between the batches of a sample grid or an evaluation, saves a checkpoint at the current
step and returns cleanly. A run whose loss turns non-finite or explodes stops with a
TrainingError and never saves the state it diverged to.
"""

import collections
import contextlib
import dataclasses
import os
import sys
import time
from typing import Callable, TypeVar

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxdiff import (checkpoint, config_check, config_io, data, errors, generate, images,
                     metric_writer, parallel, samplers, storage, telemetry, train_step, visualize,
                     workdir_lock)
from jaxdiff import denoiser as denoiser_lib
from jaxdiff.denoiser import Denoiser
from jaxdiff.evaluation import metrics, panels
from jaxdiff.jobs import cli
from jaxdiff.metric_writer import MetricWriter

_Result = TypeVar("_Result")


class TrainingError(errors.JobError):
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


def is_due(step: int, every: int, last_step: int) -> bool:
  """The one rule for periodic work (checkpoints, sample grids, evaluation): every `every` steps
  and at the last step; `every` = 0 means never."""
  return every > 0 and (step % every == 0 or step == last_step)


def save_resolved_config(config, workdir: str) -> None:
  storage.write_text(storage.join(workdir, "config.json"),
                     config.to_json_best_effort(indent=2, sort_keys=True))


def loss_by_t_scalars(bin_sum: np.ndarray, bin_count: np.ndarray) -> dict:
  """{'loss_t_bin_0': mean loss of the first tenth of t, …}; bins with no draws are left out."""
  return {f"loss_t_bin_{i}": s / c for i, (s, c) in enumerate(zip(bin_sum, bin_count)) if c}


class LossHealth:
  """Whether the run is still training or has diverged, step by step.

  A step is unhealthy when its loss or gradient is non-finite, when its update is exploding
  (‖Δθ‖/‖θ‖ above `max_relative_update`), or when its loss spikes: above `spike_factor` × the
  median of the last `history` healthy losses (once `min_history` of them are known). The run
  has diverged after `max_bad_steps` unhealthy steps in a row. Unhealthy losses do not enter the
  history, so a run that explodes cannot raise its own baseline. Only the state after a healthy
  step is saved.
  """

  def __init__(self, max_bad_steps: int, spike_factor: float, max_relative_update: float,
               history: int = 200, min_history: int = 20):
    self.max_bad_steps, self.spike_factor = max_bad_steps, spike_factor
    self.max_relative_update, self.min_history = max_relative_update, min_history
    self.recent = collections.deque(maxlen=history)
    self.bad_in_a_row = 0
    self.last_good_loss = float("nan")
    self.reason = self.first_reason = ""  # the latest unhealthy step's, and its streak's first

  def update(self, step: int, loss: float, finite: bool, relative_update: float) -> None:
    if not finite:
      self.reason = f"the loss or gradient was non-finite (step {step})"
    elif relative_update > self.max_relative_update:
      self.reason = (f"the update at step {step} changed the parameters by {relative_update:.3g} "
                     f"of their norm (limit {self.max_relative_update:g})")
    elif len(self.recent) >= self.min_history and loss > self.spike_factor * np.median(self.recent):
      self.reason = (f"the loss spiked to {loss:.4g} at step {step}, over {self.spike_factor:g}× "
                     f"its running median {np.median(self.recent):.4g}")
    else:
      self.recent.append(loss)
      self.bad_in_a_row, self.last_good_loss, self.reason, self.first_reason = 0, loss, "", ""
      return
    if self.bad_in_a_row == 0:
      self.first_reason = self.reason
    self.bad_in_a_row += 1
    logging.warning("step %d: %s (%d unhealthy steps in a row)", step, self.reason,
                    self.bad_in_a_row)

  @property
  def healthy(self) -> bool:
    return self.bad_in_a_row == 0

  @property
  def diverged(self) -> bool:
    return self.bad_in_a_row >= self.max_bad_steps


class MetricsWindow:
  """The host side of the step metrics.

  `push(last_step, metrics)` takes a dispatched call's metrics (one step's, or K steps' stacked
  [K, ...] when `steps_per_call` = K) and reads the previous call's: one call late, so the device
  never waits for the host; `flush()` reads the last one. Every finished step updates `health`;
  every `log_every` steps (and at `last_step`) the window's means, steps/s, images/s and, from
  `flops_per_step` and the device's `peak` TFLOP/s, TFLOP/s per device and MFU are written, with
  `first_row` (e.g. the step's compile time) added to the first row. Time inside `paused()`
  (sampling, evaluation, checkpoint waits) is left out of the rates.
  """

  def __init__(self, writer: MetricWriter, health: LossHealth, *, log_every: int,
               batch_size: int, last_step: int, progress: tqdm, steps_per_call: int = 1,
               flops_per_step: float = 0.0, num_devices: int = 1, peak: float | None = None,
               first_row: dict | None = None):
    self.writer, self.health, self.progress = writer, health, progress
    self.log_every, self.batch_size, self.last_step = log_every, batch_size, last_step
    self.steps_per_call, self.flops_per_step = steps_per_call, flops_per_step
    self.num_devices, self.peak = num_devices, peak
    self._first_row = dict(first_row or {})
    self._pending = None
    self._finished = []
    self._start = time.perf_counter()
    self._paused_seconds = 0.0

  def push(self, last_step: int, call_metrics) -> None:
    self.flush()
    self._pending = (last_step, call_metrics)

  def flush(self) -> None:
    if self._pending is None:
      return
    (last_step, call_metrics), self._pending = self._pending, None
    call_metrics = jax.device_get(call_metrics)
    if self.steps_per_call == 1:
      rows = [call_metrics]
    else:
      rows = [{name: value[k] for name, value in call_metrics.items()}
              for k in range(self.steps_per_call)]
    for step, row in enumerate(rows, start=last_step - len(rows) + 1):
      self.health.update(step, float(row["loss"]), bool(row["finite"]),
                         float(row["relative_update"]))
      self._finished.append(row)
      self.progress.update(1)
      if step % self.log_every == 0 or step == self.last_step:
        self._write(step)

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused_seconds += time.perf_counter() - start

  def _write(self, step: int) -> None:
    seconds = max(time.perf_counter() - self._start - self._paused_seconds, 1e-9)
    history = self._finished
    finite = [m for m in history if m["finite"]]
    mean_of = lambda name: np.mean([m[name] for m in finite], axis=0) if finite else np.nan
    scalars = {
        "loss": mean_of("loss"),
        "grad_norm": mean_of("grad_norm"),
        "relative_update": mean_of("relative_update"),
        "learning_rate": history[-1]["learning_rate"],
        "steps_per_sec": len(history) / seconds,
        **telemetry.throughput(len(history), seconds, batch_size=self.batch_size,
                               flops_per_step=self.flops_per_step,
                               num_devices=self.num_devices, peak=self.peak),
        "nonfinite_steps": len(history) - len(finite),
        **self._first_row,
    }
    if finite:
      scalars.update(loss_by_t_scalars(mean_of("loss_bin_sum"), mean_of("loss_bin_count")))
    self.writer.write(step, scalars)
    postfix = dict(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_sec']:.0f}")
    if "mfu" in scalars:
      postfix["mfu"] = f"{scalars['mfu']:.0%}"
    self.progress.set_postfix(**postfix)
    self._finished, self._start, self._paused_seconds = [], time.perf_counter(), 0.0
    self._first_row = {}


def restore_or_init(config, denoiser: Denoiser, mesh, checkpointer: checkpoint.Checkpointer,
                    key):
  """(state, data iterator position or None): from `config.train.resume_step` if set, else the
  newest readable checkpoint, else a fresh state made from `key` with its shardings."""
  resume_step = config.train.get("resume_step")
  if resume_step is None and not checkpoint.list_steps(checkpointer.workdir):
    return train_step.create_state(denoiser, config.train, mesh, key), None
  try:
    restored = checkpointer.restore(train_step.abstract_state(denoiser, config.train, mesh),
                                    step=resume_step, config=config)
  except config_io.ConfigMismatchError as error:
    raise errors.UsageError(str(error)) from error
  return restored.state, restored.data_state


class _Outputs:
  """What the run writes besides metrics: EMA sample grids and denoising panels (as
  `config.sample` says), evaluations (`config.eval`'s metrics); each stops with
  `generate.Stopped` where `should_stop()` answers yes before one of its batches."""

  def __init__(self, config, workdir, denoiser: Denoiser, mesh, writer, key):
    self.workdir, self.denoiser, self.mesh, self.writer = workdir, denoiser, mesh, writer
    self.data_config, self.sample_config, self.eval_config = config.data, config.sample, config.eval
    panel_key, self.eval_key, self.sample_key = jax.random.split(key, 3)
    self.panel_x0, self.panel_noise = panels.panel_inputs(config.data, panel_key)

  def samples(self, step: int, ema_params, should_stop: Callable[[], bool]) -> None:
    grid = generate.sample_grid(self.denoiser, ema_params,
                                samplers.SamplingOptions.from_config(self.sample_config),
                                self.sample_config.num_samples, self.mesh,
                                jax.random.fold_in(self.sample_key, step), should_stop)
    panel = panels.panel(self.denoiser, ema_params, self.panel_x0, self.panel_noise)
    if jax.process_index() == 0:
      for folder, image in (("samples", grid), ("panels", panel)):
        images.save_png(storage.join(self.workdir, folder, f"step_{step:07d}.png"), image)
        self.writer.write_image(step, folder, image)

  def evaluation(self, step: int, ema_params, should_stop: Callable[[], bool]) -> None:
    start = time.perf_counter()
    request = metrics.Request.from_config(self.eval_config)._replace(should_stop=should_stop)
    scalars = metrics.training_scalars(self.denoiser, ema_params, self.data_config,
                                       self.eval_config.metrics, request, self.mesh,
                                       jax.random.fold_in(self.eval_key, step))
    self.writer.write(step, {**scalars, "eval/seconds": time.perf_counter() - start})


class PhemaSnapshotsDue:
  """The post-hoc EMA snapshots of a run (`checkpoint.PhemaSnapshots`), saved every
  `train.phema_every` steps and at the last one, of healthy states only; nothing when the run
  tracks no profiles."""

  def __init__(self, workdir: str, train_config):
    self.every, self.last_step = train_config.get("phema_every", 0), train_config.num_steps
    self.sigma_rels = train_step.phema_profiles(train_config)
    self.snapshots = (checkpoint.PhemaSnapshots(workdir, train_config.phema_keep or None)
                      if self.every else None)

  def save_if_due(self, step: int, averages, window: "MetricsWindow") -> None:
    if self.snapshots and is_due(step, self.every, self.last_step):
      window.flush()  # the health of `step` itself
      if window.health.healthy:
        with window.paused():
          self.snapshots.save(step, averages, self.sigma_rels)

  def close(self) -> None:
    if self.snapshots:
      self.snapshots.close()


class Profiler:
  """A `jax.profiler` trace of steps first..last (inclusive; with several steps per call, of the
  calls that hold them) into WORKDIR/profile, which TensorBoard's profile tab reads
  (`profile_steps` = () or (first, last), checked by `config_check`). `before` and `after` take
  a call's last step."""

  def __init__(self, profile_steps, workdir: str):
    self.steps = tuple(profile_steps)
    self.directory = storage.join(workdir, "profile")
    self.active = False

  def before(self, step: int) -> None:
    if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _diverged_message(health: LossHealth, workdir: str) -> str:
  steps = checkpoint.list_steps(workdir)
  on_disk = (f"The checkpoints in {workdir} (steps {steps}) were all saved while training was "
             f"healthy" if steps else f"There is no checkpoint in {workdir}")
  return (f"training diverged: {health.first_reason}; {health.bad_in_a_row} unhealthy steps in a "
          f"row (the last: {health.reason}), so the run stopped without saving. {on_disk}. Lower "
          f"--config.train.learning_rate (or check the data) and rerun; "
          f"--config.train.resume_step=N resumes from an earlier step N.")


def _resume(config, denoiser: Denoiser, mesh, checkpointer: checkpoint.Checkpointer, train_iter,
            key, workdir: str):
  """The state to train from (`restore_or_init`), the data iterator set to its position; once
  the run is known to go on from there in whole calls, the resolved config is written."""
  state, data_state = restore_or_init(config, denoiser, mesh, checkpointer, key)
  if data_state is not None:
    train_iter.set_state(data_state)
  first_step, last_step = int(state.step), config.train.num_steps
  steps_per_call = config.train.steps_per_call
  if (last_step - first_step) % steps_per_call:
    raise errors.UsageError(
        f"--config.train.steps_per_call={steps_per_call}: the run goes from step {first_step} to "
        f"{last_step}, which is not a whole number of calls; choose num_steps or resume_step so "
        f"that their difference is a multiple of {steps_per_call}")
  if jax.process_index() == 0:  # only once the config is known to continue what is on disk
    save_resolved_config(config, workdir)
  return state


def _metrics_window(config, denoiser: Denoiser, mesh, writer, health, first_step: int):
  """The compiled train step and the MetricsWindow that logs it (with its FLOPs, the device's
  peak and the compile time)."""
  train_config = config.train
  lowered_step = telemetry.lower_train_step(denoiser, config, mesh)
  compile_start = time.perf_counter()
  step_fn = lowered_step.compile()
  compile_seconds = time.perf_counter() - compile_start
  progress = tqdm(total=train_config.num_steps, initial=first_step,
                  disable=jax.process_index() != 0, unit="step", dynamic_ncols=True)
  window = MetricsWindow(
      writer, health, log_every=train_config.log_every, batch_size=train_config.batch_size,
      last_step=train_config.num_steps, progress=progress,
      steps_per_call=train_config.steps_per_call,
      flops_per_step=telemetry.step_flops(denoiser, config, mesh, lowered_step),
      num_devices=mesh.size,
      peak=telemetry.peak_tflops(jax.devices()[0].device_kind, denoiser.dtype,
                                 train_config.peak_tflops),
      first_row={"compile_seconds": compile_seconds})
  return step_fn, window


_REFUSALS = (errors.UsageError, errors.ArgumentError)


def agreed(action: Callable[[], _Result], what: str) -> _Result | None:
  """`action()` on process 0 alone, its outcome shared by every process, so that all refuse or
  all go on: where it raises, process 0 raises that and the others an error of the same kind
  (UsageError or JobError) saying that process 0 could not `what`. None on the other
  processes."""
  result, failure = None, None
  if jax.process_index() == 0:
    try:
      result = action()
    except Exception as error:  # pylint: disable=broad-exception-caught  (raised below)
      failure = error
  if jax.process_count() > 1:
    outcome = 0 if failure is None else 2 if isinstance(failure, _REFUSALS) else 1
    outcome = int(multihost_utils.broadcast_one_to_all(np.int32(outcome)))
    if outcome and failure is None:
      kind = errors.UsageError if outcome == 2 else errors.JobError
      raise kind(f"process 0 could not {what}; its error line says why")
  if failure is not None:
    raise failure
  return result


@contextlib.contextmanager
def owning(workdir: str):
  """The workdir's lock (`workdir_lock`), taken by process 0 for every process (`agreed`) and
  released on leaving, however that happens. A workdir that another live run holds, or that is
  a file, is refused (UsageError naming --workdir, and the holder). Yields a function that
  raises `workdir_lock.LockLost` on every process once the lock was taken away."""

  def take() -> workdir_lock.WorkdirLock:
    with cli.naming_flags():
      return workdir_lock.acquire(workdir)

  lock = agreed(take, f"take the lock of {workdir}")
  try:
    yield lambda: agreed(lambda: lock.check(), f"keep the lock of {workdir}")
  finally:
    if lock is not None:
      lock.release()


def _close_all(*closes: Callable[[], None]) -> None:
  """Call each of `closes` whatever the others raise. Where an error is already propagating
  (this runs in a `finally`), their failures are added to it as notes (shown with --verbose)
  and it goes on; otherwise the first failure is raised after all of them ran."""
  in_flight = sys.exc_info()[1]
  failures = []
  for close in closes:
    try:
      close()
    except Exception as error:  # pylint: disable=broad-exception-caught  (raised or noted below)
      failures.append(error)
  if in_flight is not None:
    for failure in failures:
      in_flight.add_note(f"while closing: {type(failure).__name__}: {errors.one_line(failure)}")
  elif failures:
    raise failures[0]


def run(config, workdir: str) -> TrainSummary:
  """Train `config` in `workdir` until config.train.num_steps; returns a summary. The config is
  checked before anything is written; the workdir is owned (`owning`) from its first write."""
  workdir = storage.resolve(workdir)
  config_check.check_train_config(config, jax.device_count(), jax.process_count())
  with owning(workdir) as check_lock:
    return _train(config, workdir, check_lock)


def _train(config, workdir: str, check_lock: Callable[[], None]) -> TrainSummary:
  """`run` once the config is checked and the workdir is owned."""
  train_config = config.train
  is_chief = jax.process_index() == 0
  mesh = parallel.make_mesh(mesh_config=config.mesh)
  profiler = Profiler(train_config.profile_steps, workdir)
  if train_config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(train_config.compilation_cache_dir))
  storage.makedirs(workdir)

  denoiser = denoiser_lib.from_config(config)
  init_key, outputs_key = jax.random.split(jax.random.key(config.seed))
  steps_per_call, last_step = train_config.steps_per_call, train_config.num_steps
  train_iter = data.make_train_iterator(config.data, train_config.batch_size, config.seed, mesh,
                                        steps_per_call=steps_per_call)
  checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=train_config.max_to_keep)
  state = _resume(config, denoiser, mesh, checkpointer, train_iter, init_key, workdir)
  first_step = int(state.step)
  writer = MetricWriter(workdir, train_config.get("metric_sinks", metric_writer.DEFAULT_SINKS),
                        enabled=is_chief)
  outputs = _Outputs(config, workdir, denoiser, mesh, writer, outputs_key)
  health = LossHealth(train_config.max_nonfinite_steps, train_config.spike_factor,
                      train_config.max_relative_update)
  step_fn, window = _metrics_window(config, denoiser, mesh, writer, health, first_step)
  start_time, step, stop = time.perf_counter(), first_step, cli.StopSignal()
  snapshots = PhemaSnapshotsDue(workdir, train_config)

  def save_if_healthy(step: int, *, wait: bool = False) -> None:
    check_lock()
    window.flush()  # the health of `step` itself
    if health.healthy:
      with window.paused():
        checkpointer.save(step, state, train_iter.get_state(), config, wait=wait)
    else:
      logging.warning("step %d not saved: %s", step, health.reason)

  with stop.installed():  # to the end: a signal while closing is noted, not an exit 143
    try:
      for step in range(first_step + steps_per_call, last_step + 1, steps_per_call):
        profiler.before(step)
        state, call_metrics = step_fn(state, next(train_iter))
        profiler.after(step, state)
        window.push(step, call_metrics)
        if health.diverged:
          raise TrainingError(_diverged_message(health, workdir))
        stopping = stop.should_stop()
        final = step == last_step or stopping
        if final or is_due(step, train_config.checkpoint_every, last_step):
          save_if_healthy(step, wait=final)
        snapshots.save_if_due(step, state.phema, window)
        if not stopping:
          try:
            with window.paused():
              if is_due(step, train_config.sample_every, last_step):
                outputs.samples(step, state.ema_params, stop.should_stop)
              if is_due(step, train_config.eval_every, last_step):
                outputs.evaluation(step, state.ema_params, stop.should_stop)
          except generate.Stopped:  # between two batches of a grid or an evaluation
            stopping = True
            save_if_healthy(step, wait=True)
        if stopping:
          logging.warning("received %s: stopped at step %d", stop.received.name, step)
          break
      window.flush()
      if not health.healthy:
        raise TrainingError(_diverged_message(health, workdir))
    finally:
      _close_all(profiler.close, window.progress.close, checkpointer.close, snapshots.close,
                 writer.close)
    if is_chief:
      visualize.plot_losses(storage.join(workdir, "metrics.jsonl"),
                            storage.join(workdir, "losses.png"))
  return TrainSummary(first_step, step, time.perf_counter() - start_time, health.last_good_loss,
                      workdir, preempted=bool(stop.received))
