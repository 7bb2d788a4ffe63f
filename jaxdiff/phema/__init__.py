"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", §3 and appendix): training tracks a few power-function averages of the params and
stores them every N steps; afterwards the average of any length σ_rel, at any stored step, is a
least-squares combination of the stored ones.

Steps. t counts optimizer updates: θ_t are the params after the t-th update (the TrainState's
`step` once that update is applied), t = 1, 2, …; the initial params θ_0 get no weight. A
trajectory is read as the step function θ(τ) = θ_s for τ ∈ (s − 1, s].

The power-function profile of exponent γ ≥ 0 at step t averages the trajectory with the density

  p_{t,γ}(τ) = (γ + 1) τ^γ / t^(γ+1)  on 0 < τ ≤ t (0 elsewhere),  ∫ p_{t,γ} = 1,

whose standard deviation relative to t is σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3))): γ = 0 is
the uniform average (σ_rel = 1/√12, the largest), and σ_rel → 0 as γ → ∞.

The running update θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1) is exactly
this average: the product of the β telescopes, so θ̂_t = Σ_{s≤t} w_s θ_s with

  w_s = (s^(γ+1) − (s − 1)^(γ+1)) / t^(γ+1) = ∫_{s−1}^{s} p_{t,γ}(τ) dτ   (≈ (γ+1) s^γ / t^(γ+1)),

and β_1 = 0 makes θ̂_1 = θ_1 whatever the average held before.

