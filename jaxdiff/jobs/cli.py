"""The error contract of train.py, sample.py and evaluate.py (see `errors`), around absl's app.

  from jaxdiff.jobs import cli
  _CONFIG = cli.define_config_file("configs/default.py", "Config file ...")
  ...
  if __name__ == "__main__":
    cli.run(main)

A bad input (a flag that does not parse, a missing config file, an unknown config field, an
`errors.UsageError`, a library's `errors.ArgumentError` that no job named a flag for, or
absl's `app.UsageError` from `main`) prints one line `error: …` on stderr and exits 2; a failure
at run time (`errors.JobError`, or any other exception) prints one line and exits 1; a program
stopped by a signal before it finished (`Interrupted`, or Ctrl-C anywhere in `main`) prints one
line and exits 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C). With --verbose, or
TRACEBACK_ENV=1 in the environment, the traceback is printed before that line; without, what
libraries print of a failure they also raise (Orbax, TensorStore, gcsfs, asyncio) is dropped
(`contain_library_output`), and a process whose library threads are stuck (Orbax's, after a
failed save) ends without waiting for them.

SIGTERM and Ctrl-C: where a `StopSignal` listens, they are acted on at the next point where
stopping is clean (between train steps, between batches of samples): train.py saves the step and
exits 0; sample.py and evaluate.py, which write nothing until their work is done, stop
(`stoppable`: exit 128 + the signal's number). Elsewhere (starting up) they stop the program at
once, with that exit code too.
"""

import contextlib
import dataclasses
import difflib
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import jax
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from jaxdiff import config_io, errors, generate, samplers, validation

TRACEBACK_ENV = "JAXDIFF_TRACEBACK"
CONFIG_FLAG = "config"
USAGE_EXIT_CODE = 2
FAILURE_EXIT_CODE = 1
SIGNAL_EXIT_CODE_BASE = 128  # the shell's convention: 143 for SIGTERM, 130 for Ctrl-C
# How long a failing program waits for the library threads still running before it ends
# without them (Orbax's wait 300 s for a signal that a failed save never sends).
THREADS_GRACE_S = 5.0

_VERBOSE = flags.DEFINE_bool("verbose", False,
                             f"On an error, also print the traceback (or set {TRACEBACK_ENV}=1).")
# An error met while defining the config flag (absl parses the default config and its overrides
# then), reported when the program starts.
_define_errors: list[errors.UsageError] = []


def wants_traceback(argv: Sequence[str]) -> bool:
  """--verbose on the command line (parsed or not yet), or TRACEBACK_ENV set to a non-empty,
  non-zero value."""
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  if flags.FLAGS.is_parsed():
    return _VERBOSE.value
  return any(arg in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for arg in argv)


class Interrupted(Exception):
  """The program was stopped by a signal (`signum`) before it finished."""

  def __init__(self, signum: signal.Signals, what: str):
    super().__init__(f"{signum.name} received: {what}")
    self.signum = signum


def _interrupt(signum, frame) -> None:
  del frame
  raise Interrupted(signal.Signals(signum), "stopped before finishing")


