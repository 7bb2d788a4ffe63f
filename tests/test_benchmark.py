"""benchmarks/benchmark.py runs end to end on a small config and reports sane numbers."""

import argparse
import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import benchmark, op_profile
from jaxdiff import denoiser, train_step
from jaxdiff.models import count_params


TINY_UNET = ["model.ch=8", "model.ch_mult=(1,)", "model.num_res_blocks=1",
             "model.attn_resolutions=()"]


@pytest.mark.slow
def test_benchmark_reports_throughput_flops_and_mfu(tmp_path):
  args = argparse.Namespace(config="configs/default.py", batch_size=8, num_samples=8,
                            dtype="float32", samplers="ddim:2", repeats=1, matmul_size=256,
                            peer=False, override=TINY_UNET, output=str(tmp_path / "result.json"))
  result = benchmark.run(args)
  jaxdiff = result["jaxdiff"]
  config = benchmark.load_config("configs/default.py", "float32", TINY_UNET)
  assert jaxdiff["params"] == diffusers_unet2d_param_count(config)
  assert jaxdiff["train_step_images_per_sec"] > 0 and jaxdiff["forward_images_per_sec"] > 0
  # ≈ 3 × the forward pass (forward + backward), whose 3×3 convolutions cost 2 FLOPs per weight
  # at each of the 8 × 8 pixels: all but the time embedding's weights are convolutions here.
  assert 0.7 < jaxdiff["train_flops_per_image"] / (3 * 2 * 64 * jaxdiff["params"]) < 1.5
  assert 0 < jaxdiff["train_mfu"] <= 1
  sampler = jaxdiff["samplers"]["ddim:2"]
  assert sampler["images_per_sec"] > 0 and sampler["compile_seconds_at_20_steps"] > 0
  assert "ratios" not in result and result["device"].endswith("(cpu)")
  assert "jaxdiff" in benchmark.format_table(result)


@pytest.mark.slow
def test_trainer_mode_reports_the_loop_next_to_the_bare_step(tmp_path, monkeypatch):
  workdirs = []
  real_run = benchmark.train.run

  def run(config, workdir):
    workdirs.append(workdir)
    assert (config.train.checkpoint_every, config.train.sample_every,
            config.train.eval_every) == (0, 0, 0)
    return real_run(config, workdir)

  monkeypatch.setattr(benchmark.train, "run", run)
  args = argparse.Namespace(
      config="configs/default.py", batch_size=8, repeats=2, trainer=True, trainer_steps=6,
      log_every=2, override=TINY_UNET + [f"data.data_dir={tmp_path / 'tfds'}"])
  result = benchmark.run_trainer(args)
  trainer = result["trainer"]
  assert len(workdirs) == 2 and len(set(workdirs)) == 2
  assert len(trainer["bare_step_images_per_sec_each"]) == len(
      trainer["trainer_images_per_sec_each"]) == 2
  assert trainer["bare_step_images_per_sec"] > 0 and trainer["trainer_images_per_sec"] > 0
  assert trainer["ratio"] == pytest.approx(
      trainer["trainer_images_per_sec"] / trainer["bare_step_images_per_sec"])
  assert trainer["params"] < 100_000
  assert "trainer / bare" in benchmark.format_trainer_table(result)


def test_trainer_throughput_is_the_median_of_the_windows_after_the_first(tmp_path,
                                                                         monkeypatch):
  def run(config, workdir):
    del config
    with open(tmp_path / "metrics.jsonl", "w") as f:
      for step, images_per_sec in ((2, 1.0), (4, 30.0), (6, 10.0), (8, 20.0)):
        f.write(json.dumps({"step": step, "images_per_sec": images_per_sec}) + "\n")
    assert workdir == str(tmp_path)

  monkeypatch.setattr(benchmark.train, "run", run)
  config = benchmark.load_config("configs/default.py", "float32")
  assert benchmark.trainer_images_per_sec(config, str(tmp_path)) == 20.0


def test_trainer_mode_needs_two_windows(tmp_path, monkeypatch):
  def run(config, workdir):
    del config, workdir
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 4, "images_per_sec": 1.0}))

  monkeypatch.setattr(benchmark.train, "run", run)
  config = benchmark.load_config("configs/default.py", "float32", ["train.num_steps=4"])
  with pytest.raises(ValueError, match="--trainer_steps=4 with --log_every=50 leaves no window"):
    benchmark.trainer_images_per_sec(config, str(tmp_path))


def test_overrides_set_config_fields_as_literals_or_strings():
  config = benchmark.load_config("configs/default.py", "bfloat16",
                                 ["model.ch=16", "model.ch_mult=(1, 2, 2)", "data.dataset=mnist5k",
                                  "train.learning_rate=3e-4"])
  assert (config.model.ch, config.model.ch_mult, config.data.dataset) == (16, (1, 2, 2),
                                                                         "mnist5k")
  assert config.train.learning_rate == 3e-4 and config.model.dtype == "bfloat16"