Memory: each tracked profile is one more params-sized pytree in the train state (in the params'
dtype and sharding). Disk: one snapshot stores one params-sized pytree per tracked profile.
"""

import math
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import validation
from jaxdiff.errors import ArgumentError

MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)  # γ = 0: the uniform average over the whole run
# Eigenvalues of the (constrained) Gram matrix below RCOND × the largest are dropped: its
# float64 entries carry relative errors of ~1e-16, so directions that much weaker are noise.
RCOND = 1e-12


def sigma_rel_from_gamma(gamma: float) -> float:
  """σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3))) for an exponent γ ≥ 0."""
  gamma = validation.real("gamma", gamma, 0.0)
  return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
  """The exponent γ ≥ 0 of relative width σ_rel ∈ (0, 1/√12]: the largest real root of
  σ_rel² (γ + 2)² (γ + 3) = γ + 1, i.e. γ³ + 7γ² + (16 − σ_rel⁻²) γ + (12 − σ_rel⁻²) = 0
  (σ_rel falls monotonically in γ ≥ 0, so that root is the only one there)."""
  sigma_rel = validation.real("sigma_rel", sigma_rel, 0.0, MAX_SIGMA_REL, low_included=False,
                              high_included=True)
  c = sigma_rel ** -2
  roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
  return max(0.0, float(roots.real[np.abs(roots.imag) <= 1e-9 * (1 + np.abs(roots))].max()))


def _gammas(sigma_rels: Sequence[float]) -> tuple[float, ...]:
  """The exponents of a non-empty sequence of tracked profiles (`gamma_from_sigma_rel`)."""
  if not isinstance(sigma_rels, (tuple, list)) or not sigma_rels:
    raise ArgumentError("sigma_rels", sigma_rels,
                        f"expected a non-empty tuple of numbers in (0, {MAX_SIGMA_REL:.4f}]")
  return tuple(gamma_from_sigma_rel(sigma_rel) for sigma_rel in sigma_rels)


def update_weight(step, gamma: float) -> jax.Array:
  """1 − β_t = 1 − (1 − 1/t)^(γ+1), float32, for a step t ≥ 1 (a traced int is fine; t = 0
  gives NaN). Computed as −expm1((γ + 1) log1p(−1/t)): accurate to float32 rounding even where
  1 − 1/t is not (t beyond ~10⁴: at 10⁶ the plain formula is off by 1.6 %), and 1 at t = 1."""
  t = jnp.asarray(step, jnp.float32)
  return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))


def init(params, sigma_rels: Sequence[float]) -> tuple:
  """The averages before step 1: one copy of `params` per tracked profile (step 1 replaces them
  by θ_1, so their value only has to be finite)."""
  _gammas(sigma_rels)
  return tuple(jax.tree.map(jnp.array, params) for _ in sigma_rels)


def update(averages: tuple, params, step, sigma_rels: Sequence[float]) -> tuple:
  """Each profile's θ̂_t = θ̂_{t−1} + (1 − β_t)(θ_t − θ̂_{t−1}), β_t = (1 − 1/t)^(γ+1), with
  θ_t = `params` after update number t = `step` (≥ 1; a traced int inside jit is fine) and
  `sigma_rels` static. Each leaf keeps its dtype (computed in at least float32). A step that
  skips the optimizer update must still call this with the kept params: the averages then stay
  exact power-function averages of the trajectory."""
  gammas = _gammas(sigma_rels)
  if len(averages) != len(gammas):
    raise ArgumentError("averages", f"{len(averages)} pytrees",
                        f"expected one per tracked profile ({len(gammas)})")

  def lerp(average, param, weight):
    dtype = jnp.promote_types(average.dtype, jnp.float32)
    average_c = average.astype(dtype)
    return (average_c + weight.astype(dtype) * (param.astype(dtype) - average_c)).astype(
        average.dtype)

  updated = []
  for average, gamma in zip(averages, gammas):
    weight = update_weight(step, gamma)
    updated.append(jax.tree.map(lambda a, p: lerp(a, p, weight), average, params))
  return tuple(updated)


def profile_inner_products(steps_a, gammas_a, steps_b, gammas_b) -> np.ndarray:
  """⟨p_{a}, p_{b}⟩ = ∫ p_{t_a,γ_a}(τ) p_{t_b,γ_b}(τ) dτ, float64, broadcasting its arguments:
  with t_a ≤ t_b, (γ_a + 1)(γ_b + 1) / (γ_a + γ_b + 1) · (t_a/t_b)^γ_b / t_b (and symmetrically),
  written with the ratio ≤ 1 so that no power overflows."""
  steps_a, gammas_a, steps_b, gammas_b = (np.asarray(x, np.float64)
                                          for x in (steps_a, gammas_a, steps_b, gammas_b))
  later = np.maximum(steps_a, steps_b)
  gamma_of_later = np.where(steps_a <= steps_b, gammas_b, gammas_a)
  ratio = np.minimum(steps_a, steps_b) / later
  return ((gammas_a + 1) * (gammas_b + 1) / (gammas_a + gammas_b + 1)
          * ratio ** gamma_of_later / later)


class Reconstruction(NamedTuple):
  """`weights`: one per snapshot (the broadcast shape of its steps and σ_rels; exactly 0 for
  snapshots after the target step, which need not be loaded), summing to 1. `relative_error`:
  ‖Σ w_i p_i − p‖ / ‖p‖ in L2 over training time, how far the combined profile is from the
  target; a parameter's reconstruction error is at most ‖Σ w_i p_i − p‖ · ‖θ − c‖ for any
  constant c (the weights sum to 1), with ‖θ − c‖² = Σ_{s≤t} (θ_s − c)²."""
  weights: np.ndarray
  relative_error: float


def _snapshot_steps(steps) -> np.ndarray:
  array = np.asarray(steps)
  if array.size == 0 or array.dtype.kind not in "iu" or np.any(array < 1):
    raise ArgumentError("steps", steps, "expected whole numbers ≥ 1, one per snapshot")
  return array.astype(np.float64)


def _constrained_least_squares(gram: np.ndarray, overlap: np.ndarray, rcond: float) -> np.ndarray:
  """argmin_w wᵀAw − 2wᵀb subject to Σ w = 1: w = 1/n + Z z, Z the last n − 1 columns of the
  Householder reflection that maps e_0 to 1/√n (an orthonormal basis of Σ v = 0), and z from
  ZᵀAZ z = Zᵀ(b − A 1/n) by the pseudo-inverse that drops eigenvalues below rcond × the
  largest."""
  n = overlap.size
  mean = np.full(n, 1.0 / n)
  if n == 1:
    return mean
  v = np.full(n, 1.0 / math.sqrt(n))
  v[0] -= 1.0
  basis = (np.eye(n) - 2.0 * np.outer(v, v) / (v @ v))[:, 1:]
  eigenvalues, vectors = np.linalg.eigh(basis.T @ gram @ basis)
  kept = eigenvalues > rcond * eigenvalues[-1]
  rhs = vectors[:, kept].T @ (basis.T @ (overlap - gram @ mean))
  return mean + basis @ (vectors[:, kept] @ (rhs / eigenvalues[kept]))


def reconstruction_weights(steps, sigma_rels, target_step: int, target_sigma_rel: float,
                           rcond: float = RCOND) -> Reconstruction:
  """The weights w such that Σ w_i θ̂_i over the snapshots (snapshot i: the average of profile
  σ_rel_i at step t_i) is the average of profile `target_sigma_rel` at `target_step`, as near as
  the snapshots allow: w minimises ‖Σ w_i p_i − p‖² in L2 over training time subject to
  Σ w_i = 1 (constant params are reproduced exactly), from the Gram matrix
  A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p⟩ (`profile_inner_products`), in float64.

  `steps` and `sigma_rels` broadcast against each other (several snapshots per step: steps of
  shape (n, 1) and the k tracked σ_rels give weights of shape (n, k)). Only snapshots at steps
  ≤ `target_step` are used, and `target_step` must be one of the snapshot steps (between
  snapshots the trajectory since the last one is unknown).

  Ill-conditioning: the constraint is solved exactly and the rest by a pseudo-inverse that drops
  eigenvalues below `rcond` × the largest (`_constrained_least_squares`), so that repeated or
  near-identical snapshots share their weight instead of cancelling with huge opposite ones.
  `relative_error` comes from ‖p‖² − 2wᵀb + wᵀAw, which resolves it down to ~1e-8."""
  steps_f = _snapshot_steps(steps)
  try:
    steps_f, sigma_rels_f = np.broadcast_arrays(steps_f, np.asarray(sigma_rels, np.float64))
  except ValueError:
    raise ArgumentError("sigma_rels", sigma_rels,
                        f"expected a shape that broadcasts with steps' {np.shape(steps)}") from None
  if not validation.is_whole(target_step) or target_step not in steps_f:
    raise ArgumentError("target_step", target_step,
                        "expected one of the snapshot steps "
                        f"({', '.join(str(int(s)) for s in np.unique(steps_f)[-3:])}, …)")
  validation.real("rcond", rcond, 0.0, 1.0)
  gammas = np.vectorize(gamma_from_sigma_rel, otypes=[np.float64])(sigma_rels_f)
  target_gamma = gamma_from_sigma_rel(target_sigma_rel)

  used = (steps_f <= target_step).ravel()
  t, g = steps_f.ravel()[used], gammas.ravel()[used]
  gram = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
  overlap = profile_inner_products(t, g, target_step, target_gamma)
  weights_used = _constrained_least_squares(gram, overlap, rcond)
  target_norm2 = profile_inner_products(target_step, target_gamma, target_step, target_gamma)
  error2 = target_norm2 - 2 * weights_used @ overlap + weights_used @ gram @ weights_used
  weights = np.zeros(steps_f.size)
  weights[used] = weights_used
  return Reconstruction(weights.reshape(steps_f.shape),
                        math.sqrt(max(float(error2), 0.0) / float(target_norm2)))


def reconstruct(snapshots: Iterable[Any], weights) -> Any:
  """Σ_i w_i · snapshot_i over pytrees of one structure, `weights` in row-major order (e.g.
  `Reconstruction.weights`, its snapshots listed step by step, the profiles of a step in
  order). `snapshots` may be a generator that loads one at a time; the sum is accumulated in at
  least float32 and returned in the snapshots' dtypes."""
  weights = np.asarray(weights, np.float64).ravel()
  total, dtypes, count = None, None, 0
  for snapshot in snapshots:
    if count == weights.size:
      raise ArgumentError("snapshots", f"more than {weights.size} pytrees",
                          f"expected one per weight ({weights.size})")
    weight = float(weights[count])
    snapshot = jax.tree.map(jnp.asarray, snapshot)
    term = jax.tree.map(lambda x: weight * x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                        snapshot)
    if total is None:
      total, dtypes = term, jax.tree.map(lambda x: x.dtype, snapshot)
    else:
      total = jax.tree.map(jnp.add, total, term)
    count += 1
  if count != weights.size:
    raise ArgumentError("snapshots", f"{count} pytrees",
                        f"expected one per weight ({weights.size})")
  return jax.tree.map(lambda x, dtype: x.astype(dtype), total, dtypes)
