"""One run owns its workdir: a lock taken before anything is written there.

  with workdir_lock.acquire(workdir) as lock:  # WorkdirLocked while another live run holds it
    ...
    lock.check()                               # LockLost if it was taken away; before each save

The lock is WORKDIR/workdir.lock. It stays in the workdir: while held it names its holder (host,
process id, start time) as JSON, and released it is empty. A lock that still names a holder but
that holder is gone (kill -9, a preempted VM) is taken over, said in one warning line naming the
old holder (also `lock.took_over`). Of several processes that race for a free or stale lock,
exactly one wins; the others get WorkdirLocked naming it. Readers (sampling, evaluation) never
take it. On a pod one process takes it for all.

Local paths: an exclusive flock(2) on the open lock file, held for the process's life; the
kernel drops it when the process ends, however it ends, so "stale" is exact (a lock that can be
taken while its file names a holder) and the takeover is race-free. A child made by fork()
closes its copy, so the lock never outlives the process that took it. Where it holds:
  local disks, tmpfs, overlayfs   exactly as above.
  NFS                             Linux sends flock as an NFS byte-range lock, so hosts that mount
                                  the same export exclude each other. A dead host's lock is freed
                                  by the server: NFSv4 when the client's lease ends (90 s by
                                  default), NFSv3 only when that host reboots (one that never
                                  comes back holds it until the server's lock manager restarts).
                                  Mounted with `nolock` or `local_lock=flock|all`, locks are
                                  local to each host and two hosts do not see each other's.
  FUSE mounts (gcsfuse)           local to each host: use the gs:// path instead.

gs:// paths: an object created only where absent (`if_generation_match=0`), so of two hosts
racing one wins. A daemon thread re-uploads it every `stale_after_s / 4` (conditional on the
generation it last wrote), so it stays fresh whatever the job is doing (compiling, sampling,
a long checkpoint interval) and stops with the process; a job-called heartbeat would tie the
stale time to the longest gap between calls, hours on a big run. A lock not refreshed for the
`stale_after_s` its holder wrote into it (by the bucket's clock, compared with this host's: NTP
keeps Cloud VMs within milliseconds) is stale, and is taken over by an upload conditional on its
generation; so, at once, is one whose holder is known gone (a process of this host that no
longer exists: a run killed on this VM and started again). A holder whose refresh finds another
generation has lost the lock: `check()` says so. Unreachable storage is given up after
`give_up_s` (default GIVE_UP_S), a missing bucket refused, each in one line.
"""

import atexit
import dataclasses
import errno
import fcntl
import json
import os
import posixpath
import socket
import threading
import time

from absl import logging

from jaxdiff import errors, storage

LOCK_NAME = "workdir.lock"
STALE_AFTER_S = 300.0  # a gs:// lock not refreshed for this long is stale
GIVE_UP_S = 60.0  # how long to keep trying to reach the bucket before giving up
_HOLDER_SETTLE_S = 1.0  # how long a refused acquirer waits for the new holder's details


class WorkdirLocked(errors.ArgumentError):
  """The workdir is in use by another run, its `holder`."""

  def __init__(self, workdir: str, holder: "Holder", detail: str):
    super().__init__("workdir", workdir, f"in use by another run: {holder}{detail}. Wait for it "
                     f"to end or stop it, or choose another workdir")
    self.holder = holder


class LockError(errors.JobError):
  """The workdir's lock could not be taken or kept for a reason other than another run."""


class LockLost(LockError):
  """The lock was taken away from this run (deleted, replaced, or taken over as stale)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock: host name, process id, when it took the lock (Unix time) and, for a
  gs:// lock, after how many seconds without a refresh it counts as stale."""

  host: str
  pid: int
  started: float
  stale_after_s: float | None = None

  def __str__(self) -> str:
    if self == UNKNOWN_HOLDER:
      return "an unknown process (the lock's content cannot be read)"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
    return f"process {self.pid} on host {self.host} (started {started})"

  @classmethod
  def this_process(cls, stale_after_s: float | None = None) -> "Holder":
    return cls(socket.gethostname(), os.getpid(), time.time(), stale_after_s)

  def to_bytes(self) -> bytes:
    return json.dumps(dataclasses.asdict(self)).encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> "Holder":
    """The holder written in a lock's content; UNKNOWN_HOLDER where it names none."""
    try:
      fields = json.loads(data)
      return cls(str(fields["host"]), int(fields["pid"]), float(fields["started"]),
                 fields.get("stale_after_s"))
    except (ValueError, TypeError, KeyError):
      return UNKNOWN_HOLDER

  def is_gone(self) -> bool:
    """Known to have ended: a process of this host that no longer exists."""
    if self.host != socket.gethostname():
      return False
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # it exists, as another user's
      pass
    return False