@pytest.mark.slow
def test_accelerator_script_writes_one_json_with_every_number(tmp_path):
  output = tmp_path / "accelerator.json"
  environment = {
      **os.environ, "PYTHON": sys.executable, "JAXDIFF_BENCH_CONFIG": "configs/default.py",
      "JAXDIFF_BENCH_BATCH": "8", "JAXDIFF_BENCH_SAMPLES": "8",
      "JAXDIFF_BENCH_SAMPLERS": "ddim:2,dpm_solver:2", "JAXDIFF_BENCH_MATMUL": "64",
      "JAXDIFF_BENCH_REPEATS": "1", "JAXDIFF_BENCH_OVERRIDES": " ".join(TINY_UNET),
      "JAXDIFF_BENCH_OUTPUT": str(output),
      # one chip, as the script is meant for (not the tests' eight simulated devices)
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  finished = subprocess.run(["bash", "benchmarks/accelerator.sh"], env=environment,
                            capture_output=True, text=True, check=False)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert finished.stdout.splitlines()[-1] == f"accelerator benchmark JSON: {output}"
  result = json.loads(output.read_text())
  assert (result["dtype"], result["batch_size"], result["num_samples"]) == ("bfloat16", 8, 8)
  assert result["overrides"] == TINY_UNET and "peer" not in result
  jaxdiff = result["jaxdiff"]
  for name in ("train_step_images_per_sec", "train_mfu", "train_compile_seconds",
               "forward_images_per_sec"):
    assert jaxdiff[name] > 0, name
  assert jaxdiff["params"] < 100_000
  for sampler, steps in (("ddim:2", 20), ("dpm_solver:2", 20)):
    entry = jaxdiff["samplers"][sampler]
    assert entry["images_per_sec"] > 0 and entry["compile_seconds"] > 0
    assert entry[f"compile_seconds_at_{steps}_steps"] > 0
  assert result["peak_host_memory_bytes"] > 0 and "peak_device_memory_bytes" in result


def diffusers_unet2d_param_count(config) -> int:
  """The parameter count of the peer, diffusers' `UNet2DModel` as benchmarks/peer_diffusers.py
  builds it (positional time embedding, AttnDown/DownBlock2D, UNetMidBlock2D, AttnUp/UpBlock2D,
  3×3 convolutions with bias, convolutional resampling), in closed form from diffusers'
  architecture, so that the comparison runs without torch (`benchmark.py --peer` checks the
  peer's own count against jaxdiff's when it runs)."""
  model_config = config.model
  widths = [model_config.ch * mult for mult in model_config.ch_mult]
  size, num_levels = config.data.image_size, len(widths)
  attention = [size // 2**level in model_config.attn_resolutions for level in range(num_levels)]
  temb = 4 * widths[0]
  conv3x3 = lambda c_in, c_out: 9 * c_in * c_out + c_out
  linear = lambda c_in, c_out: c_in * c_out + c_out
  norm = lambda c: 2 * c

  def resnet(c_in, c_out):  # norm1, conv1, time_emb_proj, norm2, conv2, 1×1 shortcut
    shortcut = linear(c_in, c_out) if c_in != c_out else 0
    return (norm(c_in) + conv3x3(c_in, c_out) + linear(temb, c_out) + norm(c_out)
            + conv3x3(c_out, c_out) + shortcut)

  def attn(c):  # group_norm, to_q, to_k, to_v, to_out
    return norm(c) + 4 * linear(c, c)

  count = linear(widths[0], temb) + linear(temb, temb)  # time embedding
  if model_config.num_classes:
    count += (model_config.num_classes + 1) * temb
  count += conv3x3(config.data.num_channels, widths[0])
  c_in = widths[0]
  for level, width in enumerate(widths):
    for block in range(model_config.num_res_blocks):
      count += resnet(c_in if block == 0 else width, width)
      count += attn(width) if attention[level] else 0
    count += conv3x3(width, width) if level < num_levels - 1 else 0  # downsampler
    c_in = width
  count += 2 * resnet(widths[-1], widths[-1]) + attn(widths[-1])  # middle
  reversed_widths, previous = widths[::-1], widths[-1]
  for index, width in enumerate(reversed_widths):
    level = num_levels - 1 - index
    block_input = reversed_widths[min(index + 1, num_levels - 1)]
    for block in range(model_config.num_res_blocks + 1):
      skip = block_input if block == model_config.num_res_blocks else width
      count += resnet((previous if block == 0 else width) + skip, width)
      count += attn(width) if attention[level] else 0
    count += conv3x3(width, width) if index < num_levels - 1 else 0  # upsampler
    previous = width
  return count + norm(widths[0]) + conv3x3(widths[0], model_config.out_channels)


@pytest.mark.parametrize("config_path, num_classes, expected", [
    ("configs/cifar10.py", 0, 35_746_307),  # google/ddpm-cifar10-32, the DDPM paper's 35.7M
    ("configs/default.py", 0, 1_001_729),
    ("configs/mnist5k.py", 10, 6_472_705),  # class-conditional: an embedding of 11 classes
])
def test_jaxdiff_has_the_parameter_count_of_the_peer(config_path, num_classes, expected):
  config = benchmark.load_config(config_path, "float32")
  config.model.num_classes = num_classes
  shapes = jax.eval_shape(lambda key: train_step.init_state(denoiser.from_config(config),
                                                            config.train, key), jax.random.key(0))
  assert count_params(shapes.params) == diffusers_unet2d_param_count(config) == expected


HLO_LINES = """
  %convolution.3 = f32[3,3,8,16]{3,2,1,0} convolution(f32[4,16,16,8]{3,2,1,0} %a, f32[4,16,16,16]{3,2,1,0} %b), window={size=16x16 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf, metadata={op_name="jit(step)/transpose(jvp(UNet))/down_0_block_0/conv1/conv_general_dilated" source_file="unet.py" source_line=40}
  %ynn_fusion.7 = f32[4,16,16,16]{3,2,1,0} fusion(f32[4,16,16,8]{3,2,1,0} %a, f32[3,3,8,16]{3,2,1,0} %w), kind=kCustom, calls=%ynn_fused, metadata={op_name="jit(step)/jvp(UNet)/down_0_block_0/conv1/conv_general_dilated"}
  ROOT %loop_subtract_fusion.2 = f32[4,16,16,8]{3,2,1,0} fusion(f32[4,16,16,8]{3,2,1,0} %a), kind=kLoop, calls=%fused_sub, metadata={op_name="jit(step)/jvp(UNet)/down_0_block_0/norm1/sub"}
  %add_select_fusion.9 = f32[64]{0} fusion(f32[64]{0} %m, f32[64]{0} %g), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(step)/jit(_where)/select_n"}
  %transpose_copy_fusion.1 = f32[8,4,16,16]{3,2,1,0} fusion(f32[4,16,16,8]{3,2,1,0} %a), kind=kLoop, calls=%fused_copy
  %ynn_fusion.4 = f32[16,3,3,8]{3,2,1,0} fusion(f32[4,16,16,8]{3,2,1,0} %a, f32[4,16,16,16]{3,2,1,0} %b), kind=kCustom, calls=%ynn_fused_wgrad
"""


def test_op_profile_attributes_each_instruction_to_its_pass_and_kind():
  table = op_profile.instruction_table(HLO_LINES)
  assert sorted(table) == ["add_select_fusion.9", "convolution.3", "loop_subtract_fusion.2",
                           "transpose_copy_fusion.1", "ynn_fusion.4", "ynn_fusion.7"]
  assert table["convolution.3"][:2] == (
      "convolution", "jit(step)/transpose(jvp(UNet))/down_0_block_0/conv1/conv_general_dilated")
  attributed = {name: (op_profile.pass_of(*entry), op_profile.kind_of(*entry))
                for name, entry in table.items()}
  assert attributed == {
      "convolution.3": ("backward", "convolution (weight gradient)"),
      "ynn_fusion.7": ("forward", "convolution"),
      "loop_subtract_fusion.2": ("forward", "GroupNorm"),
      "add_select_fusion.9": ("update (noise, loss, optimizer, EMA)", "outside the network"),
      "transpose_copy_fusion.1": ("no source (layout copies)", "layout copies"),
      # XLA drops the source of the weight gradients it hands to YNNPACK: the shape tells.
      "ynn_fusion.4": ("backward", "convolution (weight gradient)")}


@pytest.mark.slow
def test_op_profile_of_a_train_step_accounts_for_its_instructions():
  args = op_profile.make_parser().parse_args(
      ["--config=configs/default.py", "--batch_size=8", "--steps=1", "--top=5",
       *(f"--override={override}" for override in TINY_UNET)])
  result = op_profile.profile(args)
  total = result["instruction_cpu_seconds_per_step"]
  assert total > 0 and result["step_seconds"] > 0
  for breakdown in ("by_pass", "by_kind"):
    assert sum(result[breakdown].values()) == pytest.approx(total)
  assert {"forward", "backward"} <= set(result["by_pass"])
  assert {"convolution", "convolution (weight gradient)", "GroupNorm"} <= set(result["by_kind"])
  assert len(result["top_instructions"]) == 5
  assert "by kind" in op_profile.format_tables(result)
