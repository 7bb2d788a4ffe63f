"""`sample.py` and the library call behind it, on the session's tiny trained workdir."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxdiff import errors, generate, samplers
from jaxdiff.samplers import SamplingOptions
from jaxdiff.jobs import evaluate, sample, train
from jaxdiff.jobs import workdir as workdir_lib
from tests.helpers import REPO, TRAINED_STEPS, job_config, made_once, run_program


@pytest.mark.slow
@pytest.mark.parametrize("sampler", sorted(name for name, registered in samplers.SAMPLERS.items()
                                            if registered.processes is None
                                            or "ddpm" in registered.processes))
def test_each_sampler_writes_images_npz_and_settings(trained_workdir, tmp_path, sampler):
  options = dict(sampler=sampler, num_steps=5, batch_size=8)
  written = sample.run(trained_workdir, str(tmp_path), options, num_samples=10, seed=3,
                       trajectory_every=2, progress=False)
  assert sorted(os.path.basename(p) for p in written.paths) == [
      "samples.npz", "samples.png", "settings.json", "trajectory.png"]
  arrays = np.load(tmp_path / "samples.npz")
  assert arrays["images"].shape == (10, 8, 8, 1) and arrays["images"].dtype == np.uint8
  # 10 images of 8×8, shown 4× larger, in a 4×3 grid with 1-pixel gaps.
  assert Image.open(tmp_path / "samples.png").size == (4 * 33 + 1, 3 * 33 + 1)
  settings = json.load(open(tmp_path / "settings.json"))
  assert settings["sampler"] == sampler and settings["checkpoint_step"] == TRAINED_STEPS
  assert settings["dtype"] == "float32" and settings["images_per_second"] > 0
  assert settings["first_batch_seconds"] == written.timing["first_batch_seconds"] > 0
  assert SamplingOptions(**{name: settings[name] for name in (
      "sampler", "num_steps", "spacing", "clip_x0", "threshold_percentile", "eta", "variance",
      "guidance_scale", "batch_size")}) == SamplingOptions(**options).resolved(
          workdir_lib.load_model(trained_workdir).denoiser.process)
  assert settings["spacing"] == samplers.SAMPLERS[sampler].spacing  # what was used, explicit
  again = tmp_path / "again"
  sample.run(trained_workdir, str(again), options, num_samples=10, seed=3, progress=False)
  np.testing.assert_array_equal(np.load(again / "samples.npz")["images"], arrays["images"])


@pytest.mark.slow
def test_bfloat16_sampling_is_close_to_float32(trained_workdir, tmp_path, monkeypatch):
  """dtype (--dtype) overrides the model's float32 compute for sampling: generate gets the
  network in that dtype, its images are close to the float32 ones (test_samplers shows that
  they differ), and settings.json says which dtype computed them."""
  options = dict(sampler="dpm_solver", num_steps=5, batch_size=8)
  generate_images, networks = generate.generate, []

  def recording(denoiser, *args, **kwargs):
    networks.append(denoiser.dtype)
    return generate_images(denoiser, *args, **kwargs)

  monkeypatch.setattr(generate, "generate", recording)
  pixels = {}
  for dtype in ("float32", "bfloat16", None):
    out = tmp_path / str(dtype)
    sample.run(trained_workdir, str(out), options, num_samples=8, dtype=dtype, progress=False)
    assert json.load(open(out / "settings.json"))["dtype"] == (dtype or "float32")
    pixels[dtype] = np.load(out / "samples.npz")["images"].astype(np.float64)
  assert networks == ["float32", "bfloat16", "float32"]
  np.testing.assert_array_equal(pixels[None], pixels["float32"])
  assert np.abs(pixels["bfloat16"] - pixels["float32"]).mean() < 2.0  # of 255 levels


@pytest.mark.slow
def test_sample_py_from_the_command_line(trained_workdir, tmp_path):
  """One real command line; then the trajectory, seven bad flags (exit 2, one line) and a missing
  workdir (exit 1) through sample.py's own `main` and `cli.run`, all in one more process."""
  command = [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={trained_workdir}",
             "--sampler=dpm_solver", "--num_steps=4", "--num_samples=4", "--batch_size=4",
             f"--output_dir={tmp_path}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert np.load(tmp_path / "samples.npz")["images"].shape == (4, 8, 8, 1)
  assert re.search(r"^sampling: first batch \(compile and run\) [0-9.e+-]+ s, one batch only",
                   result.stdout, re.MULTILINE), result.stdout
  bad_flags = [("--sampler=plms", "--sampler=plms: unknown sampler"),
               ("--sampler=edm_stochastic", "--sampler=edm_stochastic: defined for the process "
                "edm only; this model's is ddpm"),
               ("--num_steps=0", "--num_steps=0: expected a whole number ≥ 1"),
               ("--num_steps=101", "--num_steps=101: more than the model's T = 100"),
               ("--batch_size=0", "--batch_size=0: expected a whole number ≥ 1"),
               ("--trajectory_every=0", "--trajectory_every=0: must be at least 1"),
               ("--dtype=float16", "--dtype=float16: unknown compute dtype; choose one "
                "of float32, bfloat16"),
               ("--guidance_scale=3", "--guidance_scale=3.0: this model is unconditional")]
  flags = command[2:]
  trajectory, missing, *refused = run_program("sample.py", [
      flags + ["--trajectory", f"--output_dir={tmp_path}/t"], [f"--workdir={tmp_path}/nothing"],
      *(flags + [bad] for bad, _ in bad_flags)], env)
  assert trajectory[0] == 0, trajectory[2]
  tile = 8 * 4 + 1  # 4 samples (rows) × 5 frames: x_T and after 1, 2, 3, 4 steps
  assert Image.open(tmp_path / "t" / "trajectory.png").size == (5 * tile + 1, 4 * tile + 1)
  for (exit_code, _, stderr), (_, message) in zip(refused, bad_flags):
    assert exit_code == 2 and message in stderr, stderr
    assert "Traceback" not in stderr
  exit_code, _, stderr = missing
  assert exit_code == 1 and "does not exist" in stderr


@pytest.mark.slow
def test_class_conditional_model_trains_with_label_dropout_and_samples_with_guidance(
    tmp_path, judged_data_dir):
  config = job_config(judged_data_dir, num_steps=2, p_uncond=0.2)
  config.model.num_classes = 10
  train.run(config, str(tmp_path / "work"))
  sample.run(str(tmp_path / "work"), str(tmp_path / "out"),
             dict(sampler="ddim", num_steps=4, batch_size=8, guidance_scale=2.0),
             num_samples=8, class_label=3, progress=False)
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "samples.npz")["labels"], [3] * 8)
  with pytest.raises(errors.UsageError,
                     match=r"^--class_label=12: class labels must be in \[0, 10\)$"):
    sample.run(str(tmp_path / "work"), str(tmp_path / "bad"), dict(num_steps=4, batch_size=8),
               num_samples=8, class_label=12, progress=False)


