"""gs:// paths against a real GCS JSON API: the emulator on 127.0.0.1 (see conftest.gcs_bucket).

Every test runs in an empty current folder and checks that it stays empty: nothing meant for the
bucket may land on the local disk (no `gs:` folder).
"""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from configs import default
from jaxdiff import checkpoint, data, images, storage
from jaxdiff.data import builders, sources
from jaxdiff.evaluation import fid, frechet
from jaxdiff.jobs import train, workdir
from jaxdiff.metric_writer import MetricWriter
from tests import helpers
from tests.test_checkpoint import (CONFIG, abstract, assert_same_state, assert_same_tree,
                                   ema_shapes, mesh_of, saved_state)


@pytest.fixture(autouse=True)
def nothing_lands_locally(tmp_path, monkeypatch):
  """Run in an empty current folder and check it is still empty afterwards."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield
  assert os.listdir(cwd) == []


def objects_under(prefix: str) -> dict[str, bytes]:
  """{path relative to `prefix`: content} of every object under a gs:// prefix."""
  import fsspec  # pylint: disable=g-import-not-at-top
  filesystem, root = fsspec.core.url_to_fs(prefix)
  return {os.path.relpath(name, root): filesystem.cat_file(name)
          for name in filesystem.find(root)}


def test_local_paths_resolve_as_before_and_urls_stay_as_they_are(tmp_path):
  assert storage.resolve("~/run") == os.path.expanduser("~/run")
  assert storage.resolve("run") == os.path.join(os.getcwd(), "run")
  assert storage.resolve("gs://bucket/run/") == "gs://bucket/run"
  assert storage.join("gs://bucket/run", "checkpoints", "3") == "gs://bucket/run/checkpoints/3"
  assert not storage.is_url(str(tmp_path)) and storage.is_url("gs://bucket")
  local = f"{tmp_path}/gs://bucket/run"  # a scheme only counts at the start
  assert not storage.is_url(local) and storage.resolve(local) == f"{tmp_path}/gs:/bucket/run"
  storage.write_text(f"{local}/a.txt", "here")
  assert storage.read_text(f"{tmp_path}/gs:/bucket/run/a.txt") == "here"


def test_files_folders_appends_and_moves_in_a_bucket(gcs_path):
  storage.write_text(f"{gcs_path}/a/b.txt", "one")
  storage.append_text(f"{gcs_path}/a/b.txt", " two")
  storage.append_text(f"{gcs_path}/a/new.txt", "three")
  storage.write_bytes_atomically(f"{gcs_path}/c.bin", b"\x00\x01")
  assert storage.read_text(f"{gcs_path}/a/b.txt") == "one two"
  assert sorted(storage.listdir(gcs_path)) == ["a", "c.bin"]
  assert storage.isdir(f"{gcs_path}/a") and not storage.isdir(f"{gcs_path}/c.bin")
  assert storage.listdir(f"{gcs_path}/nothing") == []
  storage.move(f"{gcs_path}/a", f"{gcs_path}/aside/a")  # a copy of each object, then a delete
  assert not storage.exists(f"{gcs_path}/a")
  assert objects_under(gcs_path) == {"aside/a/b.txt": b"one two", "aside/a/new.txt": b"three",
                                     "c.bin": b"\x00\x01"}
  with pytest.raises(FileExistsError):
    storage.move(f"{gcs_path}/c.bin", f"{gcs_path}/aside/a/b.txt")


