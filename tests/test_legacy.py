"""What the code before the `Denoiser` wrote still works: tests/fixtures/legacy/ holds a
checkpoint workdir and an export written at commit 0414960, the params of two tiny U-Nets
(unconditional and of 3 classes) and the images and trajectories that `generate.generate`
drew from them with every sampler (tests/fixtures/legacy/make_legacy_fixtures.py made them).
Today's API must draw the same images from the same params, options and keys, read the
workdir and the export (their configs have no `model.name`: they are U-Nets), and resume
training from the checkpoint."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from jaxdiff import checkpoint, denoiser as denoiser_lib, generate, models, parallel, processes, samplers
from jaxdiff import schedules, train_step
from jaxdiff.jobs import workdir as workdir_lib

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")
NETWORK = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
               out_channels=1)
NUM_TIMESTEPS, IMAGE_SHAPE, STEP = 50, (8, 8, 1), 2

# (sampler, options) of every case the fixtures drew, each at guidance 0 and, with classes, 1.5.
CASES = [("ddpm", dict(num_steps=None)), ("ddpm", dict(num_steps=10)),
         ("ddim", dict(num_steps=10)), ("ddim", dict(num_steps=10, eta=0.5)),
         ("dpm_solver", dict(num_steps=8)), ("dpm_solver_3m", dict(num_steps=8)),
         ("dpm_solver_sde", dict(num_steps=8, spacing="karras")), ("unipc", dict(num_steps=8)),
         ("dpm_solver", dict(num_steps=8, threshold_percentile=0.9, clip_x0=True)),
         ("ddim", dict(num_steps=6, spacing="trailing"))]


def case_name(num_classes: int, sampler: str, options: dict, guidance_scale: float) -> str:
  """The case's name in samples.npz."""
  keywords = "_".join(f"{name}{value}" for name, value in sorted(options.items()))
  return f"c{num_classes}_{sampler}_{keywords}_w{guidance_scale}"


# Each case compiles a sampler of its own (about 6 s of CPU): these two run in every test run
# (thresholding after clipping; the SDE's noise on karras steps, with labels and guidance), all
# 30 with the slow tests.
QUICK = ("c0_dpm_solver_clip_x0True_num_steps8_threshold_percentile0.9_w0.0",
         "c3_dpm_solver_sde_num_steps8_spacingkarras_w1.5")
SAMPLE_CASES = [
    pytest.param(num_classes, sampler, options, guidance_scale, id=name,
                 marks=() if name in QUICK else pytest.mark.slow)
    for num_classes in (0, 3) for sampler, options in CASES
    for guidance_scale in ((0.0, 1.5) if num_classes else (0.0,))
    for name in [case_name(num_classes, sampler, options, guidance_scale)]]


def legacy_config():
  """The config the fixtures' workdir was trained with, as today's code writes it."""
  config = default.get_config()
  config.model.update(NETWORK)
  config.diffusion.num_timesteps = NUM_TIMESTEPS
  config.train.update(batch_size=8, num_steps=STEP)
  return config


def legacy_denoiser(num_classes: int) -> denoiser_lib.Denoiser:
  network = models.UNet(**NETWORK, num_classes=num_classes)
  return denoiser_lib.Denoiser(network=network,
                               process=processes.DDPM(schedules.linear(NUM_TIMESTEPS), "eps"),
                               num_classes=num_classes,
                               image_shape=IMAGE_SHAPE)


def legacy_params(num_classes: int) -> dict:
  """The params of params_c{num_classes}.npz (flat, 'module/…/name'), as a nested dict."""
  params = {}
  with np.load(os.path.join(FIXTURES, f"params_c{num_classes}.npz")) as flat:
    for path, value in flat.items():
      *parents, name = path.split("/")
      node = params
      for parent in parents:
        node = node.setdefault(parent, {})
      node[name] = value
  return params


