"""Paths that are local or in a bucket (`gs://bucket/...`), through one library: etils.epath.

Every file jaxdiff reads or writes goes through here (Orbax and TFDS use the same epath).
Local paths are made absolute (`~` expanded), as before; URLs (`scheme://...`) are kept as they
are. epath reaches gs:// through gcsfs (`pip install 'jaxdiff[gcs]'`; through tf.io.gfile where
TensorFlow is installed, but moves always use gcsfs). A bucket has objects, not folders: `makedirs` creates nothing
there, a folder exists once an object lies under it, and objects cannot be appended to or
renamed (see `append_text` and `move`).

Emulator: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` alone points every GCS client jaxdiff
uses at a local emulator such as `gcp-storage-emulator`, with no credentials.
`use_emulator_from_environment` (run when the first URL is resolved; importing this module changes
nothing) maps it onto each client's own setting, leaving any that is set already:
  gcsfs (epath, Orbax's metadata, TFDS)  reads STORAGE_EMULATOR_HOST; token 'anon', and its
                                          plain GCSFileSystem: the experimental one's bucket-
                                          type lookup is a gRPC call emulators cannot answer
                                          (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false)
  etils.epath                            EPATH_USE_TF=false: gcsfs, not tf.io.gfile (which
                                          reads no emulator setting and asks the same gRPC API)
  google-cloud-storage (tensorboardX)    reads STORAGE_EMULATOR_HOST, then uses no credentials
  TensorStore (Orbax's arrays)           TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  google-cloud-cpp (ArrayRecord reads)   CLOUD_STORAGE_EMULATOR_ENDPOINT
"""

import contextlib
import functools
import os
import posixpath
import re
import uuid
from typing import IO, Iterator

from etils import epath

