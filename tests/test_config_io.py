"""Configs through JSON and the check that a config can continue a checkpoint's config."""

import json

import pytest

from configs import default
from jaxdiff import config_io, errors


def small_config():
  config = default.get_config()
  config.model.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
  config.diffusion.num_timesteps = 100
  return config


def test_a_config_survives_json_with_its_tuples():
  config = small_config()
  config_json = config_io.config_to_json(config)
  assert config_json["model"]["ch_mult"] == [1, 2]
  restored = config_io.config_from_json(json.loads(json.dumps(config_json)))
  assert restored == config
  assert restored.model.ch_mult == (1, 2) and restored.model.attn_resolutions == ()


def test_a_config_that_does_not_match_names_the_fields():
  saved = small_config()
  other = small_config()
  other.model.ch = 16
  other.model.ch_mult = (1, 2, 2)
  other.data.image_size = 16
  other.diffusion.prediction = "v"
  other.model.dropout, other.model.dtype = 0.3, "bfloat16"  # free to change between runs
  other.train.learning_rate = 1.0
  assert config_io.config_differences(saved, other) == [
      "model.ch 16 (config) vs 8 (checkpoint)",
      "model.ch_mult (1, 2, 2) (config) vs (1, 2) (checkpoint)",
      "data.image_size 16 (config) vs 8 (checkpoint)",
      "diffusion.prediction 'v' (config) vs 'eps' (checkpoint)"]
  with pytest.raises(config_io.ConfigMismatchError) as error:
    config_io.check_config_compatible(saved, other, "/work/run")
  assert isinstance(error.value, ValueError)  # the training job reports it as a UsageError
  assert str(error.value) == (
      "the config does not match the checkpoint in /work/run: model.ch 16 (config) vs 8 "
      "(checkpoint); model.ch_mult (1, 2, 2) (config) vs (1, 2) (checkpoint); data.image_size 16 "
      "(config) vs 8 (checkpoint); diffusion.prediction 'v' (config) vs 'eps' (checkpoint). Use "
      "the checkpoint's config (its config.json) or a fresh --workdir.")


def test_a_compatible_config_passes_and_absent_fields_are_named():
  saved = small_config()
  compatible = small_config()
  compatible.model.update(dropout=0.3, remat=True, dtype="bfloat16")
  compatible.train.update(learning_rate=1.0, batch_size=8)
  assert config_io.config_differences(saved, compatible) == []
  config_io.check_config_compatible(saved, compatible)
  older = config_io.config_to_json(saved)
  del older["diffusion"]["schedule"]
  assert config_io.config_differences(config_io.config_from_json(older), saved) == [
      f"diffusion.schedule {saved.diffusion.schedule!r} (config) vs '(absent)' (checkpoint)"]


def test_configs_without_a_network_name_are_unets_and_another_network_is_named():
  saved = config_io.config_to_json(small_config())
  del saved["model"]["name"]  # configs and checkpoints from before networks had names
  older = config_io.config_from_json(saved)
  assert config_io.config_differences(older, small_config()) == []
  dit = small_config()
  dit.model.name = "dit"
  differences = config_io.config_differences(older, dit)
  assert differences[0] == "model.name 'dit' (config) vs 'unet' (checkpoint)"


def test_a_checkpoint_fixes_its_noise_process_and_what_its_network_learned_of_it():
  """Checkpoints from before processes had names are DDPM's; another process, or EDM's σ_data,
  is named; EDM's sampling range and training distribution may change."""
  saved = config_io.config_to_json(small_config())
  del saved["diffusion"]["process"]
  older = config_io.config_from_json(saved)
  assert config_io.config_differences(older, small_config()) == []
  edm = small_config()
  edm.diffusion.process = "edm"
  assert config_io.config_differences(older, edm)[0] == (
      "diffusion.process 'edm' (config) vs 'ddpm' (checkpoint)")
  resumed = small_config()
  resumed.diffusion.update(process="edm", sigma_data=0.5, sigma_max=40.0, p_mean=-1.0)
  assert config_io.config_differences(edm, resumed) == []
  resumed.diffusion.sigma_data = 0.6
  assert config_io.config_differences(edm, resumed) == [
      "diffusion.sigma_data 0.6 (config) vs 0.5 (checkpoint)"]
