"""The Fréchet distance against scipy's matrix square root on known Gaussians."""

import numpy as np
import pytest
import scipy.linalg

from jaxdiff.evaluation import frechet


def scipy_frechet(mu_a, sigma_a, mu_b, sigma_b):
  """d² = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) with scipy's sqrtm (pytorch-fid's way)."""
  covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * covmean))


def random_spd(rng, dim):
  factor = rng.standard_normal((dim, dim))
  return factor @ factor.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_matches_scipy_on_known_gaussians(dim):
  rng = np.random.default_rng(dim)
  mu_a, mu_b = rng.standard_normal(dim), rng.standard_normal(dim)
  sigma_a, sigma_b = random_spd(rng, dim), random_spd(rng, dim)
  got = frechet.frechet_distance(frechet.FeatureStats(mu_a, sigma_a, 0),
                                 frechet.FeatureStats(mu_b, sigma_b, 0))
  np.testing.assert_allclose(got, scipy_frechet(mu_a, sigma_a, mu_b, sigma_b), rtol=1e-8)


def test_closed_form_for_isotropic_gaussians():
  """N(μ_a, a²I) vs N(μ_b, b²I) in d dims: d² = ‖μ_a − μ_b‖² + d (a − b)²."""
  dim, a, b = 7, 1.5, 0.5
  mu_a, mu_b = np.zeros(dim), np.full(dim, 2.0)
  got = frechet.frechet_distance(frechet.FeatureStats(mu_a, a * a * np.eye(dim), 0),
                                 frechet.FeatureStats(mu_b, b * b * np.eye(dim), 0))
  np.testing.assert_allclose(got, 4.0 * dim + dim * (a - b) ** 2, rtol=1e-12)


def test_same_samples_give_zero_and_singular_covariances_stay_finite():
  rng = np.random.default_rng(0)
  features = np.maximum(rng.standard_normal((50, 100)), 0)  # rank ≤ 50 < 100: singular Σ
  stats = frechet.feature_stats(features)
  assert stats.count == 50
  np.testing.assert_allclose(stats.sigma, np.cov(features.T), rtol=1e-12)
  assert frechet.frechet_distance(stats, stats, eps=1e-6) == pytest.approx(0.0, abs=1e-6)
  other = frechet.feature_stats(features + 1.0)
  assert frechet.frechet_distance(stats, other, eps=1e-6) == pytest.approx(100.0, rel=1e-6)


def test_rejects_mismatched_or_too_few_features():
  with pytest.raises(ValueError, match="feature matrix"):
    frechet.feature_stats(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="feature sizes differ"):
    frechet.frechet_distance(frechet.feature_stats(np.eye(3)), frechet.feature_stats(np.eye(4)))
