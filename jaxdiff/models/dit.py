"""The Diffusion Transformer ε_θ(x_t, t[, y]) (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers", the adaLN-Zero DiT), NHWC.

    tokens = patchify(x) + fixed 2-D sin-cos positions,   c = MLP(sinusoid(t)) + embed(y),
    `depth` × adaLN-Zero block (self-attention, MLP; each modulated and gated by c),
    out = unpatchify(Dense(modulate(LayerNorm(tokens), c))).

Parameters are always float32; `dtype` is the compute precision of the token path (the patch
conv, the blocks, the final layer). Time stays float32, as in the U-Net: bfloat16 cannot hold
t = 998. Every adaLN modulation and the final Dense start at zero, so the untrained DiT outputs
exactly 0. Parameter names follow the official PyTorch code's (`x_embedder`, `blocks_3/attn/qkv`,
`blocks_3/mlp/fc1`, `final_layer/linear`, …).

The time sinusoid is the U-Net's `timestep_embedding` (frequencies 10000^(−i/(h−1)), as in
diffusers' DiT; the official code uses 10000^(−i/h) and puts cos before sin).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import validation
from jaxdiff.errors import ArgumentError
from jaxdiff.models.unet import dense, timestep_embedding

TIME_FREQUENCY_DIM = 256  # the time sinusoid's dimensions, as the paper's
MAX_PERIOD = 10_000.0  # of the time sinusoid and of the positional embedding
LAYER_NORM_EPSILON = 1e-6

# Xavier-uniform of the patch conv's kernel [p, p, C, width] seen as a [p·p·C, width] matrix.
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                              out_axis=3)
embedding_init = nn.initializers.normal(0.02)  # the time MLP and the label table


def sincos_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
  """The fixed 2-D positional embedding of a height × width grid of tokens (row-major) →
  [height·width, dim] float32, dim a multiple of 4.

  With q = dim / 4 and ω_k = 10000^(−k/q), k = 0 … q−1, the token in row i, column j gets
      [sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)]
  (the column's code first, as in MAE's and the DiT's `get_2d_sincos_pos_embed`).
  """
  if dim % 4:
    raise ValueError(f"the 2-D sin-cos embedding needs a dim that is a multiple of 4, got {dim}")
  omega = MAX_PERIOD**(-np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")

  def code(position: np.ndarray) -> np.ndarray:  # [tokens] → [tokens, dim / 2]
    angles = position.reshape(-1, 1) * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([code(columns), code(rows)], axis=1).astype(np.float32)


def mlp_hidden_dim(width: int, mlp_ratio: float) -> int:
  """The MLP's hidden size, int(width · mlp_ratio) (as timm's)."""
  return int(width * mlp_ratio)


def layer_norm(dtype: jnp.dtype) -> nn.LayerNorm:
  """LayerNorm without scale and bias (the adaLN modulation takes their place); statistics in
  float32."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_bias=False, use_scale=False, dtype=dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x·(1 + scale) + shift, with one shift and scale [B, D] per example for all its tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def ada_ln_modulation(c: jax.Array, count: int, dtype: jnp.dtype) -> list[jax.Array]:
  """`count` vectors [B, width] from Dense(count·width)(SiLU(c)), zero-initialised."""
  width = c.shape[-1]
  return jnp.split(dense(count * width, dtype, "adaLN_modulation", zero=True)(nn.silu(c)),
                   count, axis=-1)


class SelfAttention(nn.Module):
  """Multi-head self-attention over the tokens [B, N, D]: one `qkv` Dense (its output split as
  [3, heads, D / heads]), softmax(q·kᵀ/√d) in float32, the output projection `proj`, then
  dropout."""
  num_heads: int
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, "qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
    h = dense(width, self.dtype, "proj")(h)
    return nn.Dropout(self.dropout)(h, deterministic=not train)


class Mlp(nn.Module):
  """Dense(hidden) → GELU (tanh) → dropout → Dense(width), on the tokens."""
  hidden_dim: int
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = nn.gelu(dense(self.hidden_dim, self.dtype, "fc1")(x), approximate=True)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return dense(x.shape[-1], self.dtype, "fc2")(h)


class DiTBlock(nn.Module):
  """The adaLN-Zero block: with (shift, scale, gate) × 2 = Dense(6·width)(SiLU(c)),
      x ← x + gate_attn · Attention(modulate(LayerNorm(x), shift_attn, scale_attn)),
      x ← x + gate_mlp · Mlp(modulate(LayerNorm(x), shift_mlp, scale_mlp)).
  """
  num_heads: int
  mlp_ratio: float
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, train: bool) -> jax.Array:
    shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = ada_ln_modulation(
        c, 6, self.dtype)
    attention = SelfAttention(self.num_heads, self.dropout, self.dtype, name="attn")
    h = attention(modulate(layer_norm(self.dtype)(x), shift_attn, scale_attn), train)
    x = x + gate_attn[:, None, :] * h
    mlp = Mlp(mlp_hidden_dim(x.shape[-1], self.mlp_ratio), self.dropout, self.dtype, name="mlp")
    h = mlp(modulate(layer_norm(self.dtype)(x), shift_mlp, scale_mlp), train)
    return x + gate_mlp[:, None, :] * h


