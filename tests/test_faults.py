"""Faults injected into the real programs (issue 31): each ends in the README's one `error:` line
(or none, where it is a clean stop) with no traceback, the documented exit code, and nothing
lost on disk. The local situations run side by side, each in one train.py process started by
the module's `local_runs`; the gs:// ones on the session's GCS emulator."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxdiff import checkpoint, config_check, storage, workdir_lock
from tests.helpers import REPO, job_config

# A one-level, 8-channel U-Net (seconds to compile); no checkpoints, grids or evaluations unless
# a situation asks for them.
TINY = {"model.ch": 8, "model.ch_mult": "(1,)", "model.num_res_blocks": 1,
        "model.attn_resolutions": "()", "train.batch_size": 16, "train.warmup_steps": 1,
        "train.log_every": 1, "train.checkpoint_every": 0, "train.sample_every": 0,
        "train.eval_every": 0, "train.num_steps": 2}
# The end-of-run grid of the SIGTERM situation: 40 batches of 100 DDIM steps, about a minute here
# (a batch, the longest a stop waits, about a second).
LONG_GRID = {"train.sample_every": 2, "sample.num_samples": 640, "sample.batch_size": 16,
             "sample.sampler": "ddim", "sample.num_steps": 100}
WAIT_S = 180  # the longest any one process here may take


def train_py(workdir: str, data_dir: str, **overrides) -> list[str]:
  """The train.py command line of TINY with `overrides` (config fields, '.' as '__')."""
  fields = {**TINY, "data.data_dir": data_dir,
            **{name.replace("__", "."): value for name, value in overrides.items()}}
  return [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
          *(f"--config.{name}={value}" for name, value in fields.items())]


def start(command: list[str], **env) -> subprocess.Popen:
  return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(process: subprocess.Popen, timeout_s: float = WAIT_S) -> tuple[int, str, list[str]]:
  """(exit code, stdout, stderr lines) once `process` ends (asked again: the same); killed and
  failed after `timeout_s`."""
  if hasattr(process, "outcome"):
    return process.outcome
  try:
    stdout, stderr = process.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    process.kill()
    stdout, stderr = process.communicate()
    pytest.fail(f"still running after {timeout_s} s:\n{stderr[-3000:]}")
  process.outcome = process.returncode, stdout, stderr.splitlines()
  return process.outcome


def error_lines(stderr: list[str]) -> list[str]:
  """The `error:` lines of `stderr`, once it is known to hold nothing that a library printed of
  a failure: no traceback, no absl error record (Orbax's), no exception ignored at exit, no
  coroutine never awaited."""
  printed = [line for line in stderr if "Traceback" in line or re.match(r"E\d{4} ", line)
             or "Exception" in line or "never awaited" in line]
  assert not printed, "\n".join(stderr)
  return [line for line in stderr if line.startswith("error:")]


def wait_for(condition, what: str, process: subprocess.Popen) -> None:
  deadline = time.monotonic() + WAIT_S
  while not condition():
    assert process.poll() is None, f"ended before {what}: {process.communicate()[1][-3000:]}"
    assert time.monotonic() < deadline, f"no {what} after {WAIT_S} s"
    time.sleep(0.2)


def holds_lock(path: str, process: subprocess.Popen) -> bool:
  """Whether the lock file or object `path` names `process` as its holder."""
  try:
    return workdir_lock.Holder.from_bytes(storage.read_text(path).encode()).pid == process.pid
  except (FileNotFoundError, OSError):
    return False


def refusal_of(workdir: str, holder: subprocess.Popen) -> str:
  """The start of the line that refuses a second run on `workdir` while `holder` owns it."""
  return (f"error: --workdir={workdir}: in use by another run: process {holder.pid} on host "
          f"{socket.gethostname()} (started ")


def dead_pid() -> int:
  """The id of a process of this host that has ended."""
  ended = subprocess.Popen(["true"])
  ended.wait()
  return ended.pid


def closed_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]  # nothing listens once the probe is closed


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
  """Every local situation started at once (two share a workdir: `holder`, then `second` once
  the holder owns it); {name: process, ...} with their workdirs. The full disk is a 900 KiB
  tmpfs (root only), unmounted at the end."""
  root = tmp_path_factory.mktemp("faults")
  data_dir = str(root / "tensorflow_datasets")
  images = root / "images"  # an image folder: no labels, so no quality metric
  images.mkdir()
  pixels = np.random.default_rng(0).integers(0, 256, (32, 8, 8), np.uint8)
  for i, image in enumerate(pixels):
    Image.fromarray(image, "L").save(images / f"{i}.png")
  config_check.check_train_config(job_config(data_dir), 1, 1)  # digits, prepared once for all
  paths = {name: str(root / name) for name in ("shared", "stale", "full", "a_file")}
  with open(paths["a_file"], "w") as f:
    f.write("not a folder")
  os.makedirs(paths["stale"])
  gone = dead_pid()
  with open(os.path.join(paths["stale"], workdir_lock.LOCK_NAME), "wb") as f:
    f.write(workdir_lock.Holder(socket.gethostname(), gone, time.time() - 60).to_bytes())
  mounted = os.geteuid() == 0
  if mounted:
    os.makedirs(paths["full"])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", paths["full"]],
                   check=True)
  folder = {"data__dataset": f"folder:{images}", "data__train_split": "train",
            "data__eval_split": "train"}
  runs = {
      "holder": start(train_py(paths["shared"], data_dir, **folder, **LONG_GRID)),
      "stale": start(train_py(paths["stale"], data_dir)),
      "dead_storage": start(train_py("gs://jaxdiff-test/unreachable", data_dir),
                            STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{closed_port()}"),
  }
  if mounted:
    runs["full"] = start(train_py(f"{paths['full']}/work", data_dir, train__num_steps=6,
                                  train__checkpoint_every=2))
  wait_for(lambda: holds_lock(os.path.join(paths["shared"], workdir_lock.LOCK_NAME),
                              runs["holder"]), "lock held", runs["holder"])
  runs["second"] = start(train_py(paths["shared"], data_dir, **folder, **LONG_GRID))
  try:
    yield {"runs": runs, "paths": paths, "data_dir": data_dir, "mounted": mounted,
           "dead_pid": gone}
  finally:
    for process in runs.values():
      if process.poll() is None:
        process.kill()
        process.communicate()
    if mounted:
      subprocess.run(["umount", paths["full"]], check=True)


@pytest.mark.slow
def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(local_runs):
  holder = local_runs["runs"]["holder"]
  exit_code, _, stderr = outcome(local_runs["runs"]["second"])
  assert exit_code == 2
  (line,) = error_lines(stderr)
  assert line.startswith(refusal_of(local_runs["paths"]["shared"], holder)), line
  assert line.endswith("UTC); the lock is freed when it ends. Wait for it to end or stop it, or "
                       "choose another workdir"), line
  assert holder.poll() is None  # the holder is untouched and goes on


@pytest.mark.slow
def test_sigterm_during_the_end_of_run_grid_saves_and_exits_0_at_once(local_runs):
  """The holder of the test above, signalled once its last step is saved and its 40-batch
  sample grid is being drawn: it stops before the next batch, writes no grid, keeps the
  step and exits 0; its metrics are its own alone."""
  assert outcome(local_runs["runs"]["second"])[0] == 2  # the second run has given up
  holder, workdir = local_runs["runs"]["holder"], local_runs["paths"]["shared"]
  wait_for(lambda: checkpoint.list_steps(workdir) == [2], "checkpoint 2", holder)
  time.sleep(2)
  holder.send_signal(signal.SIGTERM)
  exit_code, stdout, stderr = outcome(holder, timeout_s=90)
  assert exit_code == 0 and error_lines(stderr) == [], stderr
  assert "stopped by signal" in stdout
  assert checkpoint.list_steps(workdir) == [2]
  assert not os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [row["step"] for row in map(json.loads, f) if "loss" in row] == [1, 2]
  assert os.path.getsize(os.path.join(workdir, workdir_lock.LOCK_NAME)) == 0  # released

  # The model it left judges no quality: its images have no labels (exit 2, flag named).
  exit_code, _, stderr = outcome(start([sys.executable, os.path.join(REPO, "evaluate.py"),
                                        f"--workdir={workdir}", "--metric=quality"]))
  assert exit_code == 2
  (line,) = error_lines(stderr)
  assert line.startswith("error: --metric=quality: the quality score judges digits"), line


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_said_in_one_line(local_runs):
  exit_code, stdout, stderr = outcome(local_runs["runs"]["stale"])
  assert exit_code == 0 and error_lines(stderr) == [], stderr
  workdir = local_runs["paths"]["stale"]
  (said,) = [line for line in stderr if "took over" in line]
  assert re.search(rf"\] took over the lock of {workdir} from process {local_runs['dead_pid']} "
                   rf"on host {socket.gethostname()} \(started [\d-]+ [\d:]+ UTC\), which "
                   rf"ended without releasing it$", said), said
  assert "trained steps 0→2" in stdout and checkpoint.list_steps(workdir) == [2]


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_step(local_runs):
  if not local_runs["mounted"]:
    pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
  exit_code, _, stderr = outcome(local_runs["runs"]["full"])
  workdir = f"{local_runs['paths']['full']}/work"
  assert exit_code == 1
  (line,) = error_lines(stderr)
  steps = checkpoint.list_steps(workdir)
  assert steps and re.fullmatch(
      rf"error: could not write checkpoint step \d+ to {workdir}/checkpoints \((OSError: \[Errno "
      rf"28\] No space left on device|ValueError: RESOURCE_EXHAUSTED: Error writing .*No space left "
      rf"on device.*)\); the "
      rf"earlier steps {re.escape(str(steps))} are intact\. Free disk space .* then rerun to "
      rf"resume\.", line), (line, steps)


@pytest.mark.slow
def test_unreachable_storage_is_given_up_in_the_stated_time(local_runs):
  started = time.monotonic()
  exit_code, _, stderr = outcome(local_runs["runs"]["dead_storage"])
  assert exit_code == 1
  (line,) = error_lines(stderr)
  assert line.startswith(f"error: cannot read the lock gs://jaxdiff-test/unreachable/"
                         f"{workdir_lock.LOCK_NAME}: storage did not answer within "
                         f"{workdir_lock.GIVE_UP_S:.0f} s"), line
  assert time.monotonic() - started < workdir_lock.GIVE_UP_S + 60


@pytest.mark.slow
def test_a_workdir_or_data_dir_that_is_a_file_is_refused_up_front(local_runs):
  a_file, data_dir = local_runs["paths"]["a_file"], local_runs["data_dir"]
  refused = [start(train_py(a_file, data_dir)), start(train_py(f"{a_file}/sub", data_dir)),
             start(train_py(f"{a_file}_work", a_file))]
  assert [(code, error_lines(stderr)) for code, _, stderr in map(outcome, refused)] == [
      (2, [f"error: --workdir={a_file}: is a file, or lies under one; give a folder"]),
      (2, [f"error: --workdir={a_file}/sub: is a file, or lies under one; give a folder"]),
      (2, [f"error: --config.data.data_dir={a_file}: is a file; give a folder (created if "
           f"absent)"])]
  assert not os.path.exists(f"{a_file}_work")
  with open(a_file) as f:
    assert f.read() == "not a folder"


@pytest.mark.slow
def test_two_runs_on_one_gs_workdir_and_a_missing_bucket(gcs_path, tmp_path):
  """The same on the emulator: the second run is refused while the first holds the lock object;
  the first then stops on SIGTERM with its step saved; a bucket that does not exist is refused
  up front."""
  data_dir = str(tmp_path / "tensorflow_datasets")
  config_check.check_train_config(job_config(data_dir), 1, 1)
  workdir = f"{gcs_path}/run"
  holder = start(train_py(workdir, data_dir, train__num_steps=100_000))
  no_bucket = start(train_py("gs://no-such-bucket/run", data_dir))
  wait_for(lambda: holds_lock(storage.join(workdir, workdir_lock.LOCK_NAME), holder),
           "lock held", holder)
  second = start(train_py(workdir, data_dir))
  wait_for(lambda: storage.exists(storage.join(workdir, "metrics.jsonl")), "training", holder)
  exit_code, _, stderr = outcome(second)
  assert exit_code == 2
  (line,) = error_lines(stderr)
  assert line.startswith(refusal_of(workdir, holder)), line
  holder.send_signal(signal.SIGTERM)
  exit_code, stdout, stderr = outcome(holder, timeout_s=90)
  assert exit_code == 0 and error_lines(stderr) == [], stderr
  assert "stopped by signal" in stdout and len(checkpoint.list_steps(workdir)) == 1
  exit_code, _, stderr = outcome(no_bucket)
  assert exit_code == 2
  (line,) = error_lines(stderr)
  assert line.startswith("error: --workdir=gs://no-such-bucket/run: its bucket does not exist")