UNKNOWN_HOLDER = Holder("unknown", 0, 0.0)


class WorkdirLock:
  """A held lock: `path`, this process's `holder`, and `took_over`, the holder of the stale
  lock it replaced (None if the lock was free). `release()` (or leaving the `with`) frees it;
  so does the interpreter's normal exit."""

  def __init__(self, path: str, holder: Holder, took_over: Holder | None):
    self.path, self.holder, self.took_over = path, holder, took_over
    self._released = False
    atexit.register(self.release)

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def check(self) -> None:
    """LockLost if another process may now own the workdir."""

  def release(self) -> None:
    """Free the lock (once; a forked child's copy frees nothing)."""
    if self._released or os.getpid() != self.holder.pid:
      return
    self._released = True
    atexit.unregister(self.release)
    self._free()

  def _free(self) -> None:
    raise NotImplementedError


def acquire(workdir: str, *, stale_after_s: float = STALE_AFTER_S,
            give_up_s: float | None = None) -> WorkdirLock:
  """Take WORKDIR's lock (creating the folder) before anything else is written there.

  WorkdirLocked (an ArgumentError) where another live run holds it; a stale one is taken over
  and that said in one warning line. For gs://: `stale_after_s` is written into the lock as
  this holder's promise (it refreshes 4× as often), `give_up_s` (None: GIVE_UP_S) bounds the
  wait for the bucket (LockError); a missing bucket is an ArgumentError.
  """
  workdir = storage.resolve(workdir)
  if storage.is_url(workdir):
    lock, detail = _ObjectLock.acquire(workdir, stale_after_s, give_up_s or GIVE_UP_S)
  else:
    lock, detail = _FileLock.acquire(workdir), "ended without releasing it"
  if lock.took_over:
    logging.warning("took over the lock of %s from %s, which %s", workdir, lock.took_over, detail)
  return lock


_open_lock_files: set[int] = set()  # descriptors a forked child closes (see the module doc)


def _close_inherited_lock_files() -> None:
  for descriptor in _open_lock_files:
    os.close(descriptor)
  _open_lock_files.clear()


os.register_at_fork(after_in_child=_close_inherited_lock_files)


class _FileLock(WorkdirLock):
  """flock(2) on a local file (see the module doc)."""

  def __init__(self, path: str, holder: Holder, took_over: Holder | None, descriptor: int):
    self._descriptor = descriptor
    _open_lock_files.add(descriptor)
    super().__init__(path, holder, took_over)

  @classmethod
  def acquire(cls, workdir: str) -> "_FileLock":
    path = os.path.join(workdir, LOCK_NAME)
    try:
      os.makedirs(workdir, exist_ok=True)
      descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
      raise _path_error(workdir, path, error) from error
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _settled_holder(lambda: os.pread(descriptor, 4096, 0))
      os.close(descriptor)
      raise WorkdirLocked(workdir, holder, "; the lock is freed when it ends") from None
    except OSError as error:  # ENOLCK: an NFS mount without a lock manager
      os.close(descriptor)
      raise LockError(f"cannot lock {path}: {error.strerror}; the file system does not support "
                      f"locks (NFS mounted without a lock manager?)") from error
    holder = Holder.this_process()
    try:
      previous = os.pread(descriptor, 4096, 0)
      os.ftruncate(descriptor, 0)
      os.pwrite(descriptor, holder.to_bytes(), 0)
      os.fsync(descriptor)
    except OSError as error:
      os.close(descriptor)
      raise LockError(f"cannot write the lock file {path}: {error.strerror}") from error
    return cls(path, holder, Holder.from_bytes(previous) if previous else None, descriptor)

  def check(self) -> None:
    try:
      same = os.path.samestat(os.stat(self.path), os.fstat(self._descriptor))
    except OSError:
      same = False
    if not same:
      raise LockLost(f"the lock file {self.path} was deleted or replaced while this run held it: "
                     f"another run may be writing to {os.path.dirname(self.path)}")

  def _free(self) -> None:
    _open_lock_files.discard(self._descriptor)
    try:
      os.ftruncate(self._descriptor, 0)  # released: an empty file
    except OSError as error:  # the lock itself goes with the descriptor either way
      logging.warning("could not clear the lock file %s: %s", self.path, error.strerror)
    os.close(self._descriptor)


