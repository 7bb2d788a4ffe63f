"""Throughput, TFLOP/s per device and MFU against hand-computed numbers; the chip table; the
step's FLOPs from XLA's cost analysis."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from jaxdiff import denoiser as denoiser_lib, parallel, telemetry, train_step


@pytest.mark.parametrize("device_kind, dtype, peak", [
    ("TPU v4", "bfloat16", 275.0), ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "bfloat16", 459.0), ("TPU v6 lite", "bfloat16", 918.0),
    ("NVIDIA A100-SXM4-80GB", "float32", 156.0), ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H200", "bfloat16", 989.0),
    ("TPU v4", "float32", None), ("cpu", "float32", None), ("NVIDIA GeForce RTX 4090",
                                                          "bfloat16", None)])
def test_peak_is_looked_up_by_device_kind_and_dtype(device_kind, dtype, peak):
  assert telemetry.peak_tflops(device_kind, dtype) == peak


def test_a_given_peak_wins():
  assert telemetry.peak_tflops("cpu", "float32", given=1.5) == 1.5
  assert telemetry.peak_tflops("TPU v4", "bfloat16", given=100.0) == 100.0


def test_throughput_tflops_and_mfu_of_a_window():
  # 10 steps of 64 images and 2·10¹² FLOPs in 4 s on 8 devices of peak 2.5 TFLOP/s:
  # 160 img/s; 20·10¹² FLOPs / 4 s / 8 = 0.625 TFLOP/s per device; MFU 0.625 / 2.5 = 0.25.
  result = telemetry.throughput(10, 4.0, batch_size=64, flops_per_step=2e12, num_devices=8,
                                peak=2.5)
  assert result == pytest.approx({"images_per_sec": 160.0, "tflops_per_device": 0.625,
                                  "mfu": 0.25})
  assert "mfu" not in telemetry.throughput(10, 4.0, batch_size=64, flops_per_step=2e12,
                                           num_devices=8, peak=None)


def test_xla_counts_a_sharded_matmul_whole_before_partitioning():
  mesh = parallel.make_mesh(jax.devices()[:4])
  a = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P(parallel.BATCH_AXES)))
  lowered = jax.jit(lambda x: x @ x.T).lower(a)
  assert lowered.cost_analysis()["flops"] == 2 * 64 * 64 * 32


@pytest.mark.slow
def test_step_flops_are_about_three_forward_passes_whatever_the_accumulation():
  """Forward + backward ≈ 3 forward passes of the batch; micro-batches and steps per call do not
  change the count (it is taken from the plain step)."""
  config = default.get_config()
  config.train.batch_size = 16
  denoiser = denoiser_lib.from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:4])
  flops = telemetry.step_flops(denoiser, config, mesh)
  config.train.update(grad_accum_steps=4, steps_per_call=3)
  assert telemetry.step_flops(denoiser, config, mesh) == flops
  params = train_step.abstract_state(denoiser, config.train).params
  x = jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((16,), jnp.int32)
  forward = jax.jit(lambda p, x, t: denoiser.network.apply({"params": p}, x, t)).lower(params, x, t)
  assert 2.5 < flops / forward.cost_analysis()["flops"] < 3.5
