"""What several test files share: float64 references, small configs for fast end-to-end runs,
and reading their logs. Test files import this module (`from tests.helpers import ...`), never
each other."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np

from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**model):
  """The default config with a 16-channel, one-block U-Net and T = 100 (`model` overrides
  config.model): compiles in seconds."""
  config = default.get_config()
  config.model.update({**dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                              dropout=0.1), **model})
  config.diffusion.num_timesteps = 100
  config.train.update(batch_size=32, learning_rate=2e-3, warmup_steps=10, num_steps=200,
                      eval_every=0)
  return config


def job_config(data_dir, **train):
  """`tiny_config` at one resolution level without attention (a train step compiles in about
  half the time) for a training job in a test: batch 16, a log row every step, checkpoints
  every 3 steps, no sample grids, and a constant learning rate after the warm-up, so that jobs
  of any num_steps compile one train step (the compilation cache then serves the next job);
  `train` overrides config.train."""
  config = tiny_config(ch_mult=(1,), attn_resolutions=())
  config.data.data_dir = data_dir
  config.train.update({"batch_size": 16, "log_every": 1, "checkpoint_every": 3, "sample_every": 0,
                       "lr_decay": "constant", **train})
  return config


TRAINED_STEPS = 300


def trained_config(data_dir):
  """`job_config` for TRAINED_STEPS steps with cosine decay, one checkpoint at the end and
  post-hoc EMA snapshots of the default profiles every 100 steps: the session's
  `trained_workdir` (tests/conftest.py), a model that beats the uniform bits/dim baseline."""
  return job_config(data_dir, num_steps=TRAINED_STEPS, checkpoint_every=TRAINED_STEPS,
                    log_every=50, lr_decay="cosine", phema_every=100)


# Runs PROGRAM's `main` through `cli.run` once per command line, all in one interpreter: each with
# every flag back at its default, stdout and stderr captured and the exit code kept.
_PROGRAM_RUNNER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, sys
    from absl import flags
    path, command_lines = sys.argv[1], json.loads(sys.argv[2])
    spec = importlib.util.spec_from_file_location("program", path)
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    results = []
    for args in command_lines:
      flags.FLAGS.unparse_flags()
      sys.argv = [path, *args]
      stdout, stderr = io.StringIO(), io.StringIO()
      with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
          program.cli.run(program.main)
        except SystemExit as exit_:
          results.append([exit_.code or 0, stdout.getvalue(), stderr.getvalue()])
    print(json.dumps(results))
""")


def run_program(program, command_lines, env=None):
  """[(exit code, stdout, stderr)] of `python PROGRAM ARGS…` for each ARGS of `command_lines`,
  as from the command line but in one process: one start of Python and JAX for all of them."""
  finished = subprocess.run(
      [sys.executable, "-c", _PROGRAM_RUNNER, os.path.join(REPO, program),
       json.dumps(command_lines)], cwd=REPO, env=env or dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=600)
  assert finished.returncode == 0, finished.stdout + finished.stderr
  results = [tuple(result) for result in json.loads(finished.stdout.splitlines()[-1])]
  assert len(results) == len(command_lines), finished.stderr
  return results


def made_once(tmp_path_factory, name: str, make) -> str:
  """The folder NAME of this test session, shared by its xdist workers: the first worker to ask
  calls make(folder) while holding a lock; the others wait for it and reuse what it made."""
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    root = root.parent  # the session's folder above every worker's own
  folder, made = root / name, root / f"{name}.made"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not made.exists():
      shutil.rmtree(folder, ignore_errors=True)  # left by a worker whose make failed
      folder.mkdir()
      make(str(folder))
      made.touch()
  return str(folder)


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