def _path_error(workdir: str, path: str, error: OSError) -> Exception:
  """An OSError met creating the workdir or its lock file `path` as the error to raise:
  ArgumentError where the path itself is wrong (a file, no permission, read-only), else
  LockError."""
  if error.errno in (errno.EEXIST, errno.ENOTDIR):
    return errors.ArgumentError("workdir", workdir, "is a file, or lies under one; give a folder")
  if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return errors.ArgumentError("workdir", workdir, f"cannot create {path}: {error.strerror}; "
                                f"give a folder this user can write")
  return LockError(f"cannot create {path}: {error.strerror}")


def _settled_holder(read) -> Holder:
  """The holder named by `read()`, once a racer that has just won has written itself in:
  content that names no one or a process known gone is read again for _HOLDER_SETTLE_S."""
  deadline = time.monotonic() + _HOLDER_SETTLE_S
  while True:
    holder = Holder.from_bytes(read())
    if (holder != UNKNOWN_HOLDER and not holder.is_gone()) or time.monotonic() > deadline:
      return holder
    time.sleep(0.02)


class _ObjectLock(WorkdirLock):
  """A gs:// object kept fresh by a daemon thread (see the module doc)."""

  def __init__(self, path: str, holder: Holder, took_over: Holder | None,
               lock_object: "_LockObject", generation: int):
    self._object, self._generation = lock_object, generation
    self._lost: str | None = None
    self._stop = threading.Event()
    super().__init__(path, holder, took_over)
    self._thread = threading.Thread(target=self._refresh_until_stopped, daemon=True,
                                    name="jaxdiff-workdir-lock")
    self._thread.start()

  @classmethod
  def acquire(cls, workdir: str, stale_after_s: float,
              give_up_s: float) -> tuple["_ObjectLock", str]:
    """The lock and what became of the holder it took over from (how stale its lock was)."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    lock_object = _LockObject(workdir, give_up_s)
    holder = Holder.this_process(stale_after_s)
    for _ in range(3):  # the lock changed hands between reading and writing: look again
      try:
        found = lock_object.read()
        previous, generation, detail = None, 0, ""
        if found is not None:
          content, generation, age = found
          if content:
            previous = Holder.from_bytes(content)
            stale_after = previous.stale_after_s or STALE_AFTER_S
            if age < stale_after and not previous.is_gone():
              raise WorkdirLocked(workdir, previous, f"; it refreshed the lock {age:.0f} s ago, "
                                  f"and a lock not refreshed for {stale_after:.0f} s is stale")
            detail = ("ended without releasing it" if previous.is_gone() else
                      f"stopped refreshing it {age:.0f} s ago (a lock is stale after "
                      f"{stale_after:.0f} s)")
        generation = lock_object.write(holder.to_bytes(), generation)
      except exceptions.PreconditionFailed:
        continue
      return cls(lock_object.url, holder, previous, lock_object, generation), detail
    raise LockError(f"the lock {lock_object.url} kept changing hands; try again")

  def check(self) -> None:
    if self._lost:
      raise LockLost(self._lost)

  def _refresh_until_stopped(self) -> None:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    interval = self.holder.stale_after_s / 4
    failing = False
    while not self._stop.wait(interval):
      try:
        self._generation = self._object.write(self.holder.to_bytes(), self._generation,
                                              give_up_s=interval)
      except exceptions.PreconditionFailed:
        self._lost = (f"the lock {self.path} was taken over or removed while this run held it: "
                      f"another run may be writing to {self._object.workdir}")
        logging.error("%s", self._lost)
        return
      except (LockError, errors.ArgumentError) as error:
        if not failing:
          logging.warning("could not refresh the lock %s (%s); retrying every %.0f s", self.path,
                          error, interval)
        failing = True
        continue
      if failing:
        logging.warning("refreshed the lock %s again", self.path)
      failing = False

  def _free(self) -> None:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    self._stop.set()
    self._thread.join()
    if self._lost:
      return
    try:
      self._object.write(b"", self._generation)  # released: an empty object
    except exceptions.PreconditionFailed:
      logging.warning("the lock %s was taken over before this run released it", self.path)
    except (LockError, errors.ArgumentError) as error:
      logging.warning("could not release the lock %s (%s); it becomes stale after %.0f s",
                      self.path, error, self.holder.stale_after_s)


class _LockObject:
  """The lock's object in a bucket, through google-cloud-storage (its preconditions are direct
  arguments), every call retried on transient faults for at most `give_up_s`."""

  def __init__(self, workdir: str, give_up_s: float):
    try:
      from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise errors.ArgumentError("workdir", workdir, "gs:// paths need a GCS client: pip install "
                                 "'jaxdiff[gcs]'") from error
    bucket_name, _, prefix = workdir.removeprefix("gs://").partition("/")
    self.workdir, self.give_up_s = workdir, give_up_s
    self._name = posixpath.join(prefix, LOCK_NAME)
    self.url = f"gs://{bucket_name}/{self._name}"
    try:
      self._bucket = gcs.Client().bucket(bucket_name)
    except Exception as error:  # google.auth's DefaultCredentialsError, a bad bucket name
      raise LockError(f"cannot use {workdir}: {_describe(error)}") from error

  def read(self) -> tuple[bytes, int, float] | None:
    """(content, generation, seconds since it was written) of the object; None if absent.
    google.api_core's PreconditionFailed where it changed while being read."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._call("read", lambda retry, timeout: self._bucket.get_blob(
        self._name, retry=retry, timeout=timeout))
    if blob is None:
      return None
    try:
      content = self._call("read", lambda retry, timeout: blob.download_as_bytes(
          if_generation_match=blob.generation, retry=retry, timeout=timeout))
    except exceptions.NotFound:  # deleted since
      return None
    return content, blob.generation, time.time() - blob.updated.timestamp()

  def write(self, content: bytes, generation: int, give_up_s: float | None = None) -> int:
    """Upload `content` where the object's generation is `generation` (0: absent); its new
    generation. google.api_core's PreconditionFailed where it is not; ArgumentError where the
    bucket does not exist."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._bucket.blob(self._name)
    try:
      self._call("write", lambda retry, timeout: blob.upload_from_string(
          content, content_type="application/json", if_generation_match=generation, retry=retry,
          timeout=timeout), give_up_s)
    except exceptions.NotFound as error:
      raise errors.ArgumentError("workdir", self.workdir, f"its bucket does not exist (writing "
                                 f"{self.url}: {_describe(error)})") from error
    return blob.generation

  def _call(self, what: str, request, give_up_s: float | None = None):
    """`request(retry, timeout)`, retried on transient faults for at most `give_up_s`. Passes
    PreconditionFailed and NotFound on; a refusal is an ArgumentError, any other fault a
    LockError."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top
    give_up_s = give_up_s or self.give_up_s
    try:
      return request(retry.DEFAULT_RETRY.with_timeout(give_up_s), min(give_up_s, 30.0))
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      raise
    except (exceptions.Forbidden, exceptions.Unauthorized) as error:
      raise errors.ArgumentError("workdir", self.workdir, f"this account may not {what} "
                                 f"{self.url} ({_describe(error)})") from error
    except Exception as error:  # RetryError, requests' errors, google.auth's: all said alike
      cause = error.__cause__ if isinstance(error, exceptions.RetryError) else None
      raise LockError(f"cannot {what} the lock {self.url}: storage did not answer within "
                      f"{give_up_s:.0f} s ({_describe(cause or error)})") from error


def _describe(error: BaseException, limit: int = 200) -> str:
  """`Type: message` on one line, cut to `limit` characters."""
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text if len(text) <= limit else text[:limit] + ' ...'}"