@functools.cache
def legacy_samples() -> dict:
  with np.load(os.path.join(FIXTURES, "samples.npz")) as samples:
    return dict(samples)


def test_the_cases_are_every_sample_of_the_fixture():
  assert {f"{case.id}/{part}" for case in SAMPLE_CASES for part in ("images", "trajectory")} == (
      set(legacy_samples()))


@pytest.mark.parametrize("num_classes, sampler, options, guidance_scale", SAMPLE_CASES)
def test_the_same_params_options_and_keys_give_the_legacy_samples(num_classes, sampler, options,
                                                                  guidance_scale):
  """As `generate` drew them: 6 images in batches of 4 from key 11, every third step kept, on
  one device. Bit-identical on the machine that wrote the fixtures; the tolerance leaves room
  for other CPUs' float rounding in XLA:CPU."""
  result = generate.generate(
      legacy_denoiser(num_classes), legacy_params(num_classes), jax.random.key(11),
      samplers.SamplingOptions(sampler=sampler, guidance_scale=guidance_scale, batch_size=4,
                               **options),
      num_samples=6, trajectory_every=3, mesh=parallel.make_mesh(jax.devices()[:1]),
      progress=False)
  name = case_name(num_classes, sampler, options, guidance_scale)
  for part in ("images", "trajectory"):
    np.testing.assert_allclose(result[part], legacy_samples()[f"{name}/{part}"], rtol=1e-6,
                               atol=1e-6, err_msg=part)


@pytest.mark.parametrize("folder", ["workdir", "export"])
def test_the_legacy_workdir_and_export_load_as_a_unet(folder):
  trained = workdir_lib.load_model(os.path.join(FIXTURES, folder),
                                   mesh=parallel.make_mesh(jax.devices()[:1]))
  assert "name" not in trained.config.model  # written before networks had names
  assert trained.step == STEP
  assert isinstance(trained.network, models.UNet)
  assert models.network_fields(trained.config.model) == models.network_fields(
      legacy_config().model)
  denoiser = trained.denoiser
  assert (denoiser.num_classes, denoiser.image_shape, denoiser.prediction) == (0, IMAGE_SHAPE,
                                                                                "eps")
  for got, expected in zip(denoiser.process.schedule, schedules.linear(NUM_TIMESTEPS)):
    np.testing.assert_array_equal(got, expected)
  expected = legacy_params(0)
  assert jax.tree.structure(trained.params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(trained.params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_training_resumes_from_the_legacy_checkpoint(tmp_path):
  """Today's config of the same model (named unet) continues the checkpoint: the state restores
  onto today's abstract state with its params, and one more step trains from it. (The fixture
  saved a fresh state, its step 0, as checkpoint step 2.)"""
  workdir = str(tmp_path / "workdir")
  shutil.copytree(os.path.join(FIXTURES, "workdir"), workdir)
  config = legacy_config()
  assert config.model.name == "unet"
  denoiser = denoiser_lib.from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  with checkpoint.Checkpointer(workdir) as checkpointer:
    restored = checkpointer.restore(train_step.abstract_state(denoiser, config.train, mesh),
                                    config=config)
  assert restored.step == STEP and int(restored.state.step) == 0
  assert restored.data_state == {"position": STEP}
  expected = legacy_params(0)
  for tree in (restored.state.params, restored.state.ema_params):
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
      np.testing.assert_array_equal(got, want)
  step_fn = train_step.make_train_step(denoiser, config, mesh)
  images = jax.random.uniform(jax.random.key(0), (8, *IMAGE_SHAPE), minval=-1, maxval=1)
  batch = jax.device_put({"image": images, "label": jnp.zeros(8, jnp.int32)},
                         parallel.batch_sharding(mesh))
  state, metrics = step_fn(restored.state, batch)
  assert int(state.step) == 1 and bool(metrics["finite"])
  assert not np.array_equal(jax.tree.leaves(state.params)[0],
                            jax.tree.leaves(restored.state.params)[0])
