"""Tests for the Diffusion Transformer (jaxdiff/models/dit.py)."""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import ArgumentError
from jaxdiff.models import count_params
from jaxdiff.models.dit import DiT, sincos_position_embedding

NUM_CLASSES = 5
TINY = dict(patch_size=2, depth=1, width=32, num_heads=2, dropout=0.1, out_channels=3,
            num_classes=NUM_CLASSES)
# DDPM steps that bfloat16 cannot hold (998 → 996 or 1000) and continuous times (EDM's ¼·ln σ).
TIMES = (996.0, 998.0, 999.0, 1000.0, -1.15, 0.37)
LABELS = (0, 1, 2, 3, 4, NUM_CLASSES)  # the last: "no label"
CONDITIONING = ("t_embedder_1", "y_embedder")  # c = t_embedder_1(…) + y_embedder(y)


def perturb(params, seed: int = 0, scale: float = 0.1):
  """Add noise to every parameter, so the zero-initialised layers stop hiding the rest."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def fields_of(model: DiT, *names: str) -> dict:
  return {name: getattr(model, name) for name in names}


class Outputs(NamedTuple):
  image: jax.Array  # the network's output
  conditioning: jax.Array  # c, what every adaLN modulation sees


@functools.partial(jax.jit, static_argnames=("model", "train"))
def apply(model: DiT, params, x, t, y=None, train: bool = False, dropout_key=None) -> Outputs:
  """`model.apply` of a class-conditional DiT, compiled once per (model, train, input
  structure), with its conditioning c."""
  rngs = {} if dropout_key is None else {"dropout": dropout_key}
  image, state = model.apply({"params": params}, x, t, y, train=train, rngs=rngs,
                             capture_intermediates=lambda module, _: module.name in CONDITIONING,
                             mutable=["intermediates"])
  return Outputs(image, sum(state["intermediates"][name]["__call__"][0] for name in CONDITIONING))


def rbg_key(seed: int) -> jax.Array:
  """A typed key of the "rbg" generator: XLA:CPU compiles its random bits (the init's, the
  dropout's) in half the time of threefry's."""
  return jax.random.key(seed, impl="rbg")


class Setup(NamedTuple):  # NumPy arrays: tests compute with them without compiling
  model: DiT
  x: np.ndarray
  t: np.ndarray
  y: np.ndarray
  params: dict  # as initialised (NumPy arrays)
  perturbed: dict  # with noise added, so every layer matters


@pytest.fixture(scope="module")
def tiny() -> Setup:
  """The TINY DiT, its inputs and parameters, initialised once for the whole module."""
  model = DiT(**TINY)
  x = np.random.default_rng(0).standard_normal((len(TIMES), 8, 8, 3), np.float32)
  t, y = np.array(TIMES, np.float32), np.array(LABELS, np.int32)
  params = jax.device_get(jax.jit(model.init)(rbg_key(1), x, t, y)["params"])
  return Setup(model, x, t, y, params, perturb(params))


@pytest.mark.parametrize("overrides, shape", [
    ({}, (2, 8, 8, 3)),
    (dict(num_classes=0, out_channels=1), (3, 8, 8, 1)),
    (dict(patch_size=4, out_channels=2), (1, 8, 16, 3)),
    (dict(patch_size=1, dtype="bfloat16", remat=True), (2, 4, 4, 3)),
])
def test_output_shape_and_dtype(overrides, shape):
  config = {**TINY, **overrides}
  model = DiT(**config)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
  y = jax.ShapeDtypeStruct(shape[:1], jnp.int32) if config["num_classes"] else None
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(1), x, t, y)
  assert out.shape == shape[:-1] + (config["out_channels"],)
  assert out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


def test_fresh_dit_predicts_zero(tiny):
  # adaLN-Zero: every modulation and the final Dense start at zero.
  out = apply(tiny.model, tiny.params, tiny.x, tiny.t, tiny.y).image
  np.testing.assert_array_equal(out, 0.0)


def test_initialised_as_the_paper(tiny):
  """Xavier-uniform kernels (the patch conv's seen as a [p·p·C, width] matrix), zero biases,
  N(0, 0.02²) for the time MLP and the label table, zero adaLN modulations and final Dense."""
  width, patch = TINY["width"], TINY["patch_size"]
  block = tiny.params["blocks_0"]
  xavier = {"x_embedder": (patch * patch * 3, width), "qkv": (width, 3 * width),
            "proj": (width, width), "fc1": (width, 4 * width), "fc2": (4 * width, width)}
  kernels = {"x_embedder": tiny.params["x_embedder"], **block["attn"], **block["mlp"]}
  for name, (fan_in, fan_out) in xavier.items():
    kernel, bound = np.asarray(kernels[name]["kernel"]), np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound, name
    assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 0.15, name
    np.testing.assert_array_equal(kernels[name]["bias"], 0.0)
  for normal in (tiny.params["t_embedder_0"]["kernel"], tiny.params["t_embedder_1"]["kernel"],
                 tiny.params["y_embedder"]["embedding"]):
    assert abs(np.std(normal) / 0.02 - 1) < 0.15
  for zero in (block["adaLN_modulation"], tiny.params["final_layer"]):
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(zero))


def test_time_and_label_condition_the_output(tiny):
  def out(t, y=None):
    return apply(tiny.model, tiny.perturbed, tiny.x, t, y).image

  reference = out(tiny.t, tiny.y)
  assert not np.allclose(reference, out(tiny.t + 0.5, tiny.y))
  assert not np.allclose(reference, out(tiny.t, (tiny.y + 1) % NUM_CLASSES))
  # y=None means "no label": the last row (label num_classes) of the table; a scalar time is
  # broadcast over the batch.
  null_labels = np.full_like(tiny.y, NUM_CLASSES)
  np.testing.assert_array_equal(out(np.full_like(tiny.t, TIMES[1]), null_labels), out(TIMES[1]))


def test_labels_for_an_unconditional_dit_are_a_clear_error(tiny):
  model = DiT(**{**TINY, "num_classes": 0})
  with pytest.raises(ValueError, match="num_classes=0"):
    jax.eval_shape(model.init, jax.random.key(1), tiny.x, tiny.t, tiny.y)


def closed_form_params(patch_size, depth, width, mlp_ratio, out_channels, num_classes,
                       in_channels) -> int:
  """Weights and biases of every layer, counted by hand from the architecture."""
  hidden = int(width * mlp_ratio)
  patch_embed = patch_size**2 * in_channels * width + width
  time_mlp = (256 * width + width) + (width * width + width)
  label_table = (num_classes + 1) * width if num_classes else 0
  block = ((width * 6 * width + 6 * width)  # adaLN modulation
           + (width * 3 * width + 3 * width) + (width * width + width)  # qkv, proj
           + (width * hidden + hidden) + (hidden * width + width))  # fc1, fc2
  final = (width * 2 * width + 2 * width) + (width * patch_size**2 * out_channels
                                             + patch_size**2 * out_channels)
  return patch_embed + time_mlp + label_table + depth * block + final


@pytest.mark.parametrize("config, in_channels", [
    (TINY, 3),
    (dict(patch_size=1, depth=3, width=48, num_heads=4, mlp_ratio=2.5, out_channels=2), 1),
    (dict(patch_size=4, depth=1, width=64, num_heads=1, num_classes=10, out_channels=6), 4),
    (dict(), 3),  # DiT-S/2: the paper's 33M
])
def test_param_count_matches_the_closed_form(config, in_channels):
  model = DiT(**config)
  x = jax.ShapeDtypeStruct((1, 16, 16, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  sizes = fields_of(model, "patch_size", "depth", "width", "mlp_ratio", "out_channels",
                    "num_classes")
  assert count_params(shapes) == closed_form_params(**sizes, in_channels=in_channels)


def test_dit_s2_has_the_papers_parameter_count():
  # Table 1 of the paper: DiT-S (4 latent channels in, 8 out with the learned variance) 33M.
  assert round(closed_form_params(2, 12, 384, 4.0, 8, 1000, 4) / 1e6) == 33


@pytest.mark.parametrize("height, width, dim", [(4, 4, 32), (3, 5, 8), (2, 6, 384)])
def test_position_embedding_matches_float64_reference(height, width, dim):
  """Token (i, j) of a row-major grid: [sin(jω), cos(jω), sin(iω), cos(iω)],
  ω_k = 10000^(−k/(dim/4))."""
  quarter = dim // 4
  expected = np.zeros((height * width, dim))
  for i in range(height):
    for j in range(width):
      for k in range(quarter):
        omega = 10_000.0**(-k / quarter)
        expected[i * width + j, [k, quarter + k, 2 * quarter + k, 3 * quarter + k]] = [
            np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
  got = sincos_position_embedding(height, width, dim)
  assert got.shape == (height * width, dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_bfloat16_dit_embeds_time_in_float32(tiny):
  """The conditioning c = MLP(sinusoid(t)) + table[y] of a bfloat16 DiT equals a float64 NumPy
  reference, for DDPM's integer steps that bfloat16 cannot hold (998 → 996 or 1000) and for
  continuous times."""
  assert float(np.asarray(998, jnp.bfloat16)) in (996.0, 1000.0)
  got = apply(DiT(**TINY, dtype="bfloat16"), tiny.perturbed, tiny.x, tiny.t, tiny.y).conditioning
  assert got.dtype == jnp.float32

  half = 128  # of the 256-dim sinusoid
  freqs = np.exp(-np.log(10_000.0) * np.arange(half, dtype=np.float64) / (half - 1))
  args = np.array(TIMES)[:, None] * freqs
  layer = lambda h, name: (h @ np.asarray(tiny.perturbed[name]["kernel"], np.float64)
                           + np.asarray(tiny.perturbed[name]["bias"], np.float64))
  hidden = layer(np.concatenate([np.sin(args), np.cos(args)], axis=1), "t_embedder_0")
  expected = (layer(hidden / (1 + np.exp(-hidden)), "t_embedder_1")
              + np.asarray(tiny.perturbed["y_embedder"]["embedding"], np.float64)[list(LABELS)])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  gaps = np.abs(np.diff(expected[:4], axis=0)).max(axis=1)  # 996→998, 998→999, 999→1000
  assert gaps.min() > 100 * np.abs(got - expected).max()


def closed_form_forward_flops(batch, height, width_px, in_channels, patch_size, depth, width,
                              mlp_ratio, out_channels) -> int:
  """The matrix products of one forward pass, 2 FLOPs a multiply-add."""
  tokens = height * width_px // patch_size**2
  hidden = int(width * mlp_ratio)
  patch_embed = tokens * patch_size**2 * in_channels * width
  time_mlp = 256 * width + width * width
  per_block = (6 * width * width  # adaLN, once per image
               + tokens * (3 * width * width + width * width + 2 * width * hidden)  # qkv, proj, MLP
               + 2 * tokens * tokens * width)  # q·kᵀ and weights·v over all heads
  final = 2 * width * width + tokens * width * patch_size**2 * out_channels
  return 2 * batch * (patch_embed + time_mlp + depth * per_block + final)


@pytest.mark.parametrize("config, shape", [
    (dict(patch_size=2, depth=2, width=256, num_heads=4), (4, 16, 16, 3)),
    (dict(patch_size=1, depth=1, width=192, num_heads=3, mlp_ratio=2.0, out_channels=1),
     (2, 16, 8, 1)),
])
def test_xla_counts_the_forward_flops_of_the_closed_form(config, shape):
  """telemetry's MFU takes XLA's count of the step's FLOPs; for the DiT it is the closed form
  (XLA also counts the element-wise work, a few % at these widths)."""
  model = DiT(**config)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  forward = jax.jit(lambda params, x, t: model.apply({"params": params}, x, t))
  xla_flops = forward.lower(params, x, t).cost_analysis()["flops"]
  expected = closed_form_forward_flops(*shape, **fields_of(
      model, "patch_size", "depth", "width", "mlp_ratio", "out_channels"))
  assert expected <= xla_flops <= 1.03 * expected, xla_flops / expected


def test_bfloat16_compute_is_close_to_float32(tiny):
  out32 = apply(tiny.model, tiny.perturbed, tiny.x, tiny.t, tiny.y).image
  out16 = apply(DiT(**TINY, dtype="bfloat16"), tiny.perturbed, tiny.x, tiny.t, tiny.y).image
  assert out16.dtype == jnp.float32
  assert not np.array_equal(out16, out32)
  assert np.linalg.norm(out16 - out32) / np.linalg.norm(out32) < 0.03


def train_loss(model: DiT, params, x, t, y):
  """The mean squared output in training (dropout on, the same mask every call)."""
  out = model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": rbg_key(3)})
  return jnp.mean(out**2)


@jax.jit
def losses_and_grads(params, x, t, y):
  """[(loss, grads) of the TINY DiT, the same with remat], one program (compiled once)."""
  return [jax.value_and_grad(functools.partial(train_loss, DiT(**TINY, remat=remat)))(
      params, x, t, y) for remat in (False, True)]


def test_remat_gives_the_same_training_loss_and_gradient(tiny):
  (loss, grads), (remat_loss, remat_grads) = losses_and_grads(tiny.perturbed, tiny.x, tiny.t,
                                                               tiny.y)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               remat_grads, grads)
  assert np.abs(grads["x_embedder"]["kernel"]).max() > 0
  assert np.abs(grads["t_embedder_0"]["kernel"]).max() > 0
  # Dropout acts in training only.
  eval_out = apply(tiny.model, tiny.perturbed, tiny.x, tiny.t, tiny.y).image
  assert not np.isclose(loss, np.mean(np.square(eval_out)), rtol=1e-3)


def test_remat_checkpoints_each_block():
  model = DiT(**{**TINY, "depth": 3, "remat": True})
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  jaxpr = jax.make_jaxpr(train_loss, static_argnums=0)(model, params, x, t, y)
  assert str(jaxpr).count("remat") == model.depth


def fields(**overrides) -> dict:
  """The DiT's config fields: its class defaults, with `overrides`."""
  defaults = {field.name: field.default for field in dataclasses.fields(DiT)
              if field.name not in ("parent", "name")}
  return {**defaults, **overrides}


def test_check_fields_accepts_the_defaults_and_dit_s2_sizes():
  DiT.check_fields(fields(), (32, 32, 3))
  DiT.check_fields(fields(patch_size=4, width=1152, num_heads=16, num_classes=1000,
                          dtype="bfloat16", remat=True), (32, 64, 4))
  assert DiT.size_multiple(fields(patch_size=4)) == 4


@pytest.mark.parametrize("overrides, image_shape, name", [
    (dict(patch_size=0), (32, 32, 3), "patch_size"),
    (dict(depth=2.0), (32, 32, 3), "depth"),
    (dict(width=True), (32, 32, 3), "width"),
    (dict(num_heads=0), (32, 32, 3), "num_heads"),
    (dict(mlp_ratio=0.0), (32, 32, 3), "mlp_ratio"),
    (dict(dropout=1.0), (32, 32, 3), "dropout"),
    (dict(out_channels=0), (32, 32, 3), "out_channels"),
    (dict(num_classes=-1), (32, 32, 3), "num_classes"),
    (dict(dtype="float16"), (32, 32, 3), "dtype"),
    (dict(remat="yes"), (32, 32, 3), "remat"),
    (dict(width=386, num_heads=2), (32, 32, 3), "width"),
    (dict(num_heads=5), (32, 32, 3), "num_heads"),
    (dict(mlp_ratio=0.001), (32, 32, 3), "mlp_ratio"),
    (dict(patch_size=3), (32, 30, 3), "patch_size"),
    (dict(patch_size=4), (32, 30, 3), "patch_size"),
])
def test_check_fields_names_the_bad_field_in_one_line(overrides, image_shape, name):
  with pytest.raises(ArgumentError) as error:
    DiT.check_fields(fields(**overrides), image_shape)
  assert error.value.name == name
  assert str(error.value).startswith(f"{name} = ") and "\n" not in str(error.value)