class FinalLayer(nn.Module):
  """(shift, scale) = Dense(2·width)(SiLU(c)), then Dense(features)(modulate(LayerNorm(x))),
  both zero-initialised."""
  features: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = ada_ln_modulation(c, 2, self.dtype)
    return dense(self.features, self.dtype, "linear", zero=True)(
        modulate(layer_norm(self.dtype)(x), shift, scale))


class DiT(nn.Module):
  """The DiT noise-prediction network; defaults are DiT-S/2's (width 384, depth 12, 6 heads,
  patch 2).

  With `num_classes > 0`, labels index an embedding table of `num_classes + 1` rows whose last
  row (label `num_classes`) means "no label", for classifier-free guidance.
  """
  patch_size: int = 2
  depth: int = 12
  width: int = 384
  num_heads: int = 6
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  out_channels: int = 3
  num_classes: int = 0
  dtype: str = "float32"
  remat: bool = False

  # Fields that change no parameter shape and not what the network learned: a run may resume
  # with other values.
  FREE_FIELDS = ("dropout", "remat", "dtype")

  @staticmethod
  def size_multiple(fields) -> int:
    """The image height and width must be multiples of the patch size."""
    return fields["patch_size"]

  @staticmethod
  def check_fields(fields, image_shape) -> None:
    """ArgumentError naming the first field (of `fields`: this network's config fields) that
    cannot build a DiT for images of `image_shape` (H, W, C)."""
    patch = validation.whole("patch_size", fields["patch_size"], 1)
    validation.whole("depth", fields["depth"], 1)
    width = validation.whole("width", fields["width"], 1)
    heads = validation.whole("num_heads", fields["num_heads"], 1)
    mlp_ratio = validation.real("mlp_ratio", fields["mlp_ratio"], 0.0, low_included=False)
    validation.real("dropout", fields["dropout"], 0.0, 1.0)
    validation.whole("out_channels", fields["out_channels"], 1)
    validation.whole("num_classes", fields["num_classes"], 0)
    validation.one_of("dtype", fields["dtype"], ("float32", "bfloat16"), "compute dtype")
    validation.boolean("remat", fields["remat"])
    if width % 4:
      raise ArgumentError("width", width, "the 2-D sin-cos positional embedding needs a width "
                          "that is a multiple of 4")
    if width % heads:
      raise ArgumentError("num_heads", heads, f"the width {width} does not split into {heads} "
                          "heads; choose a divisor of width")
    if mlp_hidden_dim(width, mlp_ratio) < 1:
      raise ArgumentError("mlp_ratio", mlp_ratio, f"gives the MLP no hidden unit at width "
                          f"{width}; expected width × mlp_ratio ≥ 1")
    if image_shape[0] % patch or image_shape[1] % patch:
      raise ArgumentError("patch_size", patch, f"a {image_shape[0]}×{image_shape[1]} image does "
                          f"not split into {patch}×{patch} patches; choose a patch size that "
                          "divides both")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """x [B, H, W, C], t [B] (or scalar) times as floats, y [B] labels or None →
    [B, H, W, out_channels] float32."""
    if x.ndim != 4:
      raise ValueError(f"DiT expects NHWC images of rank 4, got shape {x.shape}")
    batch, height, width, _ = x.shape
    patch = self.patch_size
    if height % patch or width % patch:
      raise ValueError(f"image size {height}x{width} does not split into patches of "
                       f"patch_size={patch}")
    if y is not None and self.num_classes == 0:
      raise ValueError("class labels y were given, but the model has num_classes=0 "
                       "(unconditional); set num_classes > 0 or pass y=None")
    dtype = jnp.dtype(self.dtype)

    def time_dense(name: str) -> nn.Dense:
      return nn.Dense(self.width, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=embedding_init, name=name)

    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    c = time_dense("t_embedder_0")(timestep_embedding(t, TIME_FREQUENCY_DIM, MAX_PERIOD))
    c = time_dense("t_embedder_1")(nn.silu(c))
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((batch,), self.num_classes, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, self.width, param_dtype=jnp.float32,
                       embedding_init=embedding_init, name="y_embedder")(y)

    h = nn.Conv(self.width, (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype,
                param_dtype=jnp.float32, kernel_init=patch_init, name="x_embedder")(x)
    grid_height, grid_width = height // patch, width // patch
    positions = sincos_position_embedding(grid_height, grid_width, self.width)
    h = h.reshape(batch, grid_height * grid_width, self.width) + positions.astype(dtype)

    block_cls = nn.remat(DiTBlock, static_argnums=(3,)) if self.remat else DiTBlock
    for index in range(self.depth):
      block = block_cls(self.num_heads, self.mlp_ratio, self.dropout, dtype,
                        name=f"blocks_{index}")
      h = block(h, c, train)

    h = FinalLayer(patch * patch * self.out_channels, dtype, name="final_layer")(h, c)
    # Token (i, j)'s outputs, ordered (row in patch, column in patch, channel), fill pixels
    # (i·p … i·p + p − 1, j·p … j·p + p − 1).
    h = h.reshape(batch, grid_height, grid_width, patch, patch, self.out_channels)
    h = h.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, self.out_channels)
    return h.astype(jnp.float32)
