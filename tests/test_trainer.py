"""The training job end to end: exact resume, the NaN guard, and `train.py` as a user runs it."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from jaxdiff import checkpoint, denoiser, errors, parallel, train_step
from jaxdiff.jobs import train
from jaxdiff.jobs import workdir as workdir_lib
from tests.helpers import REPO, job_config, logged


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.mark.slow
def test_resume_gives_the_losses_and_post_hoc_averages_of_an_uninterrupted_run(tmp_path,
                                                                                 data_dir):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.run(job_config(data_dir, num_steps=6, phema_every=2), straight)
  train.run(job_config(data_dir, num_steps=3, phema_every=2), resumed)
  summary = train.run(job_config(data_dir, num_steps=6, phema_every=2), resumed)
  assert (summary.first_step, summary.last_step) == (3, 6)
  expected, actual = logged(straight), logged(resumed)
  assert sorted(actual) == list(range(1, 7))
  np.testing.assert_allclose([actual[s] for s in range(1, 7)],
                             [expected[s] for s in range(1, 7)], rtol=1e-5)
  abstract = (workdir_lib.load_model(straight).params,) * 2
  with checkpoint.PhemaSnapshots(straight) as a, checkpoint.PhemaSnapshots(resumed) as b:
    assert (a.steps(), b.steps()) == ([2, 4, 6], [2, 3, 4, 6])  # every 2, and where runs end
    for left, right in zip(a.read(6, abstract)[0], b.read(6, abstract)[0]):
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), left,
                   right)


@pytest.mark.slow
def test_a_diverging_run_never_saves_and_keeps_the_good_checkpoints(tmp_path, data_dir):
  """The issue's case: good steps on disk, then a resume at a learning rate that explodes. The
  exploding steps are never saved, the good ones are never rotated out, the error says what is
  on disk and how to resume, and a rerun at a sane rate resumes from the good state."""
  workdir = str(tmp_path)
  train.run(job_config(data_dir, num_steps=4, checkpoint_every=2), workdir)
  config_json = open(os.path.join(workdir, "config.json")).read()
  exploding = job_config(data_dir, num_steps=40, learning_rate=1e8, warmup_steps=0,
                         checkpoint_every=1, max_to_keep=1, max_nonfinite_steps=3)
  with pytest.raises(train.TrainingError, match=r"training diverged: .*3 unhealthy steps in a "
                     r"row.*steps \[2, 4\].*--config.train.resume_step=N") as raised:
    train.run(exploding, workdir)
  assert "\n" not in str(raised.value)
  assert checkpoint.list_steps(workdir) == [2, 4]
  assert open(os.path.join(workdir, "config.json")).read() != config_json  # the resume was valid
  summary = train.run(job_config(data_dir, num_steps=6, checkpoint_every=2), workdir)
  assert (summary.first_step, summary.last_step) == (4, 6) and np.isfinite(summary.final_loss)


@pytest.mark.slow
def test_a_run_that_ends_unhealthy_exits_with_an_error(tmp_path, data_dir):
  """Fewer unhealthy steps than max_nonfinite_steps at the end is still no success."""
  config = job_config(data_dir, num_steps=2, learning_rate=1e8, warmup_steps=0,
                      max_nonfinite_steps=10)
  with pytest.raises(train.TrainingError, match="There is no checkpoint"):
    train.run(config, str(tmp_path))
  assert checkpoint.list_steps(str(tmp_path)) == []


@pytest.mark.slow
def test_a_refused_resume_leaves_config_json_as_it_was(tmp_path, data_dir):
  workdir = str(tmp_path)
  train.run(job_config(data_dir, num_steps=3), workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  changed = job_config(data_dir, num_steps=4)
  changed.model.ch = 8
  with pytest.raises(errors.UsageError, match="model.ch 8 .config. vs 16"):
    train.run(changed, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before
  uneven = job_config(data_dir, num_steps=6, steps_per_call=2, checkpoint_every=2)
  with pytest.raises(errors.UsageError, match=r"^--config.train.steps_per_call=2: the run goes "
                                              r"from step 3 to 6"):  # 3 steps: 1.5 calls
    train.run(uneven, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before


@pytest.mark.slow
def test_resume_step_continues_from_an_older_checkpoint(tmp_path, data_dir):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.run(job_config(data_dir, num_steps=5, checkpoint_every=2), straight)
  train.run(job_config(data_dir, num_steps=4, checkpoint_every=2), resumed)
  summary = train.run(job_config(data_dir, num_steps=5, checkpoint_every=0, resume_step=2),
                      resumed)
  assert summary.first_step == 2
  np.testing.assert_allclose(logged(resumed)[5], logged(straight)[5], rtol=1e-5)


@pytest.mark.slow
def test_profile_steps_write_a_trace_tensorboard_reads(tmp_path, data_dir):
  train.run(job_config(data_dir, num_steps=3, profile_steps=(2, 3)), str(tmp_path))
  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with pytest.raises(errors.UsageError, match=r"profile_steps=\(3, 2\)"):
    train.run(job_config(data_dir, num_steps=3, profile_steps=(3, 2)), str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow
def test_steps_per_call_and_fsdp_log_every_step_like_the_plain_loop(tmp_path, data_dir):
  """Two steps per compiled call, and the state split over fsdp = 2, log a row per step with the
  losses of the plain loop; every row carries images/s and TFLOP/s per device, and the first
  the step's compile time."""
  plain, stacked, sharded = (str(tmp_path / name) for name in ("plain", "stacked", "sharded"))
  train.run(job_config(data_dir, num_steps=4, checkpoint_every=2), plain)
  train.run(job_config(data_dir, num_steps=4, checkpoint_every=2, steps_per_call=2), stacked)
  config = job_config(data_dir, num_steps=4, checkpoint_every=2)
  config.mesh.fsdp = 2
  train.run(config, sharded)
  for workdir in (stacked, sharded):
    np.testing.assert_allclose([logged(workdir)[s] for s in range(1, 5)],
                               [logged(plain)[s] for s in range(1, 5)], rtol=1e-5)
    assert checkpoint.list_steps(workdir) == [2, 4]
  rows = logged(stacked, "tflops_per_device")
  assert sorted(rows) == [1, 2, 3, 4] and all(value > 0 for value in rows.values())
  assert sorted(logged(stacked, "compile_seconds")) == [1]


