"""The DDPM U-Net ε_θ(x_t, t[, y]) (Ho et al. 2020, `diffusion_tf/models/unet.py`), NHWC.

Parameters are always float32; `dtype` only sets the compute precision of the layers that
see images. Time stays float32 whatever `dtype` is: t → sinusoidal embedding → the two-layer
time MLP (`temb_dense0`, `temb_dense1`) runs in float32, since bfloat16 cannot hold t = 998
(it rounds to 996 or 1000) and the MLP costs nothing next to the convolutions. Parameter names
follow the official TensorFlow code (`down_0_block_0`, `mid_attn_1`, `conv_out`, …).
"""

import functools
import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff import validation
from jaxdiff.errors import ArgumentError

# DDPM's `default_init`: variance scaling with scale 1, fan_avg, uniform (Glorot uniform).
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0,
                       flip_sin_to_cos: bool = False, freq_shift: float = 1.0) -> jax.Array:
  """Sinusoidal embedding of timesteps t [batch] → [batch, dim] float32.

  With h = dim // 2, s = freq_shift and frequencies f_i = max_period^(−i / (h − s)), i = 0 … h−1:
      emb(t) = [sin(t·f_0), …, sin(t·f_{h−1}), cos(t·f_0), …, cos(t·f_{h−1})]
  ([cos …, sin …] with `flip_sin_to_cos`), zero-padded by one column when dim is odd. The
  defaults are the DDPM code's (s = 1); diffusers' `get_timestep_embedding` is this embedding.
  """
  half_dim = dim // 2
  if half_dim <= freq_shift:
    raise ValueError(f"a timestep embedding of dim {dim} needs dim // 2 > freq_shift, got "
                     f"freq_shift {freq_shift}")
  exponents = jnp.arange(half_dim, dtype=jnp.float32) / (half_dim - freq_shift)
  freqs = jnp.exp(-math.log(max_period) * exponents)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  waves = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  return jnp.pad(jnp.concatenate(waves, axis=-1), ((0, 0), (0, dim % 2)))


