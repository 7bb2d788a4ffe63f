"""Pictures that show the idea working: the denoising panel and the loss curves."""

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from jaxdiff import images, storage

PANEL_COLUMNS = ("x0", "x_t", "noise ε", "predicted ε̂", "x̂0 in one step")


def denoising_rows(process, predict_fn, x0, noise, times):
  """For each time t of the noise process: [x0, x_t, ε, ε̂, x̂0] with x_t = α_t x0 + σ_t ε shown
  as x_t/√(α_t² + σ_t²) (unit variance, whatever the process), and (ε̂, x̂0) what the network's
  output `predict_fn(x_t, t)` means (`process.eps_and_x0`), x̂0 the image recovered in one step.
  Returns float [len(times), N, 5, H, W, C]."""
  rows = []
  for time in times:
    t = jnp.full(x0.shape[:1], time)
    x_t = process.q_sample(x0, t, noise)
    eps_hat, x0_hat = process.eps_and_x0(x_t, t, predict_fn(x_t, t))
    alpha, sigma = process.alpha_sigma(t)
    shown = x_t / jnp.sqrt(alpha**2 + sigma**2).reshape(t.shape + (1,) * (x0.ndim - 1))
    rows.append(jnp.stack([x0, shown, noise, eps_hat, x0_hat], axis=1))
  return np.asarray(jax.device_get(jnp.stack(rows)))


def denoising_panel(rows: np.ndarray) -> np.ndarray:
  """The rows as one uint8 image: a row per (t, image), the five columns of `denoising_rows`.
  Images are shown on [−1, 1]; noise on [−3, 3] (3 standard deviations)."""
  value_range = np.array([1.0, 1.0, 3.0, 3.0, 1.0]).reshape(1, 1, 5, 1, 1, 1)
  tiles = images.to_uint8(np.clip(rows / value_range, -1, 1))
  num_t, num_images, num_columns = tiles.shape[:3]
  flat = tiles.reshape(num_t * num_images * num_columns, *tiles.shape[3:])
  return images.make_grid(flat, num_columns=num_columns,
                          scale=images.display_scale(tiles.shape[3]))


class LossPlot(NamedTuple):
  """What `plot_losses` draws: the loss curve and the mean loss of each t-bin late in training."""

  steps: list[int]
  losses: list[float]
  bin_means: list[float]   # bin i: mean of loss_t_bin_i over the last tenth of the logs
  num_late: int            # how many logs that last tenth holds


def plot_losses(metrics_path: str, output_path: str) -> LossPlot | None:
  """Two plots from metrics.jsonl: the training loss against step, and the loss in each t-bin
  over the last tenth of training (how hard denoising is at each noise level). Returns what it
  plotted (None, writing nothing, when no record has a loss)."""
  records = [json.loads(line) for line in storage.read_text(metrics_path).splitlines()]
  records = [r for r in records if isinstance(r.get("loss"), float)]
  if not records:
    return None
  late = records[-max(1, len(records) // 10):]
  bins = sorted({k for r in late for k in r if k.startswith("loss_t_bin_")},
                key=lambda k: int(k.rsplit("_", 1)[1]))
  plotted = LossPlot(steps=[r["step"] for r in records], losses=[r["loss"] for r in records],
                     bin_means=[float(np.mean([r[k] for r in late if k in r])) for k in bins],
                     num_late=len(late))
  figure = Figure(figsize=(10, 3.5))  # no pyplot: no backend to choose, no global state
  curve, by_t = figure.subplots(1, 2)
  curve.plot(plotted.steps, plotted.losses)
  curve.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
  by_t.bar(range(len(bins)), plotted.bin_means)
  by_t.set(xlabel=f"t bin (of {len(bins)}, low t = little noise)", ylabel="loss",
           title=f"loss by timestep, last {len(late)} logs")
  figure.tight_layout()
  with storage.open_file(output_path, "wb") as f:
    figure.savefig(f, dpi=100, format="png")
  return plotted