def test_is_due_every_k_steps_and_at_the_end():
  assert [s for s in range(1, 11) if train.is_due(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if train.is_due(s, 0, 10)] == []


def test_loss_health_flags_non_finite_exploding_and_spiking_steps():
  health = train.LossHealth(max_bad_steps=2, spike_factor=10.0, max_relative_update=0.5,
                            min_history=3)
  for step, loss in enumerate([1.0, 0.5, 0.4, 0.45], start=1):
    health.update(step, loss, True, 0.01)
  assert health.healthy and health.last_good_loss == 0.45
  health.update(5, 5.0, True, 0.01)  # 10.5× the median 0.475 of the healthy history
  assert not health.healthy and "spiked to 5 " in health.reason and not health.diverged
  health.update(6, 0.4, True, 0.01)
  assert health.healthy
  health.update(7, 0.4, True, 3.0)
  assert "changed the parameters by 3" in health.reason
  health.update(8, float("nan"), False, float("nan"))
  assert health.diverged and "non-finite" in health.reason


@pytest.mark.slow
def test_train_py_writes_everything_stops_on_sigterm_and_resumes(tmp_path, data_dir):
  """A one-level U-Net at a constant learning rate: both runs compile the same train step, the
  second takes it from the compilation cache."""
  workdir = str(tmp_path / "work")
  flags = [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           "--config.model.ch=16", "--config.model.ch_mult=(1,)",
           "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=()",
           "--config.diffusion.num_timesteps=20", "--config.train.batch_size=8",
           "--config.train.warmup_steps=0", "--config.train.lr_decay=constant",
           "--config.train.log_every=2",
           "--config.train.checkpoint_every=1000", "--config.sample.num_samples=8",
           "--config.sample.batch_size=8", "--config.sample.num_steps=20",
           "--config.train.eval_every=0"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  command = [sys.executable, os.path.join(REPO, "train.py")] + flags
  process = subprocess.Popen(command + ["--config.train.num_steps=100000"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    assert process.poll() is None, process.stdout.read()
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert "stopped by signal" in output
  stopped_at = max(checkpoint.list_steps(workdir), default=None)
  assert stopped_at is not None and stopped_at >= 2

  finished = subprocess.run(command + [f"--config.train.num_steps={stopped_at + 4}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
  assert finished.returncode == 0, finished.stdout + finished.stderr
  assert f"trained steps {stopped_at}→{stopped_at + 4}" in finished.stdout
  final = f"step_{stopped_at + 4:07d}.png"
  for name in ("config.json", "metrics.jsonl", "losses.png", f"samples/{final}", f"panels/{final}"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{workdir}/tensorboard"))
  assert max(checkpoint.list_steps(workdir), default=None) == stopped_at + 4
  record = json.loads(open(metrics).readline())
  assert {"step", "loss", "learning_rate", "grad_norm", "steps_per_sec"} <= set(record)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one_and_agree_on_preemption(tmp_path, data_dir):
  """Two hosts of two CPU devices each (jax.distributed on localhost), the state split over an
  fsdp axis of 4 that spans both. SIGTERM reaches only process 1; both stop after the same step,
  save it and exit 0. The rerun resumes, and the whole loss curve equals what one process
  computes alone without interruption: the data shards, the global batch, the sharded state,
  the collectives and the resume line up. A one-level U-Net keeps the compiles short; its
  64 × 64 time-embedding kernel (and its Adam moments) still split over fsdp."""
  workdir = str(tmp_path / "two_hosts")
  overrides = {"data.data_dir": data_dir, "model.ch": 16, "model.ch_mult": (1,),
               "model.num_res_blocks": 1, "model.attn_resolutions": (), "model.dropout": 0.1,
               "diffusion.num_timesteps": 20, "train.batch_size": 8, "train.log_every": 1,
               "train.checkpoint_every": 1000, "train.sample_every": 0, "train.eval_every": 0,
               "train.warmup_steps": 0, "train.lr_decay": "constant",  # num_steps changes
               "mesh.fsdp": 4}
  flags = [f"--config.{name}={value}".replace(" ", "") for name, value in overrides.items()]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")

  def start(num_steps):
    common = flags + [f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{free_port()}",
                      "--num_processes=2", f"--config.train.num_steps={num_steps}"]
    return [subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *common,
                              f"--process_id={i}"], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for i in range(2)]

  processes = start(100_000)
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics_file) and os.path.getsize(metrics_file)):
    assert time.time() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output
  assert "stopped by signal" in outputs[0] and "trained steps" not in outputs[1]
  (stopped_at,) = checkpoint.list_steps(workdir)

  processes = start(stopped_at + 2)
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output
  assert f"trained steps {stopped_at}→{stopped_at + 2}" in outputs[0]
  assert checkpoint.list_steps(workdir) == [stopped_at, stopped_at + 2]

  config = default.get_config()
  for name, value in overrides.items():
    section, field = name.split(".")
    config[section][field] = value
  config.train.num_steps = stopped_at + 2
  params = train_step.abstract_state(denoiser.from_config(config), config.train).params
  assert any(parallel.fsdp_spec(x.shape, 4) != P() for x in jax.tree.leaves(params))
  alone = str(tmp_path / "one_host")
  train.run(config, alone)
  steps = range(1, stopped_at + 3)
  np.testing.assert_allclose([logged(workdir)[s] for s in steps],
                             [logged(alone)[s] for s in steps], rtol=1e-5)


@pytest.mark.slow
def test_evaluates_every_eval_every_steps_into_metrics_and_tensorboard(tmp_path, judged_data_dir):
  config = job_config(judged_data_dir, num_steps=4, eval_every=3)
  config.eval.update(metrics=("quality", "bpd"), num_samples=32, batch_size=16, num_steps=5,
                     bpd_images=16)
  workdir = str(tmp_path / "work")
  train.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evaluations = {r["step"]: r for r in map(json.loads, f) if "eval/seconds" in r}
  assert sorted(evaluations) == [3, 4]  # every 3 steps, and at the end
  for record in evaluations.values():
    assert record["eval/quality/num_samples"] == 32
    assert record["eval/quality/frechet_noise_vs_real"] > record["eval/quality/frechet_real_vs_real"]
    assert 0 <= record["eval/quality/class_entropy_bits"] <= np.log2(10) + 1e-9
    assert record["eval/bpd/num_images"] == 16
    assert record["eval/bpd/bpd"] > 0 and record["eval/bpd/uniform_bpd"] == pytest.approx(np.log2(17))
  event_files = os.listdir(os.path.join(workdir, "tensorboard"))
  assert event_files


@pytest.mark.slow
def test_a_metric_that_cannot_run_stops_training_before_it_starts(tmp_path, data_dir):
  config = job_config(data_dir, num_steps=2, eval_every=1)
  config.eval.metrics = ("likelihood",)
  with pytest.raises(errors.UsageError, match="likelihood: unknown metric"):
    train.run(config, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work")


@pytest.mark.slow
@pytest.mark.parametrize("name, value", [("log_every", 0), ("checkpoint_every", -1),
                                         ("eval_every", -5)])
def test_a_bad_step_interval_stops_training_before_it_starts(tmp_path, data_dir, name, value):
  config = job_config(data_dir, num_steps=2, **{name: value})
  with pytest.raises(errors.UsageError,
                     match=f"^--config.train.{name}={value}: expected a whole number"):
    train.run(config, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work")


@pytest.mark.slow
def test_checkpoint_every_zero_saves_only_the_last_step(tmp_path, data_dir):
  train.run(job_config(data_dir, num_steps=4, checkpoint_every=0), str(tmp_path))
  assert checkpoint.list_steps(str(tmp_path)) == [4]
