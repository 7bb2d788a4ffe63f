"""The programs' error contract: a bad input is one line on stderr and exit 2, before anything is
written; a failure at run time one line and exit 1; the traceback only when asked for."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
from ml_collections import config_dict

from configs import default
from jaxdiff import errors, generate
from jaxdiff.evaluation import metrics
from jaxdiff.jobs import cli

REPO = pathlib.Path(__file__).resolve().parents[1]

# A program wired as train.py is: the config flag from `cli`, the whole config checked before the
# workdir is made, `cli.run` around main. It imports config_check (and so JAX and TFDS) only in
# main, so that the flag-parsing cases take a fraction of a second.
PROGRAM = textwrap.dedent("""
    import os
    from absl import flags, logging
    from jaxdiff import errors
    from jaxdiff.jobs import cli

    _CONFIG = cli.define_config_file("configs/default.py", "Config file.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where everything goes.")
    _FAIL = flags.DEFINE_enum("fail", None, ["job", "bug"], "Fail at run time this way.")

    def main(argv):
      logging.set_verbosity(logging.WARNING)
      if _FAIL.value == "job":
        raise errors.JobError("the job could not go on")
      if _FAIL.value == "bug":
        raise KeyError("a bug")
      from jaxdiff import config_check
      config_check.check_train_config(_CONFIG.value, 1, 1)
      os.makedirs(_WORKDIR.value)

    if __name__ == "__main__":
      cli.run(main)
