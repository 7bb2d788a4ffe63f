"""The Fréchet distance between two Gaussians fitted to feature sets (FID and its offline kin)."""

from typing import NamedTuple

import numpy as np


class FeatureStats(NamedTuple):
  """Mean and covariance of a feature set, float64; `count` is how many rows made them."""
  mu: np.ndarray
  sigma: np.ndarray
  count: int


def feature_stats(features) -> FeatureStats:
  """μ = mean of the rows, Σ = their unbiased covariance (as pytorch-fid and TTUR compute it)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"need a [N ≥ 2, D] feature matrix, got shape {features.shape}")
  return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])


def _sqrt_psd(matrix):
  """Symmetric square root of a symmetric positive semi-definite matrix (negative
  round-off eigenvalues clipped to 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh(matrix)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(stats_a: FeatureStats, stats_b: FeatureStats, eps: float = 0.0) -> float:
  """d² = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}, in float64.

  tr (Σ_a Σ_b)^{1/2} equals the trace of the symmetric root of Σ_a^{1/2} Σ_b Σ_a^{1/2}, which
  has the same eigenvalues and stays real. `eps`·I is added to both covariances first: features
  with dead units make them singular.
  """
  if stats_a.mu.shape != stats_b.mu.shape:
    raise ValueError(f"feature sizes differ: {stats_a.mu.shape} vs {stats_b.mu.shape}")
  identity = np.eye(stats_a.mu.shape[0])
  sigma_a = stats_a.sigma + eps * identity
  sigma_b = stats_b.sigma + eps * identity
  root_a = _sqrt_psd(sigma_a)
  inner = root_a @ sigma_b @ root_a
  eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
  diff = stats_a.mu - stats_b.mu
  distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt
  return float(max(distance, 0.0))
