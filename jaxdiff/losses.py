"""Training objectives: the denoising loss of any noise process (`processes`), and the VLB
terms of DDPM's chain (bits/dim)."""

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion, validation
from jaxdiff.schedules import Schedule

# denoise_fn(params, x_t, t, labels_or_None, dropout_key) -> network output shaped like x_t.
DenoiseFn = Callable[..., jax.Array]


def drop_labels(key, labels, num_classes: int, p_uncond: float):
  """Classifier-free guidance training: each label becomes `num_classes` (the null label)
  with probability p_uncond."""
  drop = jax.random.bernoulli(key, p_uncond, labels.shape)
  return jnp.where(drop, num_classes, labels)


def draw_noise(key, batch, *, process, num_classes: int = 0, p_uncond: float = 0.0):
  """The per-example randomness of the loss for a whole batch: ({'t': t from the process's
  training distribution [B] (DDPM: U{0, …, T−1}), 'noise': ε ~ N(0, I) like the images, and with
  classes 'label': the labels after classifier-free label dropout}, the network's dropout key).
  Drawn for the whole global batch at once, so that splitting it into micro-batches afterwards
  leaves every example's draw as it was."""
  x0 = batch["image"]
  t_key, noise_key, label_key, dropout_key = jax.random.split(key, 4)
  draws = {"t": process.sample_time(t_key, x0.shape[0]),
           "noise": jax.random.normal(noise_key, x0.shape, x0.dtype)}
  if num_classes:
    draws["label"] = drop_labels(label_key, batch["label"], num_classes, p_uncond)
  return draws, dropout_key


LOSS_WEIGHTINGS = ("none", "min_snr")


def check_loss_weighting(weighting: str) -> None:
  validation.one_of("loss_weighting", weighting, LOSS_WEIGHTINGS, "loss weighting")


def snr(schedule: Schedule, t):
  """SNR(t) = ᾱ_t / (1 − ᾱ_t), from the float64-derived square roots (0 where ᾱ_t = 0)."""
  return jnp.square(schedule.sqrt_alpha_bars[t] / schedule.sqrt_one_minus_alpha_bars[t])


def min_snr_weight(schedule: Schedule, t, prediction: str, gamma: float):
  """Min-SNR-γ (Hang et al. 2023): the per-example weight of the `prediction` target's squared
  error that makes the loss min(SNR_t, γ) · ‖x̂0 − x0‖². An error e in x̂0 is an error √SNR · e
  in ε̂ and √(SNR + 1) · e in v̂, so the weight is min(SNR, γ)/SNR for ε (1 where SNR = 0),
  min(SNR, γ) for x0 and min(SNR, γ)/(SNR + 1) for v."""
  diffusion.check_prediction(prediction)
  snr_t = snr(schedule, t)
  if prediction == "eps":
    return jnp.minimum(1.0, gamma / snr_t)
  clipped = jnp.minimum(snr_t, gamma)
  return clipped if prediction == "x0" else clipped / (snr_t + 1.0)


def loss_from_draws(denoise_fn: DenoiseFn, params, process, batch, draws, dropout_key,
                    weighting: str = "none", min_snr_gamma: float = 5.0):
  """The mean over the batch of w_t ‖F_target − F_θ(x_t, t)‖² at the given draws: x_t =
  process.q_sample(x0, t, ε) and the output that is exactly right for (x0, ε) at t,
  `process.training_target` (DDPM eq. 14 with an ε, x0 or v target; EDM's preconditioned
  target, whose weight λ(σ) is folded in; the flow's velocity ε − x0); w_t = 1 (weighting
  "none") or, on DDPM's chain, `min_snr_weight` with γ = min_snr_gamma ("min_snr"). Returns
  (mean loss, aux) where aux holds the per-example weighted losses (mean over pixels, then w_t)
  and their times."""
  check_loss_weighting(weighting)
  x0, t, noise = batch["image"], draws["t"], draws["noise"]
  x_t = process.q_sample(x0, t, noise)
  output = denoise_fn(params, x_t, t, draws.get("label"), dropout_key)
  target = process.training_target(x0, noise, x_t, t)
  per_example = jnp.mean(jnp.square(output.astype(jnp.float32) - target),
                         axis=tuple(range(1, x0.ndim)))
  if weighting == "min_snr":
    per_example = per_example * min_snr_weight(process.schedule, t, process.prediction,
                                               min_snr_gamma)
  return jnp.mean(per_example), {"per_example_loss": per_example, "t": t}


