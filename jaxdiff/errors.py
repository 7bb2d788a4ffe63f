"""The programs' error contract: every error a user can cause or meet says in one line what is
wrong, with the flag or field and its value, and what to do.

  UsageError  a bad flag, config value or path, refused before anything is written: exit 2.
  JobError    a failure while the job runs (unreadable checkpoints, a diverged run, a failed
              write): exit 1. `checkpoint.CheckpointError` and `TrainingError` are JobErrors.
"""


class UsageError(ValueError):
  """Bad input: the message names the flag or config field, its value and what to do."""


class JobError(RuntimeError):
  """The job could not go on; the message says what is on disk and what to do."""