""")


# name: (command-line arguments, extra environment)
CASES = {
    "missing_config_file": (["--config=configs/nope.py"], {}),
    "unknown_override": (["--config.train.batch_siz=64"], {}),
    "unknown_override_after_config": (["--config=configs/default.py",
                                       "--config.train.nosuch.x=3"], {}),
    "value_of_the_wrong_type": (["--config.train.batch_size=many"], {}),
    "value_out_of_range": (["--config.train.batch_size=0"], {}),
    "unknown_flag": (["--batch_size=3"], {}),
    "job": (["--fail=job"], {}),
    "bug": (["--fail=bug"], {}),
    "job_verbose": (["--fail=job", "--verbose"], {}),
    "usage_with_traceback_env": (["--config.train.num_steps=0"], {cli.TRACEBACK_ENV: "1"}),
    "valid": ([], {}),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
  """Runs the program once per case, all at once; {case: (exit code, stderr lines, workdir)}."""
  root = tmp_path_factory.mktemp("program")
  program = root / "program.py"
  program.write_text(PROGRAM)
  environment = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                 "TF_CPP_MIN_LOG_LEVEL": "3", cli.TRACEBACK_ENV: ""}
  started = {}
  for name, (args, env) in CASES.items():
    workdir = root / name
    started[name] = (workdir, subprocess.Popen(
        [sys.executable, str(program), f"--workdir={workdir}", *args,
         f"--config.data.data_dir={root / 'tensorflow_datasets'}"], cwd=REPO,
        env={**environment, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  finished = {}
  for name, (workdir, process) in started.items():
    _, stderr = process.communicate(timeout=120)
    finished[name] = (process.returncode, stderr.splitlines(), workdir)
  return finished


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_exit_2_with_nothing_written(results):
  expected = {
      "missing_config_file": f"error: --config=configs/nope.py: no such file (relative paths "
                             f"start at {REPO}); give a config file such as configs/default.py",
      "unknown_override": "error: --config.train.batch_siz: the config has no such field; the "
                          "nearest are --config.train.batch_size, --config.eval.batch_size, "
                          "--config.sample.batch_size",
      "unknown_override_after_config": "error: --config.train.nosuch.x: the config has no such "
                                       "field; the nearest are",
      "value_of_the_wrong_type": "error: flag --config.train.batch_size=many: invalid literal "
                                 "for int()",
      "value_out_of_range": "error: --config.train.batch_size=0: expected a whole number ≥ 1",
      "unknown_flag": "error: Unknown command line flag 'batch_size'",
  }
  for name, start in expected.items():
    exit_code, lines, workdir = results[name]
    assert (exit_code, len(lines)) == (2, 1), (name, lines)
    assert lines[0].startswith(start), (name, lines)
    assert not workdir.exists(), name


@pytest.mark.slow
def test_a_valid_command_runs(results):
  exit_code, lines, workdir = results["valid"]
  assert exit_code == 0, lines
  assert workdir.is_dir()


@pytest.mark.slow
def test_run_time_failures_are_one_line_and_exit_1_the_traceback_on_request(results):
  assert results["job"][:2] == (1, ["error: the job could not go on"])
  assert results["bug"][:2] == (1, [
      "error: unexpected KeyError: 'a bug' (rerun with --verbose or JAXDIFF_TRACEBACK=1 for the "
      "traceback)"])
  exit_code, lines, _ = results["job_verbose"]
  assert exit_code == 1 and lines[0] == "Traceback (most recent call last):"
  assert lines[-1] == "error: the job could not go on"
  exit_code, lines, workdir = results["usage_with_traceback_env"]
  assert exit_code == 2 and lines[0] == "Traceback (most recent call last):"
  assert lines[-1] == "error: --config.train.num_steps=0: expected a whole number ≥ 1"
  assert not workdir.exists()


def test_an_unknown_field_names_the_nearest_real_ones():
  config = default.get_config()
  error = cli.unknown_field_error(config, ["train.batch_size", "model.chmult"])
  assert isinstance(error, errors.UsageError)
  assert str(error) == ("--config.model.chmult: the config has no such field; the nearest are "
                        "--config.model.ch_mult, --config.model.ch, --config.model.remat")
  assert cli.unknown_field_error(config, ["train.batch_size", "diffusion.schedule_kwargs"]) is None
  assert str(cli.unknown_field_error(config, ["zzzz"])) == (
      "--config.zzzz: the config has no such field; see the fields of the --config file")


def test_override_fields_and_config_path_read_the_command_line():
  argv = ["train.py", "--config", "configs/cifar10.py", "--config.train.batch_size=64",
          "--noconfig.data.random_flip", "--workdir=w", "--config.model.ch", "32"]
  assert cli.override_fields(argv) == ["train.batch_size", "data.random_flip", "model.ch"]
  assert cli.config_path(argv, "configs/default.py") == "configs/cifar10.py"
  assert cli.config_path(["train.py"], "configs/default.py") == "configs/default.py"
  names = cli.config_field_names(config_dict.ConfigDict({"a": 1, "b": {"c": 2}}))
  assert names == ["a", "b", "b.c"]


def test_a_signal_is_heard_at_the_next_batch_and_stoppable_work_ends_as_interrupted():
  stop = cli.StopSignal()
  with stop.installed():
    assert not stop.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop() and stop.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
  batches = metrics._stoppable(iter(["a", "b", "c"]), iter([False, True]).__next__)
  assert next(batches) == "a"
  with pytest.raises(generate.Stopped, match="stopped after 1 bits/dim batches"):
    next(batches)
  with pytest.raises(cli.Interrupted) as interrupted:
    with cli.stoppable() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.should_stop()
      raise generate.Stopped(2, 5)
  assert interrupted.value.signum == signal.SIGINT
  assert str(interrupted.value) == ("SIGINT received: stopped after 2 of 5 sampling batches; "
                                    "nothing was written")


def test_library_failure_records_are_dropped_only_where_contained():
  record = logging.LogRecord("absl", logging.ERROR, "/x/site-packages/orbax/checkpoint/future.py",
                             387, "failed", None, None)
  ours = logging.LogRecord("absl", logging.ERROR, "/x/jaxdiff/checkpoint.py", 1, "ours", None, None)
  absl_logger = logging.getLogger("absl")
  try:
    cli.contain_library_output(True)
    assert not absl_logger.filter(record) and absl_logger.filter(ours)
  finally:
    cli.contain_library_output(False)
  assert absl_logger.filter(record)
