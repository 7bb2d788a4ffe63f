"""A small digit classifier that jaxdiff trains itself: the offline judge of sample quality.

No downloaded weights: the network is trained on the dataset's train split (seeded, a few
hundred Adam steps on the CPU), checked on its test split, and cached in the data_dir, so every
later evaluation reuses the same judge. Its 128-d penultimate layer is the feature space of
the quality score (`jaxdiff.evaluation.quality`).
"""

import hashlib
import json

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxdiff import data, storage
from jaxdiff.data import sources

VERSION = 1  # bump when the architecture or the training recipe changes: old caches go stale
FEATURE_DIM = 128
MIN_TEST_ACCURACY = {"digits": 0.98, "mnist5k": 0.95}


class DigitClassifier(nn.Module):
  """Three 3×3 convolutions (the last two with stride 2), a 128-d ReLU feature layer on their
  flattened output and a linear read-out: images in [−1, 1] → (features [B, 128], logits)."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    for features, stride in ((32, 1), (64, 2), (128, 2)):
      x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.num_classes)(features)


def _recipe(data_config, num_classes: int, seed: int) -> dict:
  return {"version": VERSION, "dataset": data_config.dataset,
          "image_size": data_config.image_size, "num_classes": num_classes, "seed": seed,
          "steps": 600, "batch_size": 128, "learning_rate": 2e-3, "max_shift": 1}


def _as_model_input(images_uint8):
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def _random_shift(key, images, max_shift: int):
  """Each image shifted by up to `max_shift` pixels in x and y (zero padding = black)."""
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(images, pad, constant_values=-1.0)
  size = images.shape[1]
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (size, size, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def train_classifier(train_images, train_labels, recipe: dict):
  """Adam on cross-entropy, batches drawn with replacement, random shifts: returns params."""
  model = DigitClassifier(recipe["num_classes"])
  key = jax.random.key(recipe["seed"])
  init_key, key = jax.random.split(key)
  images = jnp.asarray(train_images)
  labels = jnp.asarray(train_labels)
  params = model.init(init_key, _as_model_input(images[:1]))["params"]
  optimizer = optax.adam(optax.cosine_decay_schedule(recipe["learning_rate"], recipe["steps"]))

  @jax.jit
  def step(params, opt_state, step_key):
    index_key, shift_key = jax.random.split(step_key)
    index = jax.random.randint(index_key, (recipe["batch_size"],), 0, images.shape[0])
    x = _random_shift(shift_key, _as_model_input(images[index]), recipe["max_shift"])

    def loss_fn(params):
      _, logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for index in range(recipe["steps"]):
    params, opt_state = step(params, opt_state, jax.random.fold_in(key, index))
  return params


def classify(params, images_uint8, num_classes: int, batch_size: int = 500):
  """(features [N, 128] float64, logits [N, num_classes]) of uint8 images [N, H, W, C]."""
  model = DigitClassifier(num_classes)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, _as_model_input(x)))
  outputs = [jax.device_get(apply(params, images_uint8[i:i + batch_size]))
             for i in range(0, len(images_uint8), batch_size)]
  features, logits = zip(*outputs)
  return np.concatenate(features).astype(np.float64), np.concatenate(logits)


def accuracy(params, images_uint8, labels, num_classes: int) -> float:
  _, logits = classify(params, images_uint8, num_classes)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def cache_path(data_config, recipe: dict) -> str:
  digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
  name = f"{recipe['dataset']}_{recipe['image_size']}px_{digest}"
  return storage.join(sources.data_dir(data_config), "jaxdiff_classifiers", name)


def load_or_train(data_config, seed: int = 0):
  """The dataset's classifier: (params, info) from the cache, or trained, checked and cached.

  info = the recipe plus 'test_accuracy'. Raises ValueError for datasets without labels and
  when the test accuracy misses the dataset's floor (`MIN_TEST_ACCURACY`).
  """
  num_classes = data.dataset_info(data_config).num_classes
  if num_classes < 2:
    raise ValueError(f"the quality score needs a labelled dataset; {data_config.dataset!r} has "
                     f"{num_classes} classes (use --metric=fid or --metric=bpd)")
  recipe = _recipe(data_config, num_classes, seed)
  path = cache_path(data_config, recipe)
  model = DigitClassifier(num_classes)
  if storage.exists(storage.join(path, "info.json")):
    info = json.loads(storage.read_text(storage.join(path, "info.json")))
    template = model.init(jax.random.key(0), jnp.zeros(
        (1, data_config.image_size, data_config.image_size, data_config.num_channels)))["params"]
    with storage.open_file(storage.join(path, "params.msgpack"), "rb") as f:
      return flax.serialization.from_bytes(template, f.read()), info
  train_images, train_labels = data.load_split_numpy(data_config, data_config.train_split)
  test_images, test_labels = data.load_split_numpy(data_config, data_config.eval_split)
  logging.info("training the %s quality classifier (cached in %s)", data_config.dataset, path)
  params = train_classifier(train_images, train_labels, recipe)
  info = {**recipe, "test_accuracy": accuracy(params, test_images, test_labels, num_classes)}
  floor = MIN_TEST_ACCURACY.get(data_config.dataset, 0.0)
  if info["test_accuracy"] < floor:
    raise ValueError(f"the {data_config.dataset} classifier reached {info['test_accuracy']:.3f} "
                     f"test accuracy, below its floor {floor}; it is not a trustworthy judge")
  try:
    with storage.staged(path) as staging:
      storage.makedirs(staging)
      with storage.open_file(storage.join(staging, "params.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(params))
      storage.write_text(storage.join(staging, "info.json"), json.dumps(info, indent=2))
  except FileExistsError:  # another process cached it first: theirs is the same recipe
    pass
  return params, info