class StopSignal:
  """When to stop early on SIGTERM or Ctrl-C (SIGINT): `should_stop()` is asked where stopping
  is clean (between train steps, between batches of samples) and says whether to stop there.

  One process: the signal sets `received` (a `signal.Signals`). Several processes: SIGTERM to
  any one of them reaches all through JAX's coordination service (its preemption notifier owns
  SIGTERM, so no Python handler is installed), and `should_stop()` answers yes on every process
  at the same call: `multihost_utils.reached_preemption_sync_point` of the number of calls so
  far, which grows alike on every process because all of them ask at the same points. So all
  of them stop at the same step or batch, and none is left waiting in a collective.
  """

  def __init__(self):
    self.received: signal.Signals | None = None
    self._asked = 0

  def should_stop(self) -> bool:
    self._asked += 1
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(self._asked):
      self.received = signal.SIGTERM
    return self.received is not None

  @contextlib.contextmanager
  def installed(self):
    if jax.process_count() > 1:
      yield self
      return

    def handler(signum, frame):
      del frame
      self.received = signal.Signals(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in previous.items():
        signal.signal(s, h)


@contextlib.contextmanager
def stoppable():
  """For the programs that write nothing until their work is done (sample.py, evaluate.py):
  inside, SIGTERM and Ctrl-C stop the work before its next batch. Yields the StopSignal whose
  `should_stop` the batch loops ask; the `generate.Stopped` they raise leaves as Interrupted
  (nothing was written). A signal after the last batch lets the writing finish."""
  stop = StopSignal()
  with stop.installed():
    try:
      yield stop
    except generate.Stopped as error:
      raise Interrupted(stop.received, f"{error}; nothing was written") from error


class _RaisedFailures(logging.Filter):
  """Drops the records at ERROR and above of a library (the modules under `package`, or all of
  the logger's where it is '') that logs a failure, with its traceback, and raises it too: the
  program says it in its one line."""

  def __init__(self, package: str = ""):
    super().__init__()
    self.marker = f"{os.sep}{package}{os.sep}" if package else ""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or self.marker not in record.pathname


# Orbax logs through absl's logger; gcsfs's retries and asyncio's unretrieved task errors
# through their own.
_LIBRARY_FILTERS = {"absl": _RaisedFailures("orbax"), "gcsfs": _RaisedFailures(),
                    "asyncio": _RaisedFailures()}


def _dropped(*args) -> None:
  del args


def contain_library_output(contained: bool = True) -> None:
  """Drop (or, `contained` False, print as Python does) what libraries print of failures that
  also reach the program as exceptions: the error records of the loggers in _LIBRARY_FILTERS,
  and what reaches sys.excepthook and sys.unraisablehook, which the programs themselves never
  leave to them (every exception of `main` is caught). After a failed save, TensorStore's
  callbacks (under Orbax) still complete into the closed asyncio loops of Orbax's threads and
  at the interpreter's exit, and print each failure there (PyErr_Print, PyErr_WriteUnraisable):
  tens of tracebacks."""
  for name, record_filter in _LIBRARY_FILTERS.items():
    if contained:
      logging.getLogger(name).addFilter(record_filter)
    else:
      logging.getLogger(name).removeFilter(record_filter)
  sys.excepthook = _dropped if contained else sys.__excepthook__
  sys.unraisablehook = _dropped if contained else sys.__unraisablehook__


def _stuck_threads(grace_s: float) -> list[threading.Thread]:
  """The threads that would keep the interpreter from exiting (not daemons, not this one) and
  are still running after `grace_s` seconds in all."""
  deadline = time.monotonic() + grace_s
  stuck = []
  for thread in threading.enumerate():
    if thread is threading.current_thread() or thread.daemon:
      continue
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
      stuck.append(thread)
  return stuck


def exit_with(error: BaseException, exit_code: int, argv: Sequence[str]) -> None:
  """Print `error: <message>` as one line on stderr (after the traceback, if asked for) and exit;
  without waiting for library threads that are stuck (`_stuck_threads`)."""
  if wants_traceback(argv):
    traceback.print_exception(error)
  message = errors.one_line(error)
  if not isinstance(error, (errors.UsageError, errors.ArgumentError, errors.JobError,
                            app.UsageError, flags.Error, Interrupted)):
    message = (f"unexpected {type(error).__name__}: {message} (rerun with --verbose or "
               f"{TRACEBACK_ENV}=1 for the traceback)")
  print(f"error: {message}", file=sys.stderr, flush=True)
  if _stuck_threads(THREADS_GRACE_S):
    sys.stdout.flush()
    os._exit(exit_code)  # pylint: disable=protected-access  (the interpreter would join them)
  sys.exit(exit_code)


def config_field_names(config, prefix: str = "") -> list[str]:
  """Every dotted field name of a ConfigDict, leaves and sections: ['data', 'data.dataset', …]."""
  names = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    names.append(name)
    if hasattr(value, "items"):
      names.extend(config_field_names(value, f"{name}."))
  return names


def override_fields(argv: Sequence[str], flag_name: str = CONFIG_FLAG) -> list[str]:
  """The dotted fields the command line overrides: --config.train.batch_size=64 → 'train.batch_size'
  (also --noconfig.x and --config.x VALUE)."""
  pattern = re.compile(rf"^--?(no)?{re.escape(flag_name)}\.([^=]+)")
  return [match.group(2) for arg in argv if (match := pattern.match(arg))]


def config_path(argv: Sequence[str], default: str, flag_name: str = CONFIG_FLAG) -> str:
  """The config file the command line names (--config=PATH or --config PATH), else `default`."""
  path = default
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{flag_name}=") or arg.startswith(f"-{flag_name}="):
      path = arg.split("=", 1)[1]
    elif arg in (f"--{flag_name}", f"-{flag_name}") and index + 1 < len(argv):
      path = argv[index + 1]
  return path


def unknown_field_error(config, fields: Sequence[str],
                        flag_name: str = CONFIG_FLAG) -> errors.UsageError | None:
  """A one-line error for the first of `fields` that `config` does not have, naming the nearest
  real fields; None when it has them all."""
  names = config_field_names(config)
  for field in fields:
    if config_io.lookup(config, field) is config_io.ABSENT:
      nearest = difflib.get_close_matches(field, names, n=3, cutoff=0.5)
      hint = (f"the nearest are {', '.join(f'--{flag_name}.{name}' for name in nearest)}"
              if nearest else f"see the fields of the --{flag_name} file")
      return errors.UsageError(f"--{flag_name}.{field}: the config has no such field; {hint}")
  return None


def load_config_error(path: str, flag_name: str = CONFIG_FLAG) -> errors.UsageError | None:
  """A one-line error when the config file `path` (PATH or PATH:ARGUMENT) cannot be loaded."""
  file_path = path.split(":", 1)[0]
  if not os.path.isfile(file_path):
    return errors.UsageError(
        f"--{flag_name}={path}: no such file (relative paths start at {os.getcwd()}); give a "
        f"config file such as configs/default.py")
  return None


def override_error(error: Exception, argv: Sequence[str], default: str,
                   flag_name: str = CONFIG_FLAG) -> errors.UsageError:
  """What went wrong while parsing the config flag, as one line: a missing file, an unknown
  field, or the loader's own message."""
  path = config_path(argv, default, flag_name)
  missing = load_config_error(path, flag_name)
  if missing:
    return missing
  try:
    config = config_flags.config_flags.ConfigFileFlagParser(flag_name).parse(path)
    unknown = unknown_field_error(config, override_fields(argv, flag_name), flag_name)
  except Exception:  # pylint: disable=broad-exception-caught  (reported below as it came)
    unknown = None
  return unknown or errors.UsageError(
      f"--{flag_name}={path}: cannot load it with its overrides: {type(error).__name__}: {error}")


def define_config_file(default: str, help_string: str,
                       flag_name: str = CONFIG_FLAG) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file(flag_name, default, help_string)`, whose failures (an
  unknown override while the default config is parsed at definition) are reported by `run`."""
  try:
    return config_flags.DEFINE_config_file(flag_name, default, help_string)
  except Exception as error:  # pylint: disable=broad-exception-caught  (reported by `run`)
    _define_errors.append(override_error(error, sys.argv, default, flag_name))
    return config_flags.DEFINE_config_file(flag_name, default, help_string, sys_argv=sys.argv[:1])


def default_config_path() -> str:
  """The config flag's default file ('' when the program has no config flag)."""
  if CONFIG_FLAG not in flags.FLAGS:
    return ""
  return flags.FLAGS[CONFIG_FLAG].default_as_str.strip("'")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with the contract: any failure is one line and exit 2."""
  if _define_errors:
    exit_with(_define_errors[0], USAGE_EXIT_CODE, argv)
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as error:
    exit_with(errors.UsageError(f"{error} (see --helpfull)"), USAGE_EXIT_CODE, argv)
  except Exception as error:  # pylint: disable=broad-exception-caught  (ml_collections' KeyError)
    exit_with(override_error(error, argv, default_config_path()), USAGE_EXIT_CODE, argv)
  if CONFIG_FLAG in flags.FLAGS:
    try:
      flags.FLAGS[CONFIG_FLAG].value.keys()
    except OSError as error:  # ml_collections defers a failed load to the first use
      path = config_path(argv, default_config_path())
      exit_with(load_config_error(path) or errors.UsageError(f"--{CONFIG_FLAG}={path}: {error}"),
                USAGE_EXIT_CODE, argv)
  return remaining


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with the error contract of this module."""

  def guarded_main(argv: list[str]) -> Any:
    contain_library_output(not wants_traceback(argv))
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C, where no StopSignal listens
    try:
      return main(argv)
    except (errors.UsageError, errors.ArgumentError, app.UsageError) as error:
      exit_with(error, USAGE_EXIT_CODE, argv)
    except Interrupted as error:
      exit_with(error, SIGNAL_EXIT_CODE_BASE + error.signum, argv)
    except KeyboardInterrupt:  # Ctrl-C where no StopSignal listens
      exit_with(Interrupted(signal.SIGINT, "stopped before finishing"),
                SIGNAL_EXIT_CODE_BASE + signal.SIGINT, argv)
    except Exception as error:  # pylint: disable=broad-exception-caught  (the contract: one line)
      exit_with(error, FAILURE_EXIT_CODE, argv)

  app.run(guarded_main, flags_parser=parse_flags)


@contextlib.contextmanager
def naming_flags(prefix: str = "", **flag_of):
  """An `errors.ArgumentError` raised inside becomes the UsageError of the flag that set the
  argument: --PREFIX<name>=VALUE, or --<flag_of[name]> where the flag's name differs."""
  try:
    yield
  except errors.ArgumentError as error:
    raise errors.usage_error(flag_of.get(error.name, prefix + error.name), error) from error


FALLBACK_NUM_STEPS = 20  # with a sampler other than the model's own and no --num_steps


class SamplingFlags:
  """The flags sample.py and evaluate.py share: how to sample (--sampler, --num_steps,
  --spacing, --clip_x0, --threshold_percentile, --guidance_scale), each defaulting to the
  model's own sampling section, and the network's compute --dtype. Defined once per program:
  `_SAMPLING = cli.SamplingFlags()` at module level."""

  def __init__(self):
    self.sampler = flags.DEFINE_string(
        "sampler", None, f"One of {', '.join(samplers.SAMPLERS)} (default: the model's own, "
        "config.sample or config.eval).")
    self.num_steps = flags.DEFINE_integer(
        "num_steps", None, f"Sampling steps, 1 … T (default: the model's own; with another "
        f"--sampler, {FALLBACK_NUM_STEPS}).")
    self.spacing = flags.DEFINE_string(
        "spacing", None, f"Timesteps kept, one of {', '.join(samplers.SPACINGS)} (default: the "
        "model's own, else the sampler's: logsnr for the DPM-Solvers, else uniform).")
    self.clip_x0 = flags.DEFINE_bool(
        "clip_x0", None, "Clip x̂0 to [-1, 1] (default: the model's own, else yes for ddpm and "
        "ddim, no for the DPM-Solvers).")
    self.threshold_percentile = flags.DEFINE_float(
        "threshold_percentile", None, "Dynamic thresholding of x̂0 at this quantile of |x̂0|, "
        "e.g. 0.995 (Imagen). Default: the model's own, else none.")
    self.guidance_scale = flags.DEFINE_float(
        "guidance_scale", None, "Classifier-free guidance w (default: the model's own, else 0: "
        "the plain conditional model).")
    self.s_churn = flags.DEFINE_float(
        "s_churn", None, "edm_stochastic's S_churn: the noise added back each step (default 0: "
        "the Heun sampler).")
    self.s_tmin = flags.DEFINE_float("s_tmin", None, "edm_stochastic's S_tmin (default 0).")
    self.s_tmax = flags.DEFINE_float("s_tmax", None, "edm_stochastic's S_tmax (default ∞).")
    self.s_noise = flags.DEFINE_float("s_noise", None, "edm_stochastic's S_noise (default 1).")
    self.dtype = flags.DEFINE_string(
        "dtype", None, f"The network's compute dtype, {' or '.join(validation.COMPUTE_DTYPES)} "
        "(default: the model's config.model.dtype). Params, time and the sampler stay float32.")

  def given(self) -> dict:
    """The sampling flags given on the command line (not --dtype), as SamplingOptions fields."""
    return {name: holder.value for name, holder in vars(self).items()
            if name != "dtype" and holder.value is not None}


def check_sampling_flags(given: dict) -> None:
  """UsageError for a sampling flag given (`SamplingFlags.given`) that is bad whatever the model,
  before any model loads (a sampler's own option, such as eta, only with --sampler)."""
  own_options = {name for registered in samplers.SAMPLERS.values() for name in registered.options}
  with naming_flags():
    samplers.SamplingOptions(**{name: value for name, value in given.items()
                                if name not in own_options or "sampler" in given})


def sampling_options(section, given: dict) -> samplers.SamplingOptions:
  """How to sample a model: its own sampling `section` (`config.sample` or `config.eval`),
  overridden by `given` (the flags given, `SamplingFlags.given`, and batch_size, eta, …). A
  sampler other than the section's drops the section (its steps, spacing and x̂0 policy were
  chosen for its own sampler; steps then default to FALLBACK_NUM_STEPS). UsageError naming the
  flag of a bad value."""
  own = samplers.SamplingOptions.from_config(section)
  if given.get("sampler", own.sampler) != own.sampler:
    own = samplers.SamplingOptions(sampler=given["sampler"], num_steps=FALLBACK_NUM_STEPS,
                                   batch_size=own.batch_size)
  with naming_flags():
    return dataclasses.replace(own, **given)