@pytest.mark.slow
def test_a_train_state_saves_and_restores_exactly_in_a_bucket(gcs_path):
  older, newer = saved_state(2), saved_state(2, seed=8)
  with checkpoint.Checkpointer(gcs_path, max_to_keep=2) as checkpointer:
    checkpointer.save(1, older, {"n": 1}, CONFIG)
    checkpointer.save(2, newer, {"n": 2}, CONFIG, wait=True)
    checkpointer.save(2, older, {"n": 9}, CONFIG, wait=True)  # an existing step stays
  assert checkpoint.list_steps(gcs_path) == [1, 2]
  with checkpoint.Checkpointer(gcs_path, max_to_keep=2) as checkpointer:
    restored = checkpointer.restore(abstract(1))  # onto another topology
    assert restored.step == 2 and restored.data_state == {"n": 2} and restored.config == CONFIG
    assert_same_state(restored.state, newer)
    assert_same_state(checkpointer.restore(abstract(2), step=1).state, older)


def test_a_step_without_its_commit_file_is_not_listed(gcs_path):
  """In a bucket Orbax writes STEP/ in place and commit_success.txt last: a step cut off
  before that file is half-written and must not count."""
  with checkpoint.Checkpointer(gcs_path) as checkpointer:
    checkpointer.save(3, saved_state(1), {"n": 3}, CONFIG, wait=True)
  assert storage.exists(f"{gcs_path}/checkpoints/3/commit_success.txt")
  storage.write_text(f"{gcs_path}/checkpoints/4/train/_METADATA", "{")
  assert checkpoint.list_steps(gcs_path) == [3]
  assert checkpoint.load_ema(gcs_path, ema_shapes(1)).step == 3


