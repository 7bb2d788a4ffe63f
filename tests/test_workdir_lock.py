"""The workdir lock: one holder at a time, refusals that name it, and stale locks taken over.

The slow tests start real processes (no JAX in them) that hold or race for the lock of a local
workdir and of a gs:// one on the emulator (conftest.gcs_bucket), and kill -9 them.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxdiff import errors, workdir_lock
from tests.helpers import REPO

# A process that takes the lock (at Unix time START_AT, to race; as if on host HOST where given),
# says what it got as one JSON line, and holds it until its stdin closes.
_HOLDER = """
import json, socket, sys, time
from jaxdiff import workdir_lock
workdir, stale_after_s, start_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if sys.argv[4:]:
  socket.gethostname = lambda: sys.argv[4]
time.sleep(max(0.0, start_at - time.time()))
try:
  lock = workdir_lock.acquire(workdir, stale_after_s=stale_after_s, give_up_s=10)
except workdir_lock.WorkdirLocked as error:
  print(json.dumps({"refused_by": error.holder.pid, "message": str(error)}), flush=True)
  sys.exit(2)
print(json.dumps({"holder": lock.holder.pid,
                  "took_over": lock.took_over and lock.took_over.pid}), flush=True)
sys.stdin.read()
lock.release()
"""
# The stale times the gs:// holders declare: short for those the tests kill, long for live ones,
# which a loaded machine may hold up for seconds between refreshes.
KILLED_STALE_S, LIVE_STALE_S = 2.0, 30.0
ANOTHER_VM = "another-vm"  # a host name that is not this one's


class Holder:
  """A process running _HOLDER; `said` is its JSON line."""

  def __init__(self, workdir: str, stale_after_s: float = LIVE_STALE_S, start_at: float = 0.0,
               host: str | None = None):
    self.process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, workdir, str(stale_after_s), str(start_at),
         *([host] if host else [])],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": REPO})
    self._said = None

  @property
  def said(self) -> dict:
    if self._said is None:
      line = self.process.stdout.readline()
      assert line, self.process.communicate()[1]
      self._said = json.loads(line)
    return self._said

  def finish(self) -> str:
    """Release (if held) and end; its stderr."""
    _, stderr = self.process.communicate(input="", timeout=30)
    return stderr

  def kill(self) -> None:
    self.process.send_signal(signal.SIGKILL)
    self.process.communicate(timeout=30)


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path) -> str:
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("gcs_path")


def lock_content(workdir: str) -> bytes:
  if not workdir.startswith("gs://"):
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "rb") as f:
      return f.read()
  return gcs_blob(f"{workdir}/{workdir_lock.LOCK_NAME}").download_as_bytes()


def gcs_blob(url: str):
  """google-cloud-storage's Blob of a gs:// URL (not gcsfs: the prefetcher of its reads leaves
  weak proxies that break conftest.gcs_bucket's clean-up)."""
  from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  bucket, name = url.removeprefix("gs://").split("/", 1)
  return gcs.Client().bucket(bucket).blob(name)


@pytest.mark.slow
def test_a_second_run_is_refused_naming_the_first_and_changes_nothing(workdir):
  first = Holder(workdir)
  assert first.said["holder"] == first.process.pid and first.said["took_over"] is None
  held = lock_content(workdir)
  second = Holder(workdir)
  assert second.said["refused_by"] == first.process.pid
  assert second.process.wait(timeout=30) == 2
  message = second.said["message"]
  assert message.startswith(f"workdir = '{workdir}': in use by another run: process "
                            f"{first.process.pid} on host ")
  assert "started 2" in message  # the holder's start time, as a date
  assert lock_content(workdir) == held
  first.finish()
  assert lock_content(workdir) == b""  # released
  with workdir_lock.acquire(workdir) as lock:
    assert lock.took_over is None


@pytest.mark.slow
def test_a_killed_holders_lock_is_taken_over_and_that_said_in_one_line(workdir):
  """A holder on another VM (a preempted one) for gs://: whether it lives, a bucket cannot tell
  until it has not refreshed the lock for a while."""
  in_bucket = workdir.startswith("gs://")
  dead = Holder(workdir, KILLED_STALE_S, host=ANOTHER_VM if in_bucket else None)
  assert dead.said["holder"] == dead.process.pid
  dead.kill()
  if in_bucket:
    with pytest.raises(workdir_lock.WorkdirLocked,
                       match="a lock not refreshed for 2 s is stale") as refused:
      workdir_lock.acquire(workdir)
    assert refused.value.holder.pid == dead.process.pid
    time.sleep(KILLED_STALE_S)
  successor = Holder(workdir)
  assert successor.said == {"holder": successor.process.pid, "took_over": dead.process.pid}
  said = [line for line in successor.finish().splitlines() if "took over" in line]
  assert len(said) == 1
  assert f"took over the lock of {workdir} from process {dead.process.pid} on host " in said[0]
  assert (", which stopped refreshing it " if in_bucket
          else ", which ended without releasing it") in said[0]