@pytest.mark.slow
def test_an_exported_ema_checkpoint_samples_like_its_workdir(trained_workdir, tmp_path):
  """docs/gpu-sampling.md: export the EMA params, copy them, sample from the export."""
  workdir_lib.export_ema(trained_workdir, str(tmp_path / "export"))
  for source, out in ((trained_workdir, "from_workdir"), (str(tmp_path / "export"), "from_export")):
    sample.run(source, str(tmp_path / out), dict(sampler="ddim", num_steps=4, batch_size=8),
               num_samples=8, seed=1, progress=False)
  np.testing.assert_array_equal(np.load(tmp_path / "from_export" / "samples.npz")["images"],
                                np.load(tmp_path / "from_workdir" / "samples.npz")["images"])


@pytest.mark.slow
def test_evaluate_py_writes_the_denoising_panel(trained_workdir, tmp_path):
  command = [sys.executable, os.path.join(REPO, "evaluate.py"), f"--workdir={trained_workdir}",
             "--metric=panel", f"--output={tmp_path / 'panel.png'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  tile = 8 * 4 + 1  # 8×8 digits shown 4× with a gap: 5 t × 4 images rows, 5 columns
  assert Image.open(tmp_path / "panel.png").size == (5 * tile + 1, 20 * tile + 1)


EVALUATE_PY_BAD_FLAGS = [
    ("--num_samples=0", "--num_samples=0: must be at least 1"),
    ("--batch_size=-2", "--batch_size=-2: must be at least 1"),
    ("--output={a_file}/x.json", "{a_file} is a file, not a folder"),
    ("--threshold_percentile=2", "--threshold_percentile=2.0: expected a number in (0, 1]"),
    ("--dtype=half", "--dtype=half: unknown compute dtype"),
    ("--spacing=cubic", "--spacing=cubic: unknown spacing")]


@pytest.fixture
def evaluate_py(tmp_path_factory, trained_workdir):
  """evaluate.py's command lines of the tests below, run once for all xdist workers in one
  process (`run_program`): {case: (exit code, stdout, stderr)}, the outputs in FOLDER/CASE.json,
  A_FILE a file where a folder should be."""

  def make(folder):
    a_file = os.path.join(folder, "a_file")
    with open(a_file, "w") as f:
      f.write("not a folder")
    workdir = f"--workdir={trained_workdir}"
    command_lines = {
        "bpd": [workdir, "--metric=bpd", f"--output={folder}/bpd.json", "--num_images=16",
                "--batch_size=8"],
        "quality": [workdir, "--metric=quality", f"--output={folder}/quality.json",
                    "--num_samples=16", "--batch_size=8", "--num_steps=3", "--sampler=ddim",
                    "--spacing=trailing", "--dtype=bfloat16"],
        "missing_checkpoint": [workdir, "--metric=bpd", "--checkpoint_step=999"],
        "guided_unconditional": [workdir, "--metric=quality", "--num_samples=8",
                                 "--batch_size=8", "--num_steps=2", "--guidance_scale=2"],
        **{bad: [f"--workdir={folder}/nothing", "--metric=quality", bad.format(a_file=a_file)]
           for bad, _ in EVALUATE_PY_BAD_FLAGS}}
    results = run_program("evaluate.py", list(command_lines.values()))
    with open(os.path.join(folder, "results.json"), "w") as f:
      json.dump(dict(zip(command_lines, results)), f)

  folder = made_once(tmp_path_factory, "evaluate_py", make)
  with open(os.path.join(folder, "results.json")) as f:
    return dict(json.load(f), folder=folder, a_file=os.path.join(folder, "a_file"))


@pytest.mark.slow
@pytest.mark.parametrize("metric,numbers,dtype", [
    ("bpd", ["bpd", "prior_bpd", "diffusion_bpd", "decoder_bpd", "uniform_bpd"], "float32"),
    ("quality", ["frechet", "frechet_real_vs_real", "frechet_noise_vs_real",
                 "class_entropy_bits"], "bfloat16"),
])
def test_evaluate_py_prints_a_table_and_writes_json(evaluate_py, metric, numbers, dtype):
  exit_code, stdout, stderr = evaluate_py[metric]
  assert exit_code == 0, stdout + stderr
  with open(os.path.join(evaluate_py["folder"], f"{metric}.json")) as f:
    written = json.load(f)
  assert written["checkpoint_step"] == TRAINED_STEPS and written["dataset"] == "digits"
  assert written["dtype"] == dtype
  if metric == "quality":
    assert written["sampling"]["spacing"] == "trailing"
  for name in numbers:
    assert np.isfinite(written[name])
    assert any(line.split()[:1] == [name] for line in stdout.splitlines())


@pytest.mark.slow
def test_evaluate_py_names_a_missing_checkpoint(evaluate_py):
  exit_code, _, stderr = evaluate_py["missing_checkpoint"]
  assert exit_code != 0
  assert stderr.startswith("error:") and "999" in stderr


@pytest.fixture
def a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a folder")
  return str(path)


@pytest.mark.parametrize("request_, message", [
    (dict(num_samples=0), "--num_samples=0: must be at least 1"),
    (dict(num_samples=-3), "--num_samples=-3: must be at least 1"),
    (dict(trajectory_every=0), "--trajectory_every=0: must be at least 1"),
    (dict(dtype="float16"), "--dtype=float16: unknown compute dtype; choose one of float32, "
                            "bfloat16"),
    (dict(sampling=dict(sampler="ddpm", eta=0.5)),
     "--eta=0.5: an option of sampler ddim, not of ddpm"),
    (dict(sampling=dict(threshold_percentile=0.0)),
     "--threshold_percentile=0.0: expected a number in (0, 1]"),
    (dict(output_dir="{file}"), "--output_dir={file}: {file} is a file, not a folder"),
    (dict(output_dir="{file}/out"), "--output_dir={file}/out: {file} is a file, not a folder")])
def test_sample_run_refuses_bad_requests_before_loading_a_model(tmp_path, a_file, request_,
                                                                message):
  """The workdir does not exist: a model load would fail with a CheckpointError first."""
  request_ = {name: value.format(file=a_file) if isinstance(value, str) else value
              for name, value in request_.items()}
  output_dir = request_.pop("output_dir", str(tmp_path / "out"))
  with pytest.raises(errors.UsageError) as raised:
    sample.run(str(tmp_path / "no_workdir"), output_dir, **request_)
  assert str(raised.value).startswith(message.format(file=a_file))
  assert "\n" not in str(raised.value) and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("output, counts, message", [
    (None, dict(num_samples=0), "--num_samples=0: must be at least 1"),
    (None, dict(num_images=-1), "--num_images=-1: must be at least 1"),
    (None, dict(batch_size=0), "--batch_size=0: must be at least 1"),
    ("{file}/result.json", {}, "--output={file}/result.json: {file} is a file, not a folder"),
    ("{dir}", {}, "--output={dir}: is a folder; name the file to write")])
def test_evaluate_refuses_bad_requests(tmp_path, a_file, output, counts, message):
  names = dict(file=a_file, dir=str(tmp_path))
  output = None if output is None else output.format(**names)
  counts = dict(dict(num_samples=None, num_images=None, batch_size=128), **counts)
  with pytest.raises(errors.UsageError, match="^" + re.escape(message.format(**names))):
    evaluate.check_request(output, **counts)
  evaluate.check_request(str(tmp_path / "new" / "result.json"), num_samples=None,
                         num_images=3, batch_size=128)


@pytest.mark.slow
def test_evaluate_py_passes_guidance_on_and_refuses_it_for_an_unconditional_model(evaluate_py):
  exit_code, _, stderr = evaluate_py["guided_unconditional"]
  assert exit_code != 0 and "unconditional" in stderr and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_evaluate_py_refuses_bad_flags_before_loading(evaluate_py):
  for bad, message in EVALUATE_PY_BAD_FLAGS:
    exit_code, _, stderr = evaluate_py[bad]
    message = message.format(a_file=evaluate_py["a_file"])
    assert exit_code != 0 and message in stderr, stderr
    assert "Traceback" not in stderr and "does not exist" not in stderr
