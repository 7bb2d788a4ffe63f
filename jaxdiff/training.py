"""The train state, the optimizer and EMA from config, and the data-parallel train step."""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff import losses, parallel
from jaxdiff.models import UNet
from jaxdiff.schedules import Schedule


class TrainState(flax.struct.PyTreeNode):
  """Everything training needs to continue: one pytree."""

  step: jax.Array          # int32 scalar: optimizer steps taken (skipped non-finite ones too)
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array           # typed key; step s uses fold_in(rng, s)


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then `lr_decay`:
  'constant' (DDPM), 'cosine' or 'linear' decay to 0 at `num_steps`."""
  peak, warmup = train_config.learning_rate, train_config.warmup_steps
  decay = train_config.lr_decay
  warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay_steps = max(train_config.num_steps - warmup, 1)
  decay_fns = {
      "constant": optax.constant_schedule(peak),
      "cosine": optax.cosine_decay_schedule(peak, decay_steps),
      "linear": optax.linear_schedule(peak, 0.0, decay_steps),
  }
  if decay not in decay_fns:
    raise ValueError(f"unknown lr_decay {decay!r}; choose one of {sorted(decay_fns)}")
  if warmup == 0:
    return decay_fns[decay]
  return optax.join_schedules([warmup_fn, decay_fns[decay]], [warmup])


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Clip by global norm, then Adam (AdamW when weight_decay > 0) at the scheduled rate."""
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.adamw(learning_rate_schedule(train_config), b1=train_config.adam_b1,
                  b2=train_config.adam_b2, eps=train_config.adam_eps,
                  weight_decay=train_config.weight_decay),
  )


def ema_decay_at(step, decay: float, warmup: bool):
  """The EMA decay at `step`: `decay`, or with warm-up min(decay, (1 + step) / (10 + step))."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
  """θ_ema ← decay · θ_ema + (1 − decay) · θ."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def create_model(config) -> UNet:
  return UNet(**config.model)


def init_state(config, model: UNet, key) -> TrainState:
  """A fresh TrainState: params initialised from `key`, EMA equal to them, step 0."""
  init_key, rng = jax.random.split(key)
  size, channels = config.data.image_size, config.data.num_channels
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  params = model.init({"params": init_key}, x, t, labels)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=make_optimizer(config.train).init(params), rng=rng)


def train_step(state: TrainState, batch, *, model: UNet, schedule: Schedule, config):
  """One optimizer step on a global batch; returns (new state, metrics).

  A step whose loss or gradient is not finite leaves params, EMA and optimizer state as
  they were (only `step` advances, so the next step draws fresh noise) and reports
  `finite = False`.
  """
  train_config = config.train
  step_key = jax.random.fold_in(state.rng, state.step)

  def denoise_fn(params, x_t, t, labels, key):
    return model.apply({"params": params}, x_t, t, labels, train=True, rngs={"dropout": key})

  loss_fn = functools.partial(
      losses.diffusion_loss, denoise_fn, schedule=schedule, batch=batch, key=step_key,
      prediction=config.diffusion.prediction, num_classes=config.model.num_classes,
      p_uncond=train_config.p_uncond)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = make_optimizer(train_config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = ema_update(state.ema_params, params,
                          ema_decay_at(state.step, train_config.ema_decay,
                                       train_config.ema_warmup))
  keep_if_finite = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      ema_params=keep_if_finite(ema_params, state.ema_params),
      opt_state=keep_if_finite(opt_state, state.opt_state))
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": learning_rate_schedule(train_config)(state.step),
      "finite": finite,
      **loss_by_timestep(aux["per_example_loss"], aux["t"], schedule.num_timesteps,
                         train_config.loss_bins),
  }
  return new_state, metrics


def loss_by_timestep(per_example_loss, t, num_timesteps: int, num_bins: int):
  """Sums and counts of the per-example loss in `num_bins` equal bins of t."""
  bins = t * num_bins // num_timesteps
  return {
      "loss_bin_sum": jax.ops.segment_sum(per_example_loss, bins, num_bins),
      "loss_bin_count": jax.ops.segment_sum(jnp.ones_like(per_example_loss), bins, num_bins),
  }


def make_train_step(model: UNet, schedule: Schedule, config, mesh: Mesh):
  """`train_step` jitted once over the mesh: state replicated, batch split over `data`,
  the old state's buffers donated. The program is written for the global batch; XLA
  partitions it, so per-device noise is each device's slice of the global draw and the
  result does not depend on the number of devices."""
  replicated, batch_sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(
      functools.partial(train_step, model=model, schedule=schedule, config=config),
      in_shardings=(replicated, batch_sharded),
      out_shardings=(replicated, replicated),
      donate_argnums=0)
