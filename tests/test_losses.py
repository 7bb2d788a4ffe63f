"""L_simple: zero for an oracle, the right scale for a null network, label dropout rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion, losses, schedules

SCHEDULE = schedules.linear(1000)
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
  loss, aux = losses.diffusion_loss(oracle(prediction), None, SCHEDULE, batch,
                                    jax.random.key(0), prediction)
  assert float(loss) < 1e-6
  assert aux["per_example_loss"].shape == (64,) and aux["t"].shape == (64,)


def test_null_network_loss_is_the_target_second_moment():
  """With output 0, L_simple = E‖ε‖²/D = 1 for ε, and E‖x0‖²/D for x0."""
  batch = {"image": jnp.broadcast_to(IMAGE, (4096, 4, 4, 3))}
  zero = lambda params, x_t, t, labels, key: jnp.zeros_like(x_t)
  loss_eps, aux = losses.diffusion_loss(zero, None, SCHEDULE, batch, jax.random.key(1), "eps")
  loss_x0, _ = losses.diffusion_loss(zero, None, SCHEDULE, batch, jax.random.key(1), "x0")
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
  losses.diffusion_loss(record, None, SCHEDULE, batch, jax.random.key(2), num_classes=10,
                        p_uncond=0.2)
  dropped = np.asarray(seen["labels"] == 10)
  assert abs(dropped.mean() - 0.2) < 0.01
  np.testing.assert_array_equal(np.asarray(seen["labels"])[~dropped], np.asarray(labels)[~dropped])
  losses.diffusion_loss(record, None, SCHEDULE, {"image": batch["image"]}, jax.random.key(2))
  assert seen["labels"] is None  # unconditional models never see labels