@pytest.mark.slow
def test_a_gs_lock_of_a_killed_process_of_this_host_is_taken_over_at_once(gcs_path):
  """A run killed on this VM and started again does not wait for its old lock to go stale."""
  dead = Holder(gcs_path, LIVE_STALE_S)
  assert dead.said["holder"] == dead.process.pid
  dead.kill()
  successor = Holder(gcs_path)
  assert successor.said == {"holder": successor.process.pid, "took_over": dead.process.pid}
  (said,) = [line for line in successor.finish().splitlines() if "took over" in line]
  assert said.endswith(", which ended without releasing it"), said


@pytest.mark.slow
def test_of_two_processes_racing_for_a_stale_lock_exactly_one_wins(workdir):
  dead = Holder(workdir, KILLED_STALE_S, host=ANOTHER_VM if workdir.startswith("gs://") else None)
  assert dead.said["holder"] == dead.process.pid
  dead.kill()
  start_at = time.time() + KILLED_STALE_S + 0.5  # both started, the lock stale
  racers = [Holder(workdir, start_at=start_at) for _ in range(2)]
  said = sorted((racer.said for racer in racers), key=lambda s: "holder" not in s)
  winner, loser = said
  assert winner["took_over"] == dead.process.pid
  assert winner["holder"] in (racer.process.pid for racer in racers)
  assert loser["refused_by"] == winner["holder"]
  for racer in racers:
    racer.finish()


@pytest.mark.slow
def test_a_forked_child_does_not_keep_its_killed_parents_lock(tmp_path):
  workdir = str(tmp_path / "run")
  forking_holder = (f"import os, time; from jaxdiff import workdir_lock; "
                    f"lock = workdir_lock.acquire({workdir!r}); child = os.fork(); "
                    f"print(os.getpid(), flush=True) if child == 0 else None; time.sleep(60)")
  parent = subprocess.Popen([sys.executable, "-c", forking_holder], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
  child = int(parent.stdout.readline())  # printed once the fork hooks have run in the child
  parent.kill()
  parent.wait(timeout=30)
  try:
    with workdir_lock.acquire(workdir) as lock:
      assert lock.took_over.pid == parent.pid
  finally:
    os.kill(child, signal.SIGKILL)


def test_a_second_lock_in_the_same_process_is_refused_and_a_release_frees_it(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.acquire(workdir) as lock:
    assert lock.holder.pid == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"process {os.getpid()} on host"):
      workdir_lock.acquire(workdir)
    lock.check()
  assert lock_content(workdir) == b""
  with workdir_lock.acquire(workdir) as again:
    assert again.took_over is None


def test_a_workdir_that_is_a_file_is_an_argument_error_and_left_alone(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a folder")
  for workdir in (path, path / "below"):
    with pytest.raises(errors.ArgumentError, match="': is a file, or lies under one"):
      workdir_lock.acquire(str(workdir))
  assert path.read_text() == "not a folder"


def test_a_lock_file_deleted_under_its_holder_is_reported_lost(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.acquire(workdir) as lock:
    os.remove(os.path.join(workdir, workdir_lock.LOCK_NAME))
    with pytest.raises(workdir_lock.LockLost, match="deleted or replaced"):
      lock.check()


def generation(url: str) -> int:
  blob = gcs_blob(url)
  blob.reload()
  return blob.generation


def eventually(condition, timeout_s: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def test_a_gs_lock_is_refreshed_while_held_and_lost_when_replaced(gcs_path):
  with workdir_lock.acquire(gcs_path, stale_after_s=0.4) as lock:  # refreshed every 0.1 s
    written = generation(lock.path)
    assert eventually(lambda: generation(lock.path) != written)
    lock.check()
    gcs_blob(lock.path).upload_from_string(b"another host")

    def lost() -> bool:
      try:
        lock.check()
      except workdir_lock.LockLost as error:
        return "taken over or removed" in str(error)
      return False

    assert eventually(lost)
  assert lock_content(gcs_path) == b"another host"  # a lost lock is not released


def test_a_missing_bucket_is_an_argument_error(gcs_bucket):
  with pytest.raises(errors.ArgumentError, match="its bucket does not exist"):
    workdir_lock.acquire("gs://no-such-bucket-for-jaxdiff/run", give_up_s=5)


def test_unreachable_storage_is_given_up_within_the_stated_time(gcs_bucket, monkeypatch):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as closed:
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  start = time.monotonic()
  with pytest.raises(workdir_lock.LockError, match="storage did not answer within 2 s"):
    workdir_lock.acquire(f"{gcs_bucket}/run", give_up_s=2)
  assert time.monotonic() - start < 4