@pytest.mark.slow
def test_a_broken_step_in_a_bucket_is_skipped_and_then_set_aside(gcs_path, caplog):
  older, newer = saved_state(1), saved_state(1, seed=8)
  with checkpoint.Checkpointer(gcs_path, max_to_keep=2) as checkpointer:
    checkpointer.save(1, older, {"n": 1}, CONFIG)
    checkpointer.save(2, newer, {"n": 2}, CONFIG, wait=True)
  step_2 = f"{gcs_path}/checkpoints/2"
  for name, content in objects_under(f"{step_2}/train").items():  # a failing disk's damage
    storage.write_bytes_atomically(f"{step_2}/train/{name}", content[:len(content) // 2])
  damaged = objects_under(step_2)
  with checkpoint.Checkpointer(gcs_path, max_to_keep=2) as checkpointer:
    restored = checkpointer.restore(abstract(1))
    assert restored.step == 1 and "checkpoint step 2" in caplog.text
    assert_same_state(restored.state, older)
    checkpointer.save(2, newer, {"n": 2}, CONFIG, wait=True)
    assert checkpoint.list_steps(gcs_path) == [1, 2]
    assert objects_under(f"{gcs_path}/checkpoints_broken/2") == damaged
    restored = checkpointer.restore(abstract(1))
  assert restored.data_state == {"n": 2}
  assert_same_state(restored.state, newer)


@pytest.mark.slow
def test_exports_and_sampling_read_from_a_bucket(gcs_path):
  state = saved_state(1)
  with checkpoint.Checkpointer(f"{gcs_path}/work") as checkpointer:
    checkpointer.save(3, state, {}, CONFIG)
    checkpointer.save(4, state.replace(ema_params=state.params), {}, CONFIG)
  ema = checkpoint.load_ema(f"{gcs_path}/work", ema_shapes(1), step=3)
  assert ema.step == 3 and ema.config == CONFIG
  assert_same_tree(ema.params, jax.device_get(state.ema_params))
  export = workdir.export_ema(f"{gcs_path}/work", f"{gcs_path}/export", step=3)
  assert export == f"{gcs_path}/export"
  assert sorted(storage.listdir(export)) == ["config.json", "ema_params", "export.json"]
  assert [name for name in storage.listdir(gcs_path) if "partial" in name] == []
  assert json.loads(storage.read_text(f"{export}/export.json")) == {
      "step": 3, "workdir": f"{gcs_path}/work"}
  ema = checkpoint.load_ema(export, ema_shapes(2))
  assert ema.step == 3 and ema.config == CONFIG
  assert_same_tree(ema.params, jax.device_get(state.ema_params))
  assert workdir.load_model(export, mesh=mesh_of(1)).step == 3
  with pytest.raises(checkpoint.CheckpointError, match="already exists"):
    workdir.export_ema(f"{gcs_path}/work", export)


def tensorboard_scalars(folder: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the TFRecord event files in a folder (length, crc, data, crc)."""
  scalars = {}
  for name in storage.listdir(folder):
    with storage.open_file(f"{folder}/{name}", "rb") as f:
      content = f.read()
    offset = 0
    while offset < len(content):
      (length,) = struct.unpack("<Q", content[offset:offset + 8])
      event = event_pb2.Event.FromString(content[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_metrics_and_tensorboard_events_go_to_the_bucket(gcs_path):
  writer = MetricWriter(gcs_path)
  writer.write(1, {"loss": 0.5})
  writer.write(2, {"loss": 0.25, "grad_norm": float("nan")})
  writer.close()
  time.sleep(1.1)  # event files are named by the second: the resumed run's is a new one
  writer = MetricWriter(gcs_path)  # a resumed run appends
  writer.write(3, {"loss": 0.125})
  writer.close()
  lines = storage.read_text(f"{gcs_path}/metrics.jsonl").splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "grad_norm": "nan"},
      {"step": 3, "loss": 0.125}]
  scalars = tensorboard_scalars(f"{gcs_path}/tensorboard")
  assert scalars["loss"] == {1: 0.5, 2: 0.25, 3: 0.125}


def test_pngs_go_to_the_bucket(gcs_path):
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  gray = pixels[..., :1]
  images.save_png(f"{gcs_path}/samples/rgb.png", pixels)
  images.save_png(f"{gcs_path}/samples/gray.png", gray)
  for name, expected in (("rgb.png", pixels), ("gray.png", gray[..., 0])):
    with storage.open_file(f"{gcs_path}/samples/{name}", "rb") as f:
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(f.read()))), expected)


def test_a_tfds_data_dir_in_a_bucket_reads_like_a_local_one(gcs_path, tmp_path):
  """digits prepared locally, copied to the bucket, read back through TFDS's ArrayRecord
  source (its reader is google-cloud-cpp, pointed at the emulator by the same variable)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  local_dir = str(tmp_path / "tensorflow_datasets")
  builders.prepared_builder("digits", local_dir)
  fsspec.filesystem("gcs").put(local_dir + "/", f"{gcs_path}/data", recursive=True)
  config = helpers.tiny_config()
  config.data.update(dataset="digits", data_dir=local_dir)
  local = sources.open_split(config.data, "test")
  config.data.data_dir = f"{gcs_path}/data"
  assert sources.prepared_tfds_datasets(config.data.data_dir) == []  # packaged: not listed
  assert sources.dataset_info(config.data) == local.info
  remote = sources.open_split(config.data, "test")
  assert len(remote.records) == len(local.records) == 355
  for index in (0, 1, 354):
    np.testing.assert_array_equal(remote.records[index]["image"], local.records[index]["image"])
    assert remote.records[index]["label"] == local.records[index]["label"]


def test_fid_statistics_are_cached_in_a_data_dir_in_a_bucket(gcs_path, tmp_path, monkeypatch):
  """The first call computes the split's statistics and writes them under data_dir in the bucket;
  the second reads them back from there (the features: the pixels themselves, not Inception)."""
  rng = np.random.default_rng(1)
  for index in range(3):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / f"{index}.png")
  config = helpers.tiny_config().data
  config.update(dataset=data.FOLDER_PREFIX + str(tmp_path), data_dir=f"{gcs_path}/data",
                train_split="train")
  monkeypatch.setattr(fid, "extract_features",
                      lambda params, images, mesh: images.reshape(len(images), -1)[:, :5])
  expected = frechet.feature_stats(
      data.load_split_numpy(config, "train")[0].reshape(3, -1)[:, :5])
  computed = fid.reference_stats(config, params={}, mesh=mesh_of(1))
  assert fid.stats_cache_path(config, "train", None).startswith(f"{gcs_path}/data/")
  assert storage.exists(fid.stats_cache_path(config, "train", None))
  monkeypatch.setattr(fid, "extract_features", None)  # a second computation would fail
  cached = fid.reference_stats(config, params={}, mesh=mesh_of(1))
  for stats in (computed, cached):
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-12)
    assert stats.count == 3


def png_bytes(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_an_image_folder_in_a_bucket_reads_like_the_local_one(gcs_path, tmp_path):
  """Two classes of PNGs, one in a nested folder, the same files locally and in the bucket: the
  same labels and pixels. Where no resize is needed the pixels are the files' own on the
  pipeline's 0–255 scale (a 12×8 image centre-cropped to its rows 2–9); a 16×16 one is resized."""
  rng = np.random.default_rng(0)
  files = {name: rng.integers(0, 256, shape, dtype=np.uint8) for name, shape in (
      ("cat/a.png", (8, 8, 3)), ("cat/b.png", (12, 8, 3)), ("dog/d.png", (16, 16, 3)),
      ("dog/deep/c.png", (8, 8, 3)))}
  local_root = tmp_path / "images"
  for name, pixels in files.items():
    (local_root / name).parent.mkdir(parents=True, exist_ok=True)
    (local_root / name).write_bytes(png_bytes(pixels))
    storage.write_bytes_atomically(f"{gcs_path}/images/{name}", png_bytes(pixels))
  storage.write_text(f"{gcs_path}/images/dog/notes.txt", "not an image")
  config = helpers.tiny_config().data
  config.update(num_channels=3, image_size=8)
  local, remote = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  local.dataset = data.FOLDER_PREFIX + str(local_root)
  remote.dataset = f"{data.FOLDER_PREFIX}{gcs_path}/images/"
  info = data.dataset_info(remote)
  assert info.num_classes == 2 and info.num_examples == {"train": 4}
  images_read, labels = data.load_split_numpy(remote, "train")
  local_images, local_labels = data.load_split_numpy(local, "train")
  np.testing.assert_array_equal(labels, [0, 0, 1, 1])  # cat/a, cat/b, dog/d, dog/deep/c
  np.testing.assert_array_equal(labels, local_labels)
  np.testing.assert_array_equal(images_read, local_images)
  for index, expected in ((0, files["cat/a.png"]), (1, files["cat/b.png"][2:10]),
                          (3, files["dog/deep/c.png"])):
    np.testing.assert_array_equal(images_read[index], expected)
  remote.dataset = f"{data.FOLDER_PREFIX}{gcs_path}/nothing"
  with pytest.raises(FileNotFoundError, match=f"image folder {gcs_path}/nothing does not exist"):
    data.dataset_info(remote)


@pytest.mark.slow
def test_train_py_in_a_bucket_stops_on_sigterm_and_resumes_exactly(gcs_path, tmp_path):
  """`train.py --workdir=gs://...` with only STORAGE_EMULATOR_HOST set. SIGTERM: it saves that
  step and exits 0; rerun, it resumes, and the whole loss curve equals an uninterrupted run's (in
  this process, in a local workdir). Checkpoints, metrics, TensorBoard events, sample grids,
  panels, the loss plot and config.json land in the bucket, and nothing in the current folder;
  sample.py and evaluate.py read the checkpoint back from the bucket and write their results
  there."""
  overrides = {"data.data_dir": str(tmp_path / "tensorflow_datasets"), "model.ch": 8,
               "model.ch_mult": (1, 2), "model.num_res_blocks": 1, "model.attn_resolutions": (),
               "diffusion.num_timesteps": 20, "train.batch_size": 8,
               "train.lr_decay": "constant",  # num_steps changes between the runs
               "train.log_every": 1, "train.checkpoint_every": 0, "train.sample_every": 1000,
               "train.eval_every": 0, "sample.num_samples": 8, "sample.batch_size": 8,
               "sample.num_steps": 2,
               # the programs that train.py compiles, this process reuses, and the other way round
               "train.compilation_cache_dir": jax.config.jax_compilation_cache_dir}
  run_dir = f"{gcs_path}/run"
  cwd = tmp_path / "train_cwd"
  cwd.mkdir()
  environment = {name: value for name, value in os.environ.items()
                 if not name.startswith(("TENSORSTORE_", "GOOGLE_AUTH_", "CLOUD_STORAGE_",
                                         "GCSFS_", "EPATH_"))}
  environment["PYTHONPATH"] = helpers.REPO

  def program(name: str, *flags: str) -> list[str]:
    return [sys.executable, os.path.join(helpers.REPO, name), f"--workdir={run_dir}", *flags]

  def train_py(num_steps: int) -> list[str]:
    return program("train.py", "--config", os.path.join(helpers.REPO, "configs", "default.py"),
                   *(f"--config.{name}={value}".replace(" ", "")
                     for name, value in overrides.items()),
                   f"--config.train.num_steps={num_steps}")

  process = subprocess.Popen(train_py(100_000), env=environment, cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 300
  while not storage.exists(f"{run_dir}/metrics.jsonl"):
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output[-3000:]
  assert "stopped by signal" in output
  (stopped_at,) = checkpoint.list_steps(run_dir)
  last_step = stopped_at + 2
  finished = subprocess.run(train_py(last_step), env=environment, cwd=cwd, capture_output=True,
                            text=True, timeout=300)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert f"trained steps {stopped_at}→{last_step}" in finished.stdout
  assert checkpoint.list_steps(run_dir) == [stopped_at, last_step]

  config = default.get_config()
  for name, value in overrides.items():
    section, field = name.split(".")
    config[section][field] = value
  config.train.update(num_steps=last_step, sample_every=0)
  uninterrupted = str(tmp_path / "uninterrupted")
  train.run(config, uninterrupted)
  rows = [json.loads(line) for line in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
  steps = [row["step"] for row in rows if "loss" in row]
  assert steps == list(range(1, last_step + 1))  # each step once, across the two runs
  np.testing.assert_allclose([row["loss"] for row in rows if "loss" in row],
                             [helpers.logged(uninterrupted)[step] for step in steps], rtol=1e-5)
  assert tensorboard_scalars(f"{run_dir}/tensorboard")["loss"].keys() == set(steps)
  saved_config = json.loads(storage.read_text(f"{run_dir}/config.json"))
  assert saved_config["train"]["num_steps"] == last_step
  for name in ("samples", "panels"):
    with storage.open_file(f"{run_dir}/{name}/step_{last_step:07d}.png", "rb") as f:
      assert Image.open(f).size[0] > 0
  assert storage.exists(f"{run_dir}/losses.png")

  for name, flags in (("sample.py", [f"--output_dir={gcs_path}/out", "--num_steps=2",
                                     "--num_samples=8", "--batch_size=8"]),
                      ("evaluate.py", ["--metric=bpd", "--num_images=8", "--batch_size=8"])):
    result = subprocess.run(program(name, *flags), env=environment, cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
  assert storage.exists(f"{gcs_path}/out/samples.png")
  settings = json.loads(storage.read_text(f"{gcs_path}/out/settings.json"))
  assert settings["checkpoint_step"] == last_step and settings["workdir"] == run_dir
  with storage.open_file(f"{gcs_path}/out/samples.npz", "rb") as f:
    assert np.load(io.BytesIO(f.read()))["images"].shape == (8, 8, 8, 1)
  evaluation = json.loads(storage.read_text(f"{run_dir}/eval/bpd_{last_step:07d}.json"))
  assert evaluation["checkpoint_step"] == last_step and evaluation["bpd"] > 0
  assert os.listdir(cwd) == []  # no local `gs:` folder
