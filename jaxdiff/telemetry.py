"""How well the chips are used: images/s, TFLOP/s per device and model FLOPs utilisation (MFU).

  TFLOP/s per device = FLOPs of the steps in a timed window / seconds / devices / 10¹²
  MFU                = TFLOP/s per device / one device's peak TFLOP/s

The FLOPs of a step are XLA's own count for the step's program (`step_flops`), so they follow
the model, the dtype and rematerialisation without a hand-written formula. The peak is looked
up from the chip (`jax.devices()[0].device_kind`) and the compute dtype in PEAK_TFLOPS, or
given (`config.train.peak_tflops`); without either, MFU is left out.
"""

from jaxdiff import train_step

# Dense (no sparsity) peak TFLOP/s of one JAX device, by chip and compute dtype, from the
# vendors' specifications. On TPU v4 and v5p one JAX device is one chip (two TensorCores as one
# megacore); on v5e and v6e a chip has one TensorCore.
#   TPU v4   275 bf16   https://cloud.google.com/tpu/docs/v4
#   TPU v5e  197 bf16   https://cloud.google.com/tpu/docs/v5e
#   TPU v5p  459 bf16   https://cloud.google.com/tpu/docs/v5p
#   TPU v6e  918 bf16   https://cloud.google.com/tpu/docs/v6e (Trillium)
# Google gives no float32 peak for TPUs (the matrix units multiply bfloat16; float32 dots run as
# several bfloat16 passes), so float32 on a TPU has no entry and MFU is left out unless given.
#   A100 SXM   312 bf16, 156 tf32   NVIDIA A100 Tensor Core GPU datasheet (624 / 312 are with
#                                   2:4 sparsity)
#   H100 SXM   989 bf16, 494 tf32   NVIDIA H100 Tensor Core GPU datasheet (1,979 / 989 sparse)
#   H200 SXM   989 bf16, 494 tf32   NVIDIA H200 Tensor Core GPU datasheet (same tensor cores)
# float32 on these GPUs is the TF32 tensor-core peak: XLA computes float32 dots and convolutions
# in TF32 at JAX's default matmul precision. PCIe and NVL variants run slower clocks: give their
# peak with `config.train.peak_tflops`.
PEAK_TFLOPS = {
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5e": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
    "TPU v6e": {"bfloat16": 918.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
}

# `device_kind` as JAX reports it -> the chip's name in PEAK_TFLOPS. TPUs report exact names
# (v5e as "TPU v5 lite", v5p as "TPU v5", v6e as "TPU v6 lite"); GPUs report the product name,
# e.g. "NVIDIA A100-SXM4-80GB" or "NVIDIA H100 80GB HBM3", matched by the chip's name in it.
_TPU_KINDS = {"TPU v4": "TPU v4", "TPU v5 lite": "TPU v5e", "TPU v5e": "TPU v5e",
              "TPU v5": "TPU v5p", "TPU v5p": "TPU v5p", "TPU v6 lite": "TPU v6e",
              "TPU v6e": "TPU v6e"}
_GPU_CHIPS = ("A100", "H100", "H200")


def chip_name(device_kind: str) -> str | None:
  """The chip of a `jax.Device.device_kind` in PEAK_TFLOPS, or None if it is not there."""
  if device_kind in _TPU_KINDS:
    return _TPU_KINDS[device_kind]
  return next((chip for chip in _GPU_CHIPS if chip in device_kind), None)


def peak_tflops(device_kind: str, dtype: str, given: float = 0.0) -> float | None:
  """One device's peak TFLOP/s: `given` when > 0, else PEAK_TFLOPS's for the chip and compute
  dtype, else None (unknown: leave MFU out)."""
  if given > 0:
    return float(given)
  return PEAK_TFLOPS.get(chip_name(device_kind), {}).get(str(dtype))


def throughput(num_steps: int, seconds: float, *, batch_size: int, flops_per_step: float,
               num_devices: int, peak: float | None) -> dict[str, float]:
  """{'images_per_sec', 'tflops_per_device', and with a `peak` (TFLOP/s per device) 'mfu'} of
  `num_steps` steps of `batch_size` images and `flops_per_step` FLOPs in `seconds`."""
  tflops_per_device = num_steps * flops_per_step / seconds / num_devices / 1e12
  result = {"images_per_sec": num_steps * batch_size / seconds,
            "tflops_per_device": tflops_per_device}
  if peak:
    result["mfu"] = tflops_per_device / peak
  return result


def lower_train_step(denoiser, config, mesh):
  """`train_step.make_train_step` lowered (traced, not compiled) for the abstract state and
  batch of `config`."""
  step_fn = train_step.make_train_step(denoiser, config, mesh)
  return step_fn.lower(train_step.abstract_state(denoiser, config.train, mesh),
                       train_step.abstract_batch(denoiser, config.train, mesh))


def step_flops(denoiser, config, mesh, lowered=None) -> float:
  """FLOPs of one optimizer step on the global batch, over all devices: XLA's cost analysis of
  the plain step (one micro-batch, one step a call) lowered, not compiled, for the abstract
  state and batch (`lowered`, the config's own lowered step, is used when it is that plain
  step). The count is taken before partitioning, so it is the whole batch's. (XLA counts a
  loop's body once, not times its trip count, so the compiled programs of `grad_accum_steps` or
  `steps_per_call` > 1, both `lax.scan`s, would undercount.)"""
  if lowered is not None and config.train.grad_accum_steps == config.train.steps_per_call == 1:
    return float(lowered.cost_analysis()["flops"])
  plain = config.copy_and_resolve_references()
  plain.train.update(grad_accum_steps=1, steps_per_call=1)
  return float(lower_train_step(denoiser, plain, mesh).cost_analysis()["flops"])