from jaxdiff import errors

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def use_emulator_from_environment() -> None:
  """Point every GCS client at $STORAGE_EMULATOR_HOST, if it is set (see the module doc).

  Must run before those clients first connect; `resolve` does it for the first URL.
  """
  host = os.environ.get(EMULATOR_VARIABLE, "")
  if host in ("", "default"):
    return
  url = host if host.startswith(("http://", "https://")) else f"http://{host}"
  for name, value in (("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false"),
                      ("EPATH_USE_TF", "false"),
                      ("TENSORSTORE_GCS_HTTP_URL", url),
                      ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator"),
                      ("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)):
    os.environ.setdefault(name, value)
  _gcsfs_defaults().setdefault("token", "anon")
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for protocol in ("gs", "gcs"):  # gcsfs's plain class, even where gcsfs was imported before
    fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)


def _gcsfs_defaults() -> dict:
  """fsspec's default arguments for the gcsfs file systems epath makes (a dict that nothing
  reads where fsspec, and so gcsfs, is not installed)."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  return fsspec.config.conf.setdefault("gcs", {})


@functools.cache
def _configure_clients() -> None:
  """Once, before the first URL is used: the emulator (`use_emulator_from_environment`), and no
  gcsfs listing cache (TensorStore, under Orbax, and other hosts write objects that gcsfs does
  not see: a cached listing would hide new checkpoint steps)."""
  use_emulator_from_environment()
  _gcsfs_defaults().setdefault("use_listings_cache", False)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
  """Whether `path` names an object store (`gs://...`: a scheme, then ://, at the start) rather
  than the local file system, where `/tmp/gs://b` is a folder named `gs:`."""
  return _URL.match(str(path)) is not None


def resolve(path: str) -> str:
  """A local path made absolute with `~` expanded; a URL as it is (less a trailing '/'), the
  GCS clients configured for it on first use."""
  path = os.fspath(path)
  if is_url(path):
    _configure_clients()
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def as_path(path: str) -> epath.Path:
  """`resolve(path)` as an epath.Path (local or URL alike). An ArgumentError where no client for
  the URL's scheme is installed."""
  path = resolve(path)
  _check_client(path)
  return epath.Path(path)


def _filesystem(url: str):
  """(fsspec file system, path within it) of a URL, for what epath cannot do: list a prefix
  whole (its `walk` drops the `gs://`) and copy objects within a bucket."""
  _check_client(url)
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.core.url_to_fs(url)


def _check_client(path: str) -> None:
  """An ArgumentError where `path` is gs:// and no GCS client is installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if path.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
    raise errors.ArgumentError("path", path, "gs:// paths need a GCS client: pip install "
                               "'jaxdiff[gcs]' (gcsfs)")


def join(path: str, *names: str) -> str:
  """`path/name/...` for a local path or a URL."""
  return os.path.join(resolve(path), *names)


def exists(path: str) -> bool:
  return as_path(path).exists()


def isdir(path: str) -> bool:
  return as_path(path).is_dir()


def files_under(root: str) -> list[str]:
  """The path relative to `root` ('/'-separated) of every file anywhere under it, sorted; empty
  if `root` does not exist. Locally a walk that follows symbolic links; in a bucket, which has no
  folders to walk, one listing of the objects under the prefix."""
  root = resolve(root)
  if not is_url(root):
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _, names in os.walk(root, followlinks=True) for name in names)
  filesystem, prefix = _filesystem(root)
  return sorted(posixpath.relpath(name, prefix) for name in filesystem.find(prefix))


def listdir(path: str) -> list[str]:
  """The names in a folder; empty if it does not exist."""
  folder = as_path(path)
  return [child.name for child in folder.iterdir()] if folder.is_dir() else []


def makedirs(path: str) -> None:
  """Create a folder and its parents (nothing to create in a bucket, where folders are
  prefixes of object names)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str, mode: str = "r") -> IO:
  """Open a file for reading or writing ('r', 'rb', 'w', 'wb'); parents are not created."""
  return as_path(path).open(mode)


def read_text(path: str) -> str:
  return as_path(path).read_text()


def write_text(path: str, text: str) -> None:
  """Write `text` to `path`, creating its parent folders."""
  makedirs(os.path.dirname(resolve(path)))
  as_path(path).write_text(text)


def write_bytes_atomically(path: str, data: bytes) -> None:
  """Write `data` to `path` (parents created) so that readers see the old file or the new one,
  never part: locally a staged file renamed over it; in a bucket every upload is so."""
  path = resolve(path)
  makedirs(os.path.dirname(path))
  if is_url(path):
    as_path(path).write_bytes(data)
    return
  staging = _staging_name(path)
  with open(staging, "wb") as f:
    f.write(data)
  os.replace(staging, path)


@contextlib.contextmanager
def staged(target: str) -> Iterator[str]:
  """Write a file or folder in one piece: yields a staging path beside `target` to write into;
  when the block ends it is moved to `target` (`move`: `target` must not exist), and if the
  block raises it is removed. Readers never see part of `target`."""
  target = resolve(target)
  staging = _staging_name(target)
  try:
    yield staging
  except BaseException:
    remove_tree(staging)
    raise
  try:
    move(staging, target)
  except BaseException:
    remove_tree(staging)
    raise


def _staging_name(target: str) -> str:
  """A fresh name beside `target` for writing it: .NAME.partial-RANDOM."""
  parent, name = os.path.split(target)
  return join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")


def append_text(path: str, text: str) -> None:
  """Append `text` to `path` (created if absent). In a bucket, where objects cannot be
  appended to, the object is read and written again whole."""
  path = resolve(path)
  if not is_url(path):
    with open(path, "a") as f:
      f.write(text)
    return
  before = read_text(path) if exists(path) else ""
  write_text(path, before + text)


def move(source: str, target: str) -> None:
  """Move a file or folder to `target`, which must not exist; its parent folder is created.

  Locally a rename (atomic). In a bucket, which cannot rename, every object is copied and then
  deleted: cut off half-way, both places hold part of it.
  """
  source, target = resolve(source), resolve(target)
  if exists(target):
    raise FileExistsError(f"{target} already exists")
  if not is_url(source):
    makedirs(os.path.dirname(target))
    os.rename(source, target)
    return
  filesystem, _ = _filesystem(source)
  filesystem.copy(source, target, recursive=True)
  filesystem.rm(source, recursive=True)


def remove_tree(path: str) -> None:
  """Delete a file, or a folder and everything under it (nothing if it does not exist)."""
  target = as_path(path)
  if target.is_dir():
    target.rmtree()
  elif target.exists():
    target.unlink()


def check_writable(folder: str) -> None:
  """Create `folder` and write and delete a probe file in it; OSError (or the client's error
  for a bucket) where that fails."""
  makedirs(folder)
  probe = as_path(_staging_name(join(folder, ".jaxdiff-write-test")))
  probe.write_bytes(b"")
  probe.unlink()
