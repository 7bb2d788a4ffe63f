"""The offline quality score: generated digits judged by jaxdiff's own classifier.

(a) `frechet`: the Fréchet distance between samples and held-out images in the classifier's
    128-d feature space (FID's formula, with ε·I added to both covariances);
(b) `class_accuracy`, for class-conditional samples: the share labelled as the class asked for;
(c) `class_entropy`: the entropy of the predicted class histogram in bits (log2 10 ≈ 3.32 when
    every class is equally common, 0 when all look alike); for conditional samples too, where
    it says how evenly the classes asked for in turn came out.
Each comes with its scale: the same number for real train images of the same count, and the
Fréchet distance of Gaussian noise images.
"""

import numpy as np

from jaxdiff import data
from jaxdiff.evaluation import classifier, frechet

COVARIANCE_EPS = 1e-6
LABEL = "quality score (Fréchet distance in jaxdiff's digit-classifier features)"


def class_entropy_bits(predicted_classes, num_classes: int) -> float:
  """H = −Σ_k p_k log2 p_k of the histogram of predicted classes."""
  counts = np.bincount(predicted_classes, minlength=num_classes).astype(np.float64)
  probs = counts[counts > 0] / counts.sum()
  return float(-np.sum(probs * np.log2(probs)))


def noise_images(num_images: int, image_shape, seed: int) -> np.ndarray:
  """uint8 images of N(0, 1) static clipped to [−1, 1]: what an untrained model makes."""
  noise = np.random.default_rng(seed).standard_normal((num_images, *image_shape))
  return np.round((np.clip(noise, -1, 1) + 1) * 127.5).astype(np.uint8)


def quality_score(samples_uint8, data_config, *, labels=None, seed: int = 0) -> dict:
  """The quality score of uint8 samples [N, H, W, C] (as the model makes them, image_size ×
  image_size) against the dataset's held-out split; `labels` are the classes asked for
  (conditional samples) or None."""
  samples_uint8 = np.asarray(samples_uint8)
  params, info = classifier.load_or_train(data_config)
  num_classes = info["num_classes"]
  expected_shape = (data_config.image_size, data_config.image_size, data_config.num_channels)
  if samples_uint8.ndim != 4 or samples_uint8.shape[1:] != expected_shape:
    raise ValueError(f"samples have shape {samples_uint8.shape}; the classifier takes "
                     f"[N, {', '.join(map(str, expected_shape))}] uint8 images")
  num_samples = len(samples_uint8)
  held_out, _ = data.load_split_numpy(data_config, data_config.eval_split)
  train_images, train_labels = data.load_split_numpy(data_config, data_config.train_split)
  rng = np.random.default_rng(seed)
  pick = rng.choice(len(train_images), min(num_samples, len(train_images)), replace=False)
  real, real_labels = train_images[pick], train_labels[pick]

  def features_and_classes(images):
    features, logits = classifier.classify(params, images, num_classes)
    return frechet.feature_stats(features), np.argmax(logits, axis=-1)

  held_out_stats, _ = features_and_classes(held_out)
  sample_stats, sample_classes = features_and_classes(samples_uint8)
  real_stats, real_classes = features_and_classes(real)
  noise_stats, _ = features_and_classes(noise_images(num_samples, expected_shape, seed))
  distance = lambda stats: frechet.frechet_distance(stats, held_out_stats, COVARIANCE_EPS)
  result = {
      "metric": LABEL,
      "num_samples": num_samples,
      "num_held_out": len(held_out),
      "frechet": distance(sample_stats),
      "frechet_real_vs_real": distance(real_stats),
      "frechet_noise_vs_real": distance(noise_stats),
      "classifier_test_accuracy": info["test_accuracy"],
  }
  if labels is not None:
    result["class_accuracy"] = float(np.mean(sample_classes == np.asarray(labels)))
    result["class_accuracy_real"] = float(np.mean(real_classes == real_labels))
  result["class_entropy_bits"] = class_entropy_bits(sample_classes, num_classes)
  result["class_entropy_bits_real"] = class_entropy_bits(real_classes, num_classes)
  result["class_entropy_bits_max"] = float(np.log2(num_classes))
  return result
