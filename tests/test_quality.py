"""The offline quality score: its classifier's accuracy, its cache, and the scale of its numbers."""

import os

import numpy as np
import pytest

from configs import default, mnist5k_cpu
from jaxdiff import data
from jaxdiff.evaluation import classifier, quality
from jaxdiff.jobs import train
from tests.helpers import logged


def digits_config(data_dir):
  config = default.get_config()
  config.data.data_dir = data_dir
  return config.data


@pytest.mark.slow  # trains the digits classifier (judged_data_dir)
def test_digits_classifier_is_accurate_and_cached(judged_data_dir, monkeypatch):
  data_config = digits_config(judged_data_dir)
  params, info = classifier.load_or_train(data_config)
  assert info["test_accuracy"] >= 0.98
  assert os.path.isdir(classifier.cache_path(data_config, {k: info[k] for k in info
                                                           if k != "test_accuracy"}))
  monkeypatch.setattr(classifier, "train_classifier", lambda *a: pytest.fail("retrained"))
  again, cached_info = classifier.load_or_train(data_config)
  assert cached_info == info
  test_images, test_labels = data.load_split_numpy(data_config, "test")
  assert classifier.accuracy(again, test_images, test_labels, 10) == info["test_accuracy"]


@pytest.mark.slow
def test_mnist5k_cpu_trains_and_its_judge_reaches_its_floor(tmp_path):
  """configs/mnist5k_cpu.py end to end, shortened: real MNIST at its own 28×28 prepared, the
  classifier that judges it trained to its floor, two train steps, and the quality score of the
  samples train.py draws at the end (the recipe's real numbers: docs/results.md)."""
  config = mnist5k_cpu.get_config()
  config.data.data_dir = str(tmp_path / "tensorflow_datasets")
  _, info = classifier.load_or_train(config.data)
  assert info["test_accuracy"] >= 0.95
  config.train.update(num_steps=2, batch_size=8, warmup_steps=1, checkpoint_every=0,
                      sample_every=0, eval_every=2)
  config.eval.update(num_samples=16, batch_size=16, num_steps=2)
  workdir = str(tmp_path / "work")
  train.run(config, workdir)
  evaluation = logged(workdir, "eval/quality/frechet")
  assert list(evaluation) == [2] and evaluation[2] > 0
  assert logged(workdir, "eval/quality/num_samples") == {2: 16}


def test_class_entropy_closed_forms():
  assert quality.class_entropy_bits(np.arange(1000) % 10, 10) == pytest.approx(np.log2(10))
  assert quality.class_entropy_bits(np.full(50, 3), 10) == 0.0
  assert quality.class_entropy_bits(np.array([0, 0, 1, 1]), 10) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def real_images(judged_data_dir):
  images, labels = data.load_split_numpy(digits_config(judged_data_dir), "train")
  pick = np.random.default_rng(5).choice(len(images), 300, replace=False)
  return images[pick], labels[pick]


@pytest.mark.slow  # trains the digits classifier (judged_data_dir)
def test_real_digits_score_like_real_and_noise_scores_far_worse(judged_data_dir, real_images):
  images, labels = real_images
  result = quality.quality_score(images, digits_config(judged_data_dir), seed=1)
  assert result["num_samples"] == 300 and result["num_held_out"] == 355
  assert result["frechet"] < 2 * result["frechet_real_vs_real"]
  assert result["frechet_noise_vs_real"] > 10 * result["frechet"]
  assert result["class_entropy_bits"] > 3.2  # about log2 10 = 3.32: every class present
  assert result["class_entropy_bits_max"] == pytest.approx(np.log2(10))
  conditional = quality.quality_score(images, digits_config(judged_data_dir), labels=labels)
  assert conditional["class_accuracy"] > 0.98
  assert conditional["class_entropy_bits"] == result["class_entropy_bits"]  # same images
  wrong = quality.quality_score(images, digits_config(judged_data_dir), labels=(labels + 1) % 10)
  assert wrong["class_accuracy"] < 0.05


@pytest.mark.slow  # trains the digits classifier (judged_data_dir)
def test_one_repeated_digit_scores_badly(judged_data_dir, real_images):
  images, _ = real_images
  result = quality.quality_score(np.repeat(images[:1], 300, axis=0),
                                 digits_config(judged_data_dir))
  assert result["class_entropy_bits"] == 0.0
  assert result["frechet"] > 5 * result["frechet_real_vs_real"]


@pytest.mark.slow  # trains the digits classifier (judged_data_dir)
def test_samples_of_the_wrong_shape_are_refused(judged_data_dir):
  with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\] uint8"):
    quality.quality_score(np.zeros((4, 28, 28, 1), np.uint8), digits_config(judged_data_dir))