def num_groups(channels: int, max_groups: int = 32) -> int:
  """The largest group count ≤ max_groups that divides `channels` (32 for DDPM widths)."""
  return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def _per_channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ a, Σ a·b) over H and W: [B, C] each, one pass over the image."""
  space = tuple(range(1, a.ndim - 1))
  return jnp.sum(a, axis=space), jnp.sum(a * b, axis=space)


def _over_groups(per_channel: jax.Array, groups: int) -> jax.Array:
  """[B, C] → the sum over each group's channels, repeated back to [B, C]."""
  batch, channels = per_channel.shape
  summed = per_channel.reshape(batch, groups, channels // groups).sum(axis=-1, keepdims=True)
  return jnp.broadcast_to(summed, (batch, groups, channels // groups)).reshape(batch, channels)


def _group_size(x: jax.Array, groups: int) -> int:
  """n, the elements each group's statistics run over: H·W times the group's channels."""
  return math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)


def _group_statistics(x: jax.Array, groups: int, epsilon: float):
  """x as float32, μ_g and rsqrt(σ²_g + ε) [B, C] per channel, σ²_g = E[x²] − μ_g² over H, W
  and the group's channels, from per-channel sums."""
  x = x.astype(jnp.float32)
  count = _group_size(x, groups)
  sum_x, sum_x2 = _per_channel_sums(x, x)
  mean = _over_groups(sum_x, groups) / count
  variance = jnp.maximum(_over_groups(sum_x2, groups) / count - jnp.square(mean), 0.0)
  return x, mean, jax.lax.rsqrt(variance + epsilon)


def _image(per_channel: jax.Array, ndim: int) -> jax.Array:
  """[B, C] → [B, 1, …, 1, C], broadcastable against the image."""
  return per_channel.reshape(per_channel.shape[0], *([1] * (ndim - 2)), per_channel.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                    epsilon: float) -> jax.Array:
  """y = γ·x̂ + β, x̂ = (x − μ_g)·rsqrt(σ²_g + ε), statistics over H, W and each group's channels.

  Computed as y = a·x + b with per-(image, channel) a = γ·rsqrt(σ² + ε), b = β − a·μ: one pass
  for the statistics, one for y. Float32 whatever x's dtype; the gradient is written out
  (`_group_normalize_backward`).
  """
  return _group_normalize_forward(x, scale, bias, groups, epsilon)[0]


def _group_normalize_forward(x, scale, bias, groups, epsilon):
  x32, mean, inv_std = _group_statistics(x, groups, epsilon)
  a = scale * inv_std
  y = x32 * _image(a, x.ndim) + _image(bias - a * mean, x.ndim)
  return y, (x, mean, inv_std, scale)


def _group_normalize_backward(groups, epsilon, residuals, dy):
  """With g = γ·dy, x̂ = (x − μ)·r, r = rsqrt(σ² + ε) and means over each group's n elements:
      dx = r·(g − mean(g) − x̂·mean(g·x̂)) = γr·dy + c1·x + c0,
      dγ = Σ dy·x̂,  dβ = Σ dy,
  where c1 and c0 are per-(image, channel) numbers made from the per-channel sums Σ dy and
  Σ dy·x: one pass for the sums, one for dx.
  """
  x, mean, inv_std, scale = residuals
  x32, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
  count = _group_size(x, groups)
  sum_dy, sum_dy_x = _per_channel_sums(dy, x32)
  sum_dy_x_hat = (sum_dy_x - mean * sum_dy) * inv_std  # Σ dy·x̂ per image and channel
  mean_g = _over_groups(scale * sum_dy, groups) / count
  mean_g_x_hat = _over_groups(scale * sum_dy_x_hat, groups) / count
  c1 = -jnp.square(inv_std) * mean_g_x_hat
  c0 = -inv_std * mean_g - c1 * mean
  dx = _image(scale * inv_std, x.ndim) * dy + _image(c1, x.ndim) * x32 + _image(c0, x.ndim)
  return dx.astype(x.dtype), jnp.sum(sum_dy_x_hat, axis=0), jnp.sum(sum_dy, axis=0)


group_normalize.defvjp(_group_normalize_forward, _group_normalize_backward)


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018) with learned per-channel `scale` γ and `bias` β.

  Holds the same parameters as `flax.linen.GroupNorm`; computes in float32 and returns `dtype`.
  """
  groups: int
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return group_normalize(x, scale, bias, self.groups, self.epsilon).astype(self.dtype)


class Norm(NamedTuple):
  """Every GroupNorm's settings: `groups` per layer (None: `num_groups(channels)`), `epsilon`."""
  groups: int | None = None
  epsilon: float = 1e-6


def group_norm(channels: int, norm: Norm, dtype: jnp.dtype, name: str) -> GroupNorm:
  groups = num_groups(channels) if norm.groups is None else norm.groups
  return GroupNorm(groups, norm.epsilon, dtype=dtype, name=name)


def conv3x3(features: int, dtype: jnp.dtype, name: str, strides: int = 1,
            zero: bool = False, padding="SAME") -> nn.Conv:
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=padding, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=zero_init if zero else default_init,
                 name=name)


def dense(features: int, dtype: jnp.dtype, name: str, zero: bool = False) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=zero_init if zero else default_init, name=name)


