"""The forward process q(x_t | x0), its posterior q(x_{t−1} | x_t, x0), and the conversions
between the three things a network may predict: the noise ε, the clean image x0, and
v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022).

Every function is pure; `t` is an int array of shape [batch] indexing the schedule.
"""

import jax
import jax.numpy as jnp

from jaxdiff import validation
from jaxdiff.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("beta", "beta_tilde")  # the reverse step's σ_t²: DDPM's upper and lower bounds


def at(coefficients: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """coefficients[t], shaped [batch, 1, …, 1] to broadcast against x."""
  return coefficients[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))


def q_sample(schedule: Schedule, x0, t, noise):
  """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε."""
  return (at(schedule.sqrt_alpha_bars, t, x0) * x0
          + at(schedule.sqrt_one_minus_alpha_bars, t, x0) * noise)


def q_posterior(schedule: Schedule, x0, x_t, t):
  """q(x_{t−1} | x_t, x0) = N(μ̃_t, β̃_t I): returns (μ̃_t, β̃_t, log β̃_t clipped).

  μ̃_t = β_t √ᾱ_{t−1}/(1−ᾱ_t) · x0 + (1−ᾱ_{t−1}) √α_t/(1−ᾱ_t) · x_t.
  """
  mean = (at(schedule.posterior_mean_coef1, t, x_t) * x0
          + at(schedule.posterior_mean_coef2, t, x_t) * x_t)
  variance = at(schedule.posterior_variance, t, x_t)
  log_variance = at(schedule.posterior_log_variance_clipped, t, x_t)
  return mean, variance, log_variance


def predict_x0(schedule: Schedule, x_t, t, eps):
  """x0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε."""
  return (at(schedule.sqrt_recip_alpha_bars, t, x_t) * x_t
          - at(schedule.sqrt_recipm1_alpha_bars, t, x_t) * eps)


def predict_eps(schedule: Schedule, x_t, t, x0):
  """ε = (x_t − √ᾱ_t x0) / √(1 − ᾱ_t): finite also where ᾱ_t = 0 (there ε = x_t)."""
  return ((x_t - at(schedule.sqrt_alpha_bars, t, x_t) * x0)
          / at(schedule.sqrt_one_minus_alpha_bars, t, x_t))


def v_target(schedule: Schedule, x0, t, eps):
  """v = √ᾱ_t ε − √(1−ᾱ_t) x0."""
  return (at(schedule.sqrt_alpha_bars, t, x0) * eps
          - at(schedule.sqrt_one_minus_alpha_bars, t, x0) * x0)


def eps_and_x0_from_v(schedule: Schedule, x_t, t, v):
  """ε = √(1−ᾱ_t) x_t + √ᾱ_t v and x0 = √ᾱ_t x_t − √(1−ᾱ_t) v."""
  sqrt_alpha_bar = at(schedule.sqrt_alpha_bars, t, x_t)
  sqrt_one_minus = at(schedule.sqrt_one_minus_alpha_bars, t, x_t)
  return sqrt_one_minus * x_t + sqrt_alpha_bar * v, sqrt_alpha_bar * x_t - sqrt_one_minus * v


def check_prediction(prediction: str) -> None:
  validation.one_of("prediction", prediction, PREDICTIONS, "prediction target")


def training_target(schedule: Schedule, prediction: str, x0, t, eps):
  """What a network trained to predict `prediction` should output for (x0, t, ε)."""
  check_prediction(prediction)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  return v_target(schedule, x0, t, eps)


def eps_and_x0(schedule: Schedule, prediction: str, x_t, t, model_output,
               clip_x0: bool = False):
  """(ε̂, x̂0) implied by a network's output, whichever of ε, x0 or v it predicts.

  With `clip_x0`, x̂0 is clipped to [−1, 1] and ε̂ recomputed from it, so both stay consistent.
  """
  check_prediction(prediction)
  if prediction == "eps":
    eps, x0 = model_output, predict_x0(schedule, x_t, t, model_output)
  elif prediction == "x0":
    eps, x0 = predict_eps(schedule, x_t, t, model_output), model_output
  else:
    eps, x0 = eps_and_x0_from_v(schedule, x_t, t, model_output)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = predict_eps(schedule, x_t, t, x0)
  return eps, x0


def p_mean_variance(schedule: Schedule, prediction: str, x_t, t, model_output,
                    clip_x0: bool = False, variance: str = "beta"):
  """The reverse step p(x_{t−1} | x_t) = N(μ̃_t(x̂0, x_t), σ_t² I): returns (mean, log σ_t², x̂0).

  σ_t² = β_t ("beta", DDPM's upper bound) or β̃_t ("beta_tilde", its lower bound). With x̂0
  from ε̂, μ̃_t equals DDPM's 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε̂).
  """
  _, x0 = eps_and_x0(schedule, prediction, x_t, t, model_output, clip_x0)
  mean, _, posterior_log_variance = q_posterior(schedule, x0, x_t, t)
  if variance == "beta":
    # DDPM's fixed-large variance, with σ_0² = β̃_1 so that log σ² stays finite at t = 0.
    log_betas = jnp.concatenate(
        [schedule.posterior_log_variance_clipped[:1], jnp.log(schedule.betas[1:])])
    log_variance = at(log_betas, t, x_t)
  else:
    validation.one_of("variance", variance, VARIANCES, "variance")
    log_variance = posterior_log_variance
  return mean, log_variance, x0