def diffusion_loss(denoise_fn: DenoiseFn, params, process, batch, key, num_classes: int = 0,
                   p_uncond: float = 0.0, weighting: str = "none", min_snr_gamma: float = 5.0):
  """E_{t, ε} w_t ‖F_target − F_θ(x_t, t)‖² with t from the process's training distribution and
  ε ~ N(0, I): `loss_from_draws` at `draw_noise(key, batch)`."""
  draws, dropout_key = draw_noise(key, batch, process=process, num_classes=num_classes,
                                  p_uncond=p_uncond)
  return loss_from_draws(denoise_fn, params, process, batch, draws, dropout_key, weighting,
                         min_snr_gamma)


# The variational bound (DDPM eq. 5), per example, in nats:
#   L = L_T + Σ_{t≥1} L_{t−1} + L_0
#   L_T     = KL(q(x_T | x0) ‖ N(0, I))
#   L_{t−1} = KL(q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t))
#   L_0     = −log p_θ(x0 | x_1), a Gaussian integrated over each pixel's bin (eq. 13).
# Timesteps are 0-indexed: index t here is the paper's t + 1, so index 0 is the decoder.


def normal_kl(mean_a, log_var_a, mean_b, log_var_b):
  """KL(N(μ_a, σ_a²) ‖ N(μ_b, σ_b²)) = ½ (log σ_b² − log σ_a² − 1 + σ_a²/σ_b² + (μ_a − μ_b)²/σ_b²),
  elementwise, in nats."""
  return 0.5 * (log_var_b - log_var_a - 1.0 + jnp.exp(log_var_a - log_var_b)
                + jnp.square(mean_a - mean_b) * jnp.exp(-log_var_b))


def _log_sub_exp(log_a, log_b):
  """log(e^a − e^b) for a > b, without cancellation: a + log(1 − e^{b−a})."""
  delta = log_b - log_a
  return log_a + jnp.where(delta > -jnp.log(2.0), jnp.log(-jnp.expm1(delta)),
                           jnp.log1p(-jnp.exp(delta)))


def discretized_gaussian_log_likelihood(x, mean, log_var, num_levels: int):
  """log P(x) for x on the grid {−1, −1 + Δ, …, 1}, Δ = 2/(num_levels − 1): the mass of
  N(mean, σ²) on x's bin [x − Δ/2, x + Δ/2], the two end bins reaching to ∓∞ (DDPM eq. 13).

  A bin's mass Φ(z⁺) − Φ(z⁻) is taken on the side of 0 where it does not cancel (Φ(−z⁻) −
  Φ(−z⁺) when the bin lies above the mean), in log space, so far-off pixels keep their
  true, tiny likelihood instead of rounding to 0.
  """
  inv_std = jnp.exp(-0.5 * log_var)
  half_bin = 1.0 / (num_levels - 1)
  z_upper = (x - mean + half_bin) * inv_std
  z_lower = (x - mean - half_bin) * inv_std
  above_mean = z_upper + z_lower > 0
  near, far = jnp.where(above_mean, -z_lower, z_upper), jnp.where(above_mean, -z_upper, z_lower)
  log_mass = _log_sub_exp(jax.scipy.special.log_ndtr(near), jax.scipy.special.log_ndtr(far))
  lowest, highest = x < -1.0 + half_bin, x > 1.0 - half_bin
  log_mass = jnp.where(lowest, jax.scipy.special.log_ndtr(z_upper), log_mass)
  return jnp.where(highest, jax.scipy.special.log_ndtr(-z_lower), log_mass)


def _sum_per_example(x):
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def prior_kl(schedule: Schedule, x0):
  """L_T = KL(N(√ᾱ_T x0, (1 − ᾱ_T) I) ‖ N(0, I)) per example, in nats."""
  mean = schedule.sqrt_alpha_bars[-1] * x0
  log_var = 2.0 * jnp.log(schedule.sqrt_one_minus_alpha_bars[-1])
  return _sum_per_example(normal_kl(mean, log_var, 0.0, 0.0))


def vb_term(apply_fn, variables, schedule: Schedule, x0, t, noise, *, num_levels: int,
            prediction: str = "eps", variance: str = "beta", clip_x0: bool = True):
  """The bound's term at index t per example, in nats: L_0 = −log p_θ(x0 | x_1) where t = 0,
  else L_{t} = KL(q(x_t | x_{t+1}, x0) ‖ p_θ(x_t | x_{t+1})) (paper indices), with x_{t+1} =
  q_sample(x0, t, noise). `apply_fn(variables, x_t, t)` is the network."""
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  output = apply_fn(variables, x_t, t).astype(jnp.float32)
  model_mean, model_log_var, _ = diffusion.p_mean_variance(
      schedule, prediction, x_t, t, output, clip_x0, variance)
  true_mean, _, true_log_var = diffusion.q_posterior(schedule, x0, x_t, t)
  kl = _sum_per_example(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
  decoder_nll = -_sum_per_example(
      discretized_gaussian_log_likelihood(x0, model_mean, model_log_var, num_levels))
  return jnp.where(t == 0, decoder_nll, kl)
