"""Forward process, posterior and ε/x0/v conversions against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion, schedules
from tests.helpers import reference

T = 1000


@pytest.fixture(scope="module")
def schedule():
  return schedules.linear(T)


@pytest.fixture(scope="module")
def ref():
  return reference(np.linspace(1e-4, 0.02, T))


def random_inputs(seed, shape=(6, 5, 5, 3)):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, shape)
  noise = rng.standard_normal(shape)
  t = rng.integers(0, T, shape[0])
  t[0], t[-1] = 0, T - 1
  return x0, noise, t


def test_q_sample_matches_reference(schedule, ref):
  x0, noise, t = random_inputs(0)
  expected = (np.sqrt(ref["alpha_bars"][t])[:, None, None, None] * x0
              + np.sqrt(1 - ref["alpha_bars"][t])[:, None, None, None] * noise)
  actual = diffusion.q_sample(schedule, jnp.float32(x0), jnp.asarray(t), jnp.float32(noise))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_q_sample_statistics(schedule):
  """Over many draws x_t has mean √ᾱ_t x0 and variance 1 − ᾱ_t."""
  x0 = jnp.full((4, 4, 1), 0.7)
  for t in (0, 100, 500, 999):
    noise = jax.random.normal(jax.random.key(t), (20000, 4, 4, 1))
    x_t = diffusion.q_sample(schedule, x0[None], jnp.full((20000,), t), noise)
    alpha_bar = float(schedule.alpha_bars[t])
    np.testing.assert_allclose(x_t.mean(0), np.sqrt(alpha_bar) * 0.7, atol=0.03)
    np.testing.assert_allclose(x_t.var(0), 1 - alpha_bar, rtol=0.06, atol=2e-5)


def test_q_posterior_matches_reference(schedule, ref):
  x0, x_t, t = random_inputs(1)
  b = lambda v: v[t][:, None, None, None]
  expected_mean = (b(ref["posterior_mean_coef1"]) * x0 + b(ref["posterior_mean_coef2"]) * x_t)
  mean, var, log_var = diffusion.q_posterior(schedule, jnp.float32(x0), jnp.float32(x_t),
                                             jnp.asarray(t))
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var[:, 0, 0, 0], ref["posterior_variance"][t], rtol=1e-5)
  np.testing.assert_allclose(log_var[:, 0, 0, 0], ref["posterior_log_variance_clipped"][t],
                             rtol=1e-5)
  assert var[0, 0, 0, 0] == 0 and np.isfinite(log_var).all()  # t = 0: β̃_0 = 0, log clipped


def test_posterior_mean_from_eps_equals_ddpm_sampling_mean(schedule, ref):
  """μ̃_t(x̂0(x_t, ε), x_t) = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε)   (DDPM eq. 11)."""
  _, eps, t = random_inputs(2)
  x_t = np.random.default_rng(3).standard_normal(eps.shape)
  b = lambda v: v[t][:, None, None, None]
  expected = 1 / np.sqrt(b(ref["alphas"])) * (
      x_t - b(ref["betas"]) / np.sqrt(1 - b(ref["alpha_bars"])) * eps)
  x0_hat = diffusion.predict_x0(schedule, jnp.float32(x_t), jnp.asarray(t), jnp.float32(eps))
  mean, _, _ = diffusion.q_posterior(schedule, x0_hat, jnp.float32(x_t), jnp.asarray(t))
  np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-4)
  mean2, log_var, _ = diffusion.p_mean_variance(schedule, "eps", jnp.float32(x_t),
                                                jnp.asarray(t), jnp.float32(eps))
  np.testing.assert_allclose(mean2, mean, rtol=1e-6, atol=1e-6)
  expected_log_var = np.log(np.append(ref["posterior_variance"][1], ref["betas"][1:]))[t]
  np.testing.assert_allclose(log_var[:, 0, 0, 0], expected_log_var, rtol=1e-5)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_predictions_round_trip(schedule, prediction):
  """Whatever the network predicts, the implied (ε̂, x̂0) are the true (ε, x0)."""
  x0, eps, t = random_inputs(4)
  t = np.clip(t, 1, T - 1) if prediction == "x0" else t  # x0 -> ε divides by √(1−ᾱ) = 0.01 at t=0
  x0, eps, t = jnp.float32(x0), jnp.float32(eps), jnp.asarray(t)
  x_t = diffusion.q_sample(schedule, x0, t, eps)
  output = diffusion.training_target(schedule, prediction, x0, t, eps)
  eps_hat, x0_hat = diffusion.eps_and_x0(schedule, prediction, x_t, t, output)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-3 if prediction != "x0" else 5e-2)


def test_v_definition_and_inverse(schedule, ref):
  x0, eps, t = random_inputs(5)
  s = np.sqrt(ref["alpha_bars"][t])[:, None, None, None]
  c = np.sqrt(1 - ref["alpha_bars"][t])[:, None, None, None]
  v = diffusion.v_target(schedule, jnp.float32(x0), jnp.asarray(t), jnp.float32(eps))
  np.testing.assert_allclose(v, s * eps - c * x0, rtol=1e-5, atol=1e-5)
  x_t = s * x0 + c * eps
  eps_hat, x0_hat = diffusion.eps_and_x0_from_v(schedule, jnp.float32(x_t), jnp.asarray(t), v)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)


def test_clip_x0_keeps_eps_consistent(schedule):
  x_t = 3.0 * jax.random.normal(jax.random.key(0), (4, 3, 3, 1))
  t = jnp.array([10, 200, 600, 999])
  eps_hat, x0_hat = diffusion.eps_and_x0(schedule, "eps", x_t, t, jnp.zeros_like(x_t),
                                         clip_x0=True)
  assert float(jnp.abs(x0_hat).max()) <= 1.0
  np.testing.assert_allclose(diffusion.predict_x0(schedule, x_t, t, eps_hat), x0_hat, atol=1e-4)


def test_unknown_prediction_and_variance(schedule):
  x = jnp.zeros((1, 2, 2, 1))
  t = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="^prediction = 'score': unknown prediction target; "
                     "choose one of eps, x0, v$"):
    diffusion.eps_and_x0(schedule, "score", x, t, x)
  with pytest.raises(ValueError, match="unknown variance"):
    diffusion.p_mean_variance(schedule, "eps", x, t, x, variance="learned")


def test_predict_eps_matches_reference(schedule, ref):
  x0, eps, t = random_inputs(6)
  s = np.sqrt(ref["alpha_bars"][t])[:, None, None, None]
  c = np.sqrt(1 - ref["alpha_bars"][t])[:, None, None, None]
  eps_hat = diffusion.predict_eps(schedule, jnp.float32(s * x0 + c * eps), jnp.asarray(t),
                                  jnp.float32(x0))
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)


def test_v_prediction_is_finite_at_zero_terminal_snr():
  """At ᾱ_{T−1} = 0, x_T = ε: v = −x0, so ε̂ = x_T and x̂0 = −v̂ whatever v̂ is, also when x̂0 is
  clipped (ε̂ recomputed from it), and the reverse step's mean and variance stay finite."""
  zero_snr = schedules.from_betas(schedules.rescale_zero_terminal_snr(np.linspace(1e-4, 0.02, T)))
  x_t = 2.0 * jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
  v_hat = 3.0 * jax.random.normal(jax.random.key(2), x_t.shape)
  t = jnp.full((3,), T - 1)
  for clip_x0 in (False, True):
    eps_hat, x0_hat = diffusion.eps_and_x0(zero_snr, "v", x_t, t, v_hat, clip_x0)
    np.testing.assert_array_equal(eps_hat, x_t)
    expected_x0 = jnp.clip(-v_hat, -1, 1) if clip_x0 else -v_hat
    np.testing.assert_array_equal(x0_hat, expected_x0)
    for variance in ("beta", "beta_tilde"):
      mean, log_variance, _ = diffusion.p_mean_variance(zero_snr, "v", x_t, t, v_hat, clip_x0,
                                                        variance)
      assert np.all(np.isfinite(mean)) and np.all(np.isfinite(log_variance))
