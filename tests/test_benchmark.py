"""benchmarks/benchmark.py runs end to end on a small config and reports sane numbers."""

import argparse
import importlib.util

import jax
import pytest

from benchmarks import benchmark
from jaxdiff import train_step
from jaxdiff.models import count_params


@pytest.mark.slow
def test_benchmark_reports_throughput_flops_and_mfu(tmp_path):
  args = argparse.Namespace(config="configs/default.py", batch_size=8, num_samples=8,
                            dtype="float32", samplers="ddim:2", repeats=1, matmul_size=256,
                            peer=False, output=str(tmp_path / "result.json"))
  result = benchmark.run(args)
  jaxdiff = result["jaxdiff"]
  assert jaxdiff["params"] == 1_001_729
  assert jaxdiff["train_step_images_per_sec"] > 0 and jaxdiff["forward_images_per_sec"] > 0
  # ≈ 3 × the forward pass (forward + backward) of a 1M-parameter U-Net on 8×8 images.
  assert 0.05e9 < jaxdiff["train_flops_per_image"] < 0.5e9
  assert 0 < jaxdiff["train_mfu"] <= 1
  sampler = jaxdiff["samplers"]["ddim:2"]
  assert sampler["images_per_sec"] > 0 and sampler["compile_seconds_at_20_steps"] > 0
  assert "ratios" not in result and result["device"].endswith("(cpu)")
  assert "jaxdiff" in benchmark.format_table(result)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                    reason="the peer needs the bench extra: pip install -e '.[bench]'")
@pytest.mark.parametrize("config_path", ["configs/cifar10.py", "configs/default.py"])
def test_the_peer_has_the_same_parameter_count(config_path):
  from benchmarks import peer_diffusers
  config = benchmark.load_config(config_path, "float32")
  model = train_step.create_model(config)
  shapes = jax.eval_shape(lambda key: train_step.init_state(config, model, key), jax.random.key(0))
  peer = peer_diffusers.unet2d_from_config(config)
  assert sum(p.numel() for p in peer.parameters()) == count_params(shapes.params)
