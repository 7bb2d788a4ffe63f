"""What several test files share: float64 references, small configs for fast end-to-end runs,
and reading their logs. Test files import this module (`from tests.helpers import ...`), never
each other."""

import json
import os

import numpy as np

from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**model):
  """The default config with a 16-channel, one-block U-Net and T = 100: compiles in seconds."""
  config = default.get_config()
  config.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                      dropout=0.1, **model)
  config.diffusion.num_timesteps = 100
  config.train.update(batch_size=32, learning_rate=2e-3, warmup_steps=10, num_steps=200,
                      eval_every=0)
  return config


def job_config(data_dir, **train):
  """`tiny_config` for a training job in a test: batch 16, a log row every step, checkpoints
  every 3 steps, no sample grids; `train` overrides config.train."""
  config = tiny_config()
  config.data.data_dir = data_dir
  config.train.update({"batch_size": 16, "log_every": 1, "checkpoint_every": 3, "sample_every": 0,
                       **train})
  return config


def logged(workdir, key="loss"):
  """{step: value of `key`} from WORKDIR/metrics.jsonl (rows that have it)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r[key] for r in records if key in r}


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
