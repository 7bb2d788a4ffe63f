"""The train state, the optimizer, learning rate and EMA rule from config, and the train step.

`train_step` is a pure function of (state, batch) that receives what it depends on (the noise
draw, the loss, the optimizer, the learning-rate and EMA-decay functions) as arguments, as the
Flax examples do; `make_train_step` builds those from a config once and jits the step over the
mesh with the state's shardings from `parallel.state_shardings`.
"""

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff import losses, parallel, phema, validation
from jaxdiff.denoiser import Denoiser


class TrainState(flax.struct.PyTreeNode):
  """Everything training needs to continue: one pytree."""

  step: jax.Array          # int32 scalar: optimizer steps taken (skipped non-finite ones too)
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array           # typed key; step s uses fold_in(rng, s)
  phema: tuple = ()        # post-hoc EMA: one average of params per tracked profile, or none


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
  validation.one_of("lr_decay", decay, decay_fns, "learning-rate decay")
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


def ema_decay_fn(train_config) -> Callable[[jax.Array], jax.Array]:
  """step ↦ the EMA decay of `train_config` at that step (`ema_decay_at`)."""
  return functools.partial(ema_decay_at, decay=train_config.ema_decay,
                           warmup=train_config.ema_warmup)


def ema_update(ema_params, params, decay):
  """θ_ema ← decay · θ_ema + (1 − decay) · θ."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def phema_profiles(train_config) -> tuple[float, ...]:
  """The σ_rel of each post-hoc EMA profile training tracks: `train.phema_sigma_rels` when
  `train.phema_every` > 0 (snapshots are saved), else none."""
  if not train_config.get("phema_every", 0):
    return ()
  return tuple(train_config.phema_sigma_rels)


def averages_fn(train_config) -> Callable:
  """(ema_params, phema, params, step) ↦ the averages after optimizer step number `step` + 1
  made `params`: the EMA (`ema_update` at `ema_decay_fn`'s decay) and each tracked post-hoc EMA
  profile (`phema.update`)."""
  decay_fn, sigma_rels = ema_decay_fn(train_config), phema_profiles(train_config)

  def averages(ema_params, phema_averages, params, step):
    ema_params = ema_update(ema_params, params, decay_fn(step))
    if sigma_rels:
      phema_averages = phema.update(phema_averages, params, step + 1, sigma_rels)
    return ema_params, phema_averages

  return averages


def init_state(denoiser: Denoiser, train_config, key) -> TrainState:
  """A fresh TrainState: params initialised from `key`, EMA and post-hoc EMA profiles equal to
  them, step 0."""
  init_key, rng = jax.random.split(key)
  params, profiles = denoiser.init(init_key), phema_profiles(train_config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=make_optimizer(train_config).init(params), rng=rng,
                    phema=phema.init(params, profiles) if profiles else ())


def abstract_state(denoiser: Denoiser, train_config, mesh: Mesh | None = None) -> TrainState:
  """The TrainState's shapes and dtypes, computed without making any array; with `mesh`, each
  leaf also carries its sharding from `parallel.state_shardings` (the target of a restore)."""
  shapes = jax.eval_shape(functools.partial(init_state, denoiser, train_config),
                          jax.random.key(0))
  if mesh is None:
    return shapes
  return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes, parallel.state_shardings(shapes, mesh))


def abstract_batch(denoiser: Denoiser, train_config, mesh: Mesh):
  """The shapes, dtypes and shardings of what the jitted step takes as its batch: {'image':
  float32 [B, H, W, C], 'label': int32 [B]}, or K of them stacked [K, B, ...] with
  `train_config.steps_per_call` = K > 1."""
  steps_per_call, batch_size = train_config.steps_per_call, train_config.batch_size
  stacked = (steps_per_call,) if steps_per_call > 1 else ()
  sharding = (parallel.stacked_batch_sharding(mesh) if stacked
              else parallel.batch_sharding(mesh))
  return {"image": jax.ShapeDtypeStruct((*stacked, batch_size, *denoiser.image_shape),
                                        jnp.float32, sharding=sharding),
          "label": jax.ShapeDtypeStruct((*stacked, batch_size), jnp.int32, sharding=sharding)}


def create_state(denoiser: Denoiser, train_config, mesh: Mesh, key) -> TrainState:
  """A fresh TrainState made directly with its shardings over `mesh` (never whole on one
  device first)."""
  shardings = parallel.state_shardings(abstract_state(denoiser, train_config), mesh)
  return jax.jit(functools.partial(init_state, denoiser, train_config),
                 out_shardings=shardings)(key)


def make_loss_fn(denoiser: Denoiser, diffusion_config) -> Callable:
  """(params, batch, draws, dropout_key) ↦ (L_simple, aux) of `losses.loss_from_draws` for this
  denoiser (its schedule and prediction target) and `config.diffusion`'s loss weighting, with
  dropout active; the draws come from `losses.draw_noise`."""

  def denoise_fn(params, x_t, t, labels, key):
    return denoiser.output(params, x_t, t, labels, train=True, rngs={"dropout": key})

  def loss_fn(params, batch, draws, dropout_key):
    return losses.loss_from_draws(denoise_fn, params, denoiser.process, batch, draws,
                                  dropout_key, diffusion_config.loss_weighting,
                                  diffusion_config.min_snr_gamma)

  return loss_fn


def split_micro_batches(x, num_micro_batches: int):
  """[B, ...] -> [k, B/k, ...] where micro-batch i holds rows i, i + k, i + 2k, …: a device's
  rows of the batch are its rows of every micro-batch, so the split moves no data."""
  rows = x.reshape(x.shape[0] // num_micro_batches, num_micro_batches, *x.shape[1:])
  return jnp.swapaxes(rows, 0, 1)


def merge_micro_batches(x):
  """The inverse of `split_micro_batches`: [k, B/k, ...] -> [B, ...] in batch order."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def gradient_loop_unroll(length: int) -> int:
  """How far to unroll a `lax.scan` whose body takes gradients of the U-Net: the whole loop on
  CPU, where XLA:CPU runs such a body 14–19× slower inside a while loop than outside it (the
  samplers' forward-only loops are not affected; benchmarks/NOTES.md); not at all elsewhere."""
  return length if jax.default_backend() == "cpu" else 1


def accumulated_value_and_grad(loss_fn: Callable, num_micro_batches: int) -> Callable:
  """`jax.value_and_grad(loss_fn, has_aux=True)` over a whole batch, computed on
  `num_micro_batches` = k slices one after another (`lax.scan`), so that only one slice's
  activations are alive at a time. The loss and gradients are the means over the slices (equal
  sizes: the whole batch's mean); aux's per-example values come back in batch order. Slice i's
  dropout key is fold_in(dropout_key, i); t, noise and labels are the whole batch's draws."""
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro_batches == 1:
    return value_and_grad

  def accumulated(params, batch, draws, dropout_key):
    def accumulate(grad_sum, micro):
      index, micro_batch, micro_draws = micro
      (loss, aux), grads = value_and_grad(params, micro_batch, micro_draws,
                                          jax.random.fold_in(dropout_key, index))
      return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

    micro_batches = jax.tree.map(lambda x: split_micro_batches(x, num_micro_batches),
                                 (batch, draws))
    grad_sum, (micro_losses, aux) = jax.lax.scan(
        accumulate, jax.tree.map(jnp.zeros_like, params),
        (jnp.arange(num_micro_batches), *micro_batches),
        unroll=gradient_loop_unroll(num_micro_batches))
    grads = jax.tree.map(lambda g: g / num_micro_batches, grad_sum)
    return (jnp.mean(micro_losses), jax.tree.map(merge_micro_batches, aux)), grads

  return accumulated


def train_step(state: TrainState, batch, *, draw_fn: Callable, loss_fn: Callable,
               optimizer: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               averages_fn: Callable, time_bins: Callable, loss_bins: int,
               grad_accum_steps: int = 1):
  """One optimizer step on a global batch; returns (new state, metrics).

  key = fold_in(rng, step); (draws, dropout key) = `draw_fn(key, batch)` for the whole batch;
  (loss, grads) of `loss_fn(params, batch, draws, dropout_key)`, accumulated over
  `grad_accum_steps` micro-batches (`accumulated_value_and_grad`); params ← optimizer update;
  the averages of the params after it, `averages_fn` (the EMA θ_ema ← d·θ_ema + (1 − d)·θ, and
  the post-hoc EMA profiles). A step whose loss or gradient is not finite leaves params, EMA and
  optimizer state as they were (only `step` advances, so the next step draws fresh noise; the
  post-hoc profiles average the kept params, staying exact power-function averages) and reports
  `finite = False`.
  The metrics also give ‖Δθ‖/‖θ‖ (`relative_update`), which shows an exploding but still
  finite update.
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  draws, dropout_key = draw_fn(step_key, batch)
  (loss, aux), grads = accumulated_value_and_grad(loss_fn, grad_accum_steps)(
      state.params, batch, draws, dropout_key)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  keep_if_finite = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  params = keep_if_finite(optax.apply_updates(state.params, updates), state.params)
  ema_params, phema_averages = averages_fn(state.ema_params, state.phema, params, state.step)
  new_state = state.replace(
      step=state.step + 1, params=params,
      ema_params=keep_if_finite(ema_params, state.ema_params),
      opt_state=keep_if_finite(opt_state, state.opt_state), phema=phema_averages)
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "relative_update": optax.tree.norm(updates) / optax.tree.norm(state.params),
      "learning_rate": learning_rate_fn(state.step),
      "finite": finite,
      **loss_by_timestep(aux["per_example_loss"], time_bins(aux["t"], loss_bins), loss_bins),
  }
  return new_state, metrics


def loss_by_timestep(per_example_loss, bins, num_bins: int):
  """Sums and counts of the per-example loss (as optimized: weighted where the loss is) in the
  `num_bins` bins of the process's time (`process.time_bin`) that `bins` [B] give."""
  return {
      "loss_bin_sum": jax.ops.segment_sum(per_example_loss, bins, num_bins),
      "loss_bin_count": jax.ops.segment_sum(jnp.ones_like(per_example_loss), bins, num_bins),
  }


def make_train_step(denoiser: Denoiser, config, mesh: Mesh):
  """`train_step` with its dependencies built from `config`, jitted once over the mesh: the
  state with its shardings from `parallel.state_shardings`, the batch split over every device,
  the old state's buffers donated. The program is written for the global batch; XLA partitions
  it, so per-device noise is each device's slice of the global draw and the result does not
  depend on the number of devices or the mesh's shape.

  With `config.train.steps_per_call` = K > 1 the function runs K steps in one program (a
  `lax.scan` of the step): it takes K stacked batches [K, B, ...] and returns the state after
  the K-th step and the metrics of each step stacked [K, ...], as K calls would.
  """
  train_config, process = config.train, denoiser.process
  parallel.check_divisible(train_config.batch_size, mesh, train_config.grad_accum_steps)
  step = functools.partial(
      train_step,
      draw_fn=functools.partial(losses.draw_noise, process=process,
                                num_classes=denoiser.num_classes, p_uncond=train_config.p_uncond),
      loss_fn=parallel.split_loss_fn(make_loss_fn(denoiser, config.diffusion), mesh),
      optimizer=make_optimizer(train_config),
      learning_rate_fn=learning_rate_schedule(train_config),
      averages_fn=averages_fn(train_config), time_bins=process.time_bin,
      loss_bins=train_config.loss_bins, grad_accum_steps=train_config.grad_accum_steps)
  batch_sharding = parallel.batch_sharding(mesh)
  if train_config.steps_per_call > 1:
    step = functools.partial(jax.lax.scan, step)
    batch_sharding = parallel.stacked_batch_sharding(mesh)
  state_shardings = parallel.state_shardings(abstract_state(denoiser, train_config), mesh)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)
