"""L_simple: zero for an oracle, the right scale for a null network, label dropout rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion, losses, processes, schedules

SCHEDULE = schedules.linear(1000)


def ddpm(prediction="eps", schedule=SCHEDULE):
  return processes.DDPM(schedule, prediction)
IMAGE = jnp.linspace(-1, 1, 4 * 4 * 3).reshape(1, 4, 4, 3)


def oracle(prediction):
  """The exact network for data that is one fixed image: it knows x0, so it knows ε (and v)."""

  def denoise_fn(params, x_t, t, labels, key):
    del params, labels, key
    x0 = jnp.broadcast_to(IMAGE, x_t.shape)
    eps = diffusion.predict_eps(SCHEDULE, x_t, t, x0)
    return diffusion.training_target(SCHEDULE, prediction, x0, t, eps)

  return denoise_fn


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_oracle_has_zero_loss(prediction):
  batch = {"image": jnp.broadcast_to(IMAGE, (64, 4, 4, 3))}
  loss, aux = losses.diffusion_loss(oracle(prediction), None, ddpm(prediction), batch,
                                    jax.random.key(0))
  assert float(loss) < 1e-6
  assert aux["per_example_loss"].shape == (64,) and aux["t"].shape == (64,)


def test_null_network_loss_is_the_target_second_moment():
  """With output 0, L_simple = E‖ε‖²/D = 1 for ε, and E‖x0‖²/D for x0."""
  batch = {"image": jnp.broadcast_to(IMAGE, (4096, 4, 4, 3))}
  zero = lambda params, x_t, t, labels, key: jnp.zeros_like(x_t)
  loss_eps, aux = losses.diffusion_loss(zero, None, ddpm("eps"), batch, jax.random.key(1))
  loss_x0, _ = losses.diffusion_loss(zero, None, ddpm("x0"), batch, jax.random.key(1))
  assert abs(float(loss_eps) - 1) < 0.02
  np.testing.assert_allclose(loss_x0, jnp.mean(IMAGE**2), rtol=1e-5)
  t = np.asarray(aux["t"])
  assert t.min() >= 0 and t.max() <= 999 and len(np.unique(t)) > 900  # t ~ U{0..T-1}


def test_labels_reach_the_network_and_are_dropped_at_rate_p_uncond():
  seen = {}

  def record(params, x_t, t, labels, key):
    seen["labels"] = labels
    return jnp.zeros_like(x_t)

  labels = jnp.arange(20000) % 10
  batch = {"image": jnp.zeros((20000, 1, 1, 1)), "label": labels}
  losses.diffusion_loss(record, None, ddpm(), batch, jax.random.key(2), num_classes=10,
                        p_uncond=0.2)
  dropped = np.asarray(seen["labels"] == 10)
  assert abs(dropped.mean() - 0.2) < 0.01
  np.testing.assert_array_equal(np.asarray(seen["labels"])[~dropped], np.asarray(labels)[~dropped])
  losses.diffusion_loss(record, None, ddpm(), {"image": batch["image"]}, jax.random.key(2))
  assert seen["labels"] is None  # unconditional models never see labels


ZERO_SNR = schedules.from_betas(schedules.rescale_zero_terminal_snr(np.linspace(1e-4, 0.02, 1000)))
ALL_T = jnp.arange(1000)


def snr_reference(schedule_betas):
  alpha_bars = np.cumprod(1.0 - np.asarray(schedule_betas, np.float64))
  return alpha_bars / (1.0 - alpha_bars)


@pytest.mark.parametrize("schedule, betas", [
    (SCHEDULE, np.linspace(1e-4, 0.02, 1000)),
    (schedules.cosine(1000), schedules.cosine_betas(1000)),
    (ZERO_SNR, schedules.rescale_zero_terminal_snr(np.linspace(1e-4, 0.02, 1000))),
])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_match_the_closed_form(schedule, betas, gamma):
  snr = snr_reference(betas)
  clipped = np.minimum(snr, gamma)
  with np.errstate(divide="ignore", invalid="ignore"):
    eps_weight = np.where(snr > 0, clipped / snr, 1.0)  # its limit 1 at SNR = 0
  expected = {"eps": eps_weight, "x0": clipped, "v": clipped / (snr + 1.0)}
  np.testing.assert_allclose(losses.snr(schedule, ALL_T), snr, rtol=2e-6)
  for prediction, weight in expected.items():
    got = losses.min_snr_weight(schedule, ALL_T, prediction, gamma)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, weight, rtol=2e-6, atol=1e-12, err_msg=prediction)


def implied_outputs(schedule, x0_error):
  """Denoisers whose ε, x0 and v outputs all imply x̂0 = x0 + x0_error, at the true x_t."""

  def denoise_fn(prediction):
    def fn(params, x_t, t, labels, key):
      del params, labels, key
      x0_hat = jnp.broadcast_to(IMAGE, x_t.shape) + x0_error
      eps_hat = diffusion.predict_eps(schedule, x_t, t, x0_hat)
      return diffusion.training_target(schedule, prediction, x0_hat, t, eps_hat)
    return fn

  return denoise_fn


@pytest.mark.parametrize("schedule", [SCHEDULE, ZERO_SNR], ids=["linear", "zero_terminal_snr"])
def test_min_snr_losses_of_the_three_targets_agree_for_the_same_x0_error(schedule):
  """Each weighted loss is min(SNR_t, γ) · mean ‖x̂0 − x0‖², whichever target the network has."""
  t = jnp.array([0, 1, 10, 100, 300, 500, 800, 999])
  batch = {"image": jnp.broadcast_to(IMAGE, (8, 4, 4, 3))}
  draws = {"t": t, "noise": jax.random.normal(jax.random.key(3), batch["image"].shape)}
  x0_error = 0.1 * jax.random.normal(jax.random.key(4), batch["image"].shape)
  denoise_fn = implied_outputs(schedule, x0_error)
  snr = np.asarray(losses.snr(schedule, t), np.float64)
  expected = np.minimum(snr, 5.0) * np.mean(np.square(np.asarray(x0_error, np.float64)),
                                             axis=(1, 2, 3))
  per_target = {}
  for prediction in diffusion.PREDICTIONS:
    loss, aux = losses.loss_from_draws(denoise_fn(prediction), None, ddpm(prediction, schedule),
                                       batch, draws, None, "min_snr", 5.0)
    per_target[prediction] = aux["per_example_loss"]
    np.testing.assert_allclose(aux["per_example_loss"], expected, rtol=2e-3, atol=1e-7,
                               err_msg=prediction)
    np.testing.assert_allclose(loss, np.mean(expected), rtol=2e-3)
  np.testing.assert_allclose(per_target["eps"], per_target["v"], rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(per_target["x0"], per_target["v"], rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_no_weighting_is_plain_l_simple_bit_for_bit(prediction):
  batch = {"image": jnp.broadcast_to(IMAGE, (16, 4, 4, 3))}
  draws, _ = losses.draw_noise(jax.random.key(5), batch, process=ddpm(prediction))
  x0_error = 0.1 * jax.random.normal(jax.random.key(6), batch["image"].shape)
  denoise_fn = implied_outputs(SCHEDULE, x0_error)(prediction)
  loss, aux = losses.loss_from_draws(denoise_fn, None, ddpm(prediction), batch, draws, None)
  explicit, explicit_aux = losses.loss_from_draws(denoise_fn, None, ddpm(prediction), batch,
                                                  draws, None, "none", 5.0)
  x_t = diffusion.q_sample(SCHEDULE, batch["image"], draws["t"], draws["noise"])
  target = diffusion.training_target(SCHEDULE, prediction, batch["image"], draws["t"],
                                     draws["noise"])
  per_example = jnp.mean(jnp.square(denoise_fn(None, x_t, draws["t"], None, None) - target),
                         axis=(1, 2, 3))
  for got in (aux["per_example_loss"], explicit_aux["per_example_loss"]):
    np.testing.assert_array_equal(got, per_example)
  np.testing.assert_array_equal(loss, jnp.mean(per_example))
  np.testing.assert_array_equal(explicit, jnp.mean(per_example))


def test_unknown_loss_weighting():
  batch = {"image": jnp.zeros((2, 1, 1, 1))}
  with pytest.raises(ValueError, match="^loss_weighting = 'p2': unknown loss weighting; "
                                       "choose one of none, min_snr$"):
    losses.diffusion_loss(lambda *args: jnp.zeros((2, 1, 1, 1)), None, ddpm(), batch,
                          jax.random.key(0), weighting="p2")


def test_prior_and_bound_terms_are_finite_at_zero_terminal_snr():
  """ᾱ_{T−1} = 0: L_T = KL(N(0, I) ‖ N(0, I)) = 0, and every term of the bound of a v-network
  (any output) is finite, t = T−1 included."""
  x0 = jnp.broadcast_to(IMAGE, (4, 4, 4, 3))
  np.testing.assert_array_equal(losses.prior_kl(ZERO_SNR, x0), np.zeros(4))
  t = jnp.array([0, 1, 500, 999])
  noise = jax.random.normal(jax.random.key(7), x0.shape)
  apply_fn = lambda variables, x_t, t: 2.0 * x_t
  for variance in ("beta", "beta_tilde"):
    vb_term = jax.jit(lambda schedule, x0, t, noise: losses.vb_term(
        apply_fn, None, schedule, x0, t, noise, num_levels=256, prediction="v",
        variance=variance))
    terms = vb_term(ZERO_SNR, x0, t, noise)
    assert np.all(np.isfinite(terms)), (variance, terms)
