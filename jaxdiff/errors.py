"""The error contract: every error a user can cause or meet says in one line what is wrong, with
the flag or field and its value, and what to do.

  ArgumentError  raised by the library: an argument outside what a function accepts, as
                 NAME = VALUE: PROBLEM. The library never knows which flag or config field set
                 the argument; `jobs/` and `config_check` do, and say it (`UsageError`).
  UsageError     a bad flag, config value or path, refused before anything is written: exit 2.
                 Raised only by `jobs/`, `config_check` and the programs.
  JobError       a failure while the job runs (unreadable checkpoints, a diverged run, a failed
                 write): exit 1. `checkpoint.CheckpointError` and `TrainingError` are JobErrors.
"""


class ArgumentError(ValueError):
  """An argument outside what a library function accepts: its `name`, its `value` and the
  `problem` (what it must be, what to do), said once here so that every caller words it alike."""

  def __init__(self, name: str, value, problem: str):
    super().__init__(f"{name} = {value!r}: {problem}")
    self.name, self.value, self.problem = name, value, problem


class UsageError(ValueError):
  """Bad input: the message names the flag or config field, its value and what to do."""


class JobError(RuntimeError):
  """The job could not go on; the message says what is on disk and what to do."""


def one_line(message, limit: int | None = None) -> str:
  """`message` with every run of whitespace (newlines too) as one space, cut to `limit`
  characters (' ...' marking the cut)."""
  text = " ".join(str(message).split())
  return text if limit is None or len(text) <= limit else text[:limit] + " ..."


def usage_error(flag: str, error: ArgumentError) -> UsageError:
  """`error` said as the user gave the argument: '--FLAG=VALUE: PROBLEM', FLAG being the flag or
  config field that set it (e.g. 'num_steps' or 'config.sample.num_steps')."""
  return UsageError(f"--{flag}={error.value}: {one_line(error.problem)}")