class ResBlock(nn.Module):
  """GroupNorm → SiLU → conv, + projected time embedding, GroupNorm → SiLU → dropout → conv."""
  out_ch: int
  dropout: float
  dtype: jnp.dtype = jnp.float32
  norm: Norm = Norm()

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    in_ch = x.shape[-1]
    h = nn.silu(group_norm(in_ch, self.norm, self.dtype, "norm1")(x))
    h = conv3x3(self.out_ch, self.dtype, "conv1")(h)
    h = h + dense(self.out_ch, self.dtype, "temb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(group_norm(self.out_ch, self.norm, self.dtype, "norm2")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(self.out_ch, self.dtype, "conv2", zero=True)(h)
    if in_ch != self.out_ch:
      x = dense(self.out_ch, self.dtype, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H·W positions, with a residual connection: `num_heads`
  heads, or heads of `head_dim` channels each where that is set."""
  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32
  norm: Norm = Norm()
  head_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    num_heads = self.num_heads if self.head_dim is None else channels // self.head_dim
    if channels % num_heads or num_heads < 1:
      raise ValueError(f"{channels} channels do not split into attention heads "
                       f"(num_heads {self.num_heads}, head_dim {self.head_dim})")
    head_dim = channels // num_heads
    h = group_norm(channels, self.norm, self.dtype, "norm")(x)

    def project(name: str) -> jax.Array:  # [B, H·W, heads, head_dim]
      projected = dense(channels, self.dtype, name)(h)
      return projected.reshape(batch, height * width, num_heads, head_dim)

    q, k, v = project("q"), project("k"), project("v")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, height, width, channels)
    return x + dense(channels, self.dtype, "proj_out", zero=True)(h)


class Downsample(nn.Module):
  """Halve H and W: 3×3 conv with stride 2, or 2×2 average pooling. The conv pads as `padding`
  says: 0 pads one row and column after the image (TensorFlow's SAME, as in DDPM), 1 pads one
  on every side (PyTorch's padding=1, diffusers' default)."""
  with_conv: bool = True
  dtype: jnp.dtype = jnp.float32
  padding: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      return conv3x3(x.shape[-1], self.dtype, "conv", strides=2,
                     padding=DOWNSAMPLE_PADDINGS[self.padding])(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


# The downsampling conv's padding by `UNet.downsample_padding` (diffusers' name and values).
DOWNSAMPLE_PADDINGS = {0: "SAME", 1: ((1, 1), (1, 1))}


class Upsample(nn.Module):
  """Double H and W: nearest neighbour, then (optionally) a 3×3 conv."""
  with_conv: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = conv3x3(x.shape[-1], self.dtype, "conv")(x)
    return x


def level_widths(fields) -> tuple[int, ...]:
  """Each level's number of channels: `level_channels` where set, else ch × ch_mult."""
  if fields["level_channels"] is not None:
    return tuple(fields["level_channels"])
  return tuple(fields["ch"] * mult for mult in fields["ch_mult"])

def attention_levels(fields, height: int) -> tuple[bool, ...]:
  """Whether each level has attention for images `height` high: whether its feature maps'
  height H / 2^level is in attn_resolutions."""
  return tuple(height // 2**level in fields["attn_resolutions"]
               for level in range(len(level_widths(fields))))

def attention_widths(fields, image_shape) -> set[int]:
  """The channel counts of the attention layers for images of `image_shape` (H, W, C): the
  middle one's and those of the levels with attention."""
  widths = level_widths(fields)
  levels = attention_levels(fields, image_shape[0])
  return {widths[-1]} | {width for width, attention in zip(widths, levels) if attention}

def size_multiple(fields) -> int:
  """The image height and width must be multiples of this: 2 per downsampling level."""
  return 2**(len(level_widths(fields)) - 1)

def check_fields(fields, image_shape) -> None:
  """ArgumentError naming the first field (of `fields`: this network's config fields) that
  cannot build a U-Net for images of `image_shape` (H, W, C)."""
  validation.whole("ch", fields["ch"], 1)
  validation.whole_tuple("ch_mult", fields["ch_mult"], 1)
  validation.whole("num_res_blocks", fields["num_res_blocks"], 0)
  validation.whole_tuple("attn_resolutions", fields["attn_resolutions"], 1, non_empty=False)
  validation.real("dropout", fields["dropout"], 0.0, 1.0)
  validation.whole("out_channels", fields["out_channels"], 1)
  validation.whole("num_classes", fields["num_classes"], 0)
  validation.one_of("dtype", fields["dtype"], validation.COMPUTE_DTYPES, "compute dtype")
  validation.boolean("resamp_with_conv", fields["resamp_with_conv"])
  validation.boolean("remat", fields["remat"])
  heads = validation.whole("num_heads", fields["num_heads"], 1)
  if fields["level_channels"] is not None:
    validation.whole_tuple("level_channels", fields["level_channels"], 1)
  validation.real("norm_eps", fields["norm_eps"], 0.0, low_included=False)
  validation.boolean("flip_sin_to_cos", fields["flip_sin_to_cos"])
  # The time frequencies 10000^(−i/(ch/2 − freq_shift)) fall from 1 where freq_shift < ch/2.
  validation.real("freq_shift", fields["freq_shift"], 0.0, fields["ch"] // 2)
  validation.one_of("downsample_padding", fields["downsample_padding"], DOWNSAMPLE_PADDINGS,
                    "padding")
  widths = level_widths(fields)
  if fields["norm_groups"] is not None:
    groups = validation.whole("norm_groups", fields["norm_groups"], 1)
    if any(width % groups for width in (fields["ch"], *widths)):
      raise ArgumentError("norm_groups", groups, f"every GroupNorm's channels (ch = "
                          f"{fields['ch']} and the level widths {widths}, and sums of them) "
                          f"must split into {groups} groups; choose a common divisor")
  factor = size_multiple(fields)
  if image_shape[0] % factor or image_shape[1] % factor:
    name, value = (("level_channels", tuple(widths)) if fields["level_channels"] is not None
                   else ("ch_mult", tuple(fields["ch_mult"])))
    raise ArgumentError(name, value,
                        f"{len(widths)} levels halve the image {len(widths) - 1} times, which "
                        f"a {image_shape[0]}×{image_shape[1]} image cannot take; use a size "
                        f"that is a multiple of {factor} or fewer levels")
  if fields["head_dim"] is not None:
    head_dim = validation.whole("head_dim", fields["head_dim"], 1)
    if heads != 1:
      raise ArgumentError("num_heads", heads, "head_dim sets the heads' width; leave num_heads "
                          "at 1 or head_dim unset")
    attention = sorted(attention_widths(fields, image_shape))
    if any(width % head_dim for width in attention):
      raise ArgumentError("head_dim", head_dim, f"the attention layers' widths "
                          f"{attention} must split into heads of {head_dim} channels; "
                          "choose a common divisor")
  elif widths[-1] % heads:
    raise ArgumentError("num_heads", heads, f"the middle attention's {widths[-1]} channels (the "
                        f"last level's width) do not split into {heads} heads; choose a divisor")


class UNet(nn.Module):
  """The DDPM noise-prediction network.

  Level l has `ch × ch_mult[l]` channels, or `level_channels[l]` where that is set (for widths
  that are not multiples of `ch`); `ch` is the width of `conv_in` and of the time embedding
  (4·ch after the MLP). `attn_resolutions` lists feature-map heights (e.g. (16,)) where
  self-attention is used, with `num_heads` heads, or heads of `head_dim` channels where that is
  set. With `num_classes > 0`, labels index an embedding table of `num_classes + 1` rows whose
  last row (label `num_classes`) means "no label", for classifier-free guidance. The input
  conv takes whatever channels x has; the output has `out_channels`.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  out_channels: int = 3
  num_classes: int = 0
  dtype: str = "float32"
  resamp_with_conv: bool = True
  num_heads: int = 1
  remat: bool = False
  level_channels: Sequence[int] | None = None  # each level's width; None: ch × ch_mult
  head_dim: int | None = None         # attention heads of this width; None: num_heads heads
  norm_groups: int | None = None      # every GroupNorm's group count; None: num_groups(C)
  norm_eps: float = 1e-6              # every GroupNorm's ε
  flip_sin_to_cos: bool = False       # time embedding [cos, sin] instead of [sin, cos]
  freq_shift: float = 1.0             # time frequencies f_i = 10000^(−i/(ch/2 − freq_shift))
  downsample_padding: int = 0         # 0: SAME, as DDPM; 1: 1 on every side, as diffusers

  # Fields that change no parameter shape and not what the network learned: a run may resume
  # with other values.
  FREE_FIELDS = ("dropout", "remat", "dtype")

  level_widths = staticmethod(level_widths)
  attention_levels = staticmethod(attention_levels)
  attention_widths = staticmethod(attention_widths)
  size_multiple = staticmethod(size_multiple)
  check_fields = staticmethod(check_fields)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """x [B, H, W, C], t [B] (or scalar) timesteps, y [B] labels or None → [B, H, W, out] f32."""
    if x.ndim != 4:
      raise ValueError(f"UNet expects NHWC images of rank 4, got shape {x.shape}")
    batch, height, width, _ = x.shape
    widths = level_widths(dict(ch=self.ch, ch_mult=self.ch_mult,
                                    level_channels=self.level_channels))
    factor = 2**(len(widths) - 1)
    if height % factor or width % factor:
      name = "ch_mult" if self.level_channels is None else "level_channels"
      raise ValueError(
          f"image size {height}x{width} is not divisible by 2**(len({name}) - 1) = {factor} "
          f"({name}={tuple(getattr(self, name))})")
    if y is not None and self.num_classes == 0:
      raise ValueError("class labels y were given, but the model has num_classes=0 "
                       "(unconditional); set num_classes > 0 or pass y=None")
    dtype = jnp.dtype(self.dtype)
    norm = Norm(self.norm_groups, self.norm_eps)
    temb_dim = 4 * self.ch
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    temb = timestep_embedding(t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos,
                              freq_shift=self.freq_shift)
    temb = dense(temb_dim, jnp.float32, "temb_dense0")(temb)
    temb = dense(temb_dim, jnp.float32, "temb_dense1")(nn.silu(temb))
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((batch,), self.num_classes, jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, temb_dim, dtype=dtype,
                             param_dtype=jnp.float32, name="class_embed")(y)

    block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

    def res_block(h: jax.Array, out_ch: int, name: str) -> jax.Array:
      return block_cls(out_ch, self.dropout, dtype, norm, name=name)(h, temb, train)

    def attn_block(h: jax.Array, name: str) -> jax.Array:
      return AttnBlock(self.num_heads, dtype, norm, self.head_dim, name=name)(h)

    hs = [conv3x3(self.ch, dtype, "conv_in")(x)]
    for level, level_width in enumerate(widths):
      for block in range(self.num_res_blocks):
        h = res_block(hs[-1], level_width, f"down_{level}_block_{block}")
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(h, f"down_{level}_attn_{block}")
        hs.append(h)
      if level != len(widths) - 1:
        downsample = Downsample(self.resamp_with_conv, dtype, self.downsample_padding,
                                name=f"down_{level}_downsample")
        hs.append(downsample(hs[-1]))

    h = hs[-1]
    h = res_block(h, h.shape[-1], "mid_block_1")
    h = attn_block(h, "mid_attn_1")
    h = res_block(h, h.shape[-1], "mid_block_2")

    for level, level_width in reversed(list(enumerate(widths))):
      for block in range(self.num_res_blocks + 1):
        h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), level_width,
                      f"up_{level}_block_{block}")
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(h, f"up_{level}_attn_{block}")
      if level != 0:
        h = Upsample(self.resamp_with_conv, dtype, name=f"up_{level}_upsample")(h)

    h = nn.silu(group_norm(h.shape[-1], norm, dtype, "norm_out")(h))
    h = conv3x3(self.out_channels, dtype, "conv_out", zero=True)(h)
    return h.astype(jnp.float32)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
