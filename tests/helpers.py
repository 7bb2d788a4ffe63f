"""References shared by several test files (test files never import each other)."""

import numpy as np


def reference(betas):
  """Every coefficient from DDPM's equations (Ho et al. 2020, eqs. 4, 6, 7), in float64."""
  betas = np.asarray(betas, np.float64)
  T = len(betas)
  alpha = 1 - betas
  alpha_bar = np.array([np.prod(alpha[: t + 1]) for t in range(T)])
  alpha_bar_prev = np.array([1.0] + [alpha_bar[t - 1] for t in range(1, T)])
  beta_tilde = np.array([(1 - alpha_bar_prev[t]) / (1 - alpha_bar[t]) * betas[t] for t in range(T)])
  return dict(
      betas=betas, alphas=alpha, alpha_bars=alpha_bar, alpha_bars_prev=alpha_bar_prev,
      sqrt_alpha_bars=np.sqrt(alpha_bar), sqrt_one_minus_alpha_bars=np.sqrt(1 - alpha_bar),
      sqrt_recip_alpha_bars=1 / np.sqrt(alpha_bar),
      sqrt_recipm1_alpha_bars=np.sqrt(1 / alpha_bar - 1),
      posterior_variance=beta_tilde,
      posterior_log_variance_clipped=np.log([beta_tilde[1]] + list(beta_tilde[1:])),
      posterior_mean_coef1=np.sqrt(alpha_bar_prev) * betas / (1 - alpha_bar),
      posterior_mean_coef2=np.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar),
  )
