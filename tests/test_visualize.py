"""The denoising panel and the loss plot."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxdiff import processes, schedules, train_step, visualize

SCHEDULE = schedules.linear(1000)
DDPM = processes.DDPM(SCHEDULE, "eps")


def inputs(n=3):
  x0 = jax.random.uniform(jax.random.key(0), (n, 8, 8, 1), minval=-1, maxval=1)
  return x0, jax.random.normal(jax.random.key(1), x0.shape)


def test_recovered_x0_is_x0_when_the_prediction_is_the_true_noise():
  x0, noise = inputs()
  rows = visualize.denoising_rows(DDPM, lambda x_t, t: noise, x0, noise, DDPM.panel_times())
  assert rows.shape == (5, 3, 5, 8, 8, 1)
  np.testing.assert_array_equal(rows[:, :, 0], np.broadcast_to(x0, rows[:, :, 0].shape))
  np.testing.assert_array_equal(rows[:, :, 3], rows[:, :, 2])
  # Exact up to float32 rounding, which 1/√ᾱ_950 ≈ 100 amplifies to ~3e-5.
  np.testing.assert_allclose(rows[:, :, 4], np.broadcast_to(x0, rows[:, :, 4].shape), atol=1e-4)


def test_a_null_network_recovers_a_rescaled_x_t():
  """ε̂ = 0 gives x̂0 = x_t/√ᾱ_t: the one-step guess of an untrained network."""
  x0, noise = inputs()
  rows = visualize.denoising_rows(DDPM, lambda x_t, t: jnp.zeros_like(x_t), x0, noise, (500,))
  np.testing.assert_allclose(rows[0, :, 4], rows[0, :, 1] / np.sqrt(SCHEDULE.alpha_bars[500]),
                             rtol=1e-5)


def test_panel_image_has_a_row_per_t_and_image_and_five_columns():
  x0, noise = inputs(2)
  rows = visualize.denoising_rows(DDPM, lambda x_t, t: noise, x0, noise, (50, 950))
  panel = visualize.denoising_panel(rows)
  tile = 8 * 4 + 1  # 8×8 images are shown 4× with a 1-pixel gap
  assert panel.shape == (2 * 2 * tile + 1, 5 * tile + 1, 1) and panel.dtype == np.uint8


def test_loss_plot_draws_the_loss_curve_and_the_late_bin_means(tmp_path):
  bins = train_step.loss_by_timestep(jnp.ones(1000), DDPM.time_bin(jnp.arange(1000), 10), 10)
  np.testing.assert_array_equal(bins["loss_bin_count"], [100] * 10)  # every bin is covered
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(1, 21):
      record = {"step": step, "loss": 1.0 / step}
      record.update({f"loss_t_bin_{i}": 0.01 * step * (10 - i) for i in range(10)})
      f.write(json.dumps(record) + "\n")
      if step == 10:  # an evaluation record has no loss and is not plotted
        f.write(json.dumps({"step": step, "eval/quality/accuracy": 0.5}) + "\n")
  plotted = visualize.plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "losses.png"))
  assert plotted.steps == list(range(1, 21))
  np.testing.assert_allclose(plotted.losses, [1.0 / step for step in range(1, 21)])
  # The last tenth of 20 logs is steps 19 and 20: bin i's mean is 0.01 · 19.5 · (10 − i).
  assert plotted.num_late == 2
  np.testing.assert_allclose(plotted.bin_means, [0.195 * (10 - i) for i in range(10)])
  assert Image.open(tmp_path / "losses.png").size == (1000, 350)


def test_no_loss_plot_without_a_loss(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/bpd/bpd": 3.1}) + "\n")
  plotted = visualize.plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "losses.png"))
  assert plotted is None
  assert not (tmp_path / "losses.png").exists()
