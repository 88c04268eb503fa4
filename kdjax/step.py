"""Pure train and eval steps, built by factories and jit-compiled.

Every train step has one signature, `step(state, teacher_params, batch) -> (state, metrics)`:
the frozen teacher's parameters are a separate, non-donated argument, so the optimizer never
sees them and they are never written back. `metrics` maps names to (sum, count) pairs.
Every loss function is `loss_fn(params, teacher_params, batch, rng, step)`; the step number
drives the objective's temperature and weight schedules.
"""

import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kdjax import losses
from kdjax.kd import ensemble as kd_ensemble
from kdjax.kd import objective as kd_objective
from kdjax.kd import output as kd_output

Batch = Mapping[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict]]


def unroll_cpu_threefry(unrolled: bool = True) -> bool:
  """Lowers jax's threefry PRNG on CPU as straight-line code (True) or jax's default rolled
  loop (False), for every compile that follows in this process; returns whether it applied.

  Why: on CPU jax emits threefry's 20 rounds as an XLA while loop (shorter compiles), which
  XLA cannot fuse, so every dropout mask materialises its uint32 state in memory once per
  round. At the MiniLM teacher's fine-tuning step (batch 32, L = 128) that was ~20 % of
  forward + backward; unrolled, XLA fuses the rounds into the mask's consumers. The bits are
  the same (same algorithm, same keys), so masks and results are bit-identical. The unrolled
  form is what jax already uses on GPU and TPU. It reaches into jax internals: on a jax
  without them it changes nothing, says so in a warning, and returns False (results are the
  same either way; only the speed differs).
  """
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as threefry

    rule = threefry._threefry2x32_lowering_rule if unrolled else None
    rule = rule or threefry._threefry2x32_cpu_lowering_rule
    mlir.register_lowering(threefry.threefry2x32_p, rule, platform='cpu')
  except (ImportError, AttributeError) as e:
    warnings.warn(
      f'kdjax.step: could not switch the CPU threefry lowering ({e}); dropout masks use '
      "jax's default rolled loop (same values, slower on CPU)",
      stacklevel=2,
    )
    return False
  return True


CPU_THREEFRY_UNROLLED = unroll_cpu_threefry()


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; each step folds in its step number


def create_state(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
  )


def _apply(model: nn.Module, params, batch: Batch, rng, train: bool):
  return model.apply(
    {'params': params},
    batch['input_ids'],
    batch['attention_mask'],
    deterministic=not train,
    rngs={'dropout': rng} if train else {},
  )


def supervised_loss_fn(model: nn.Module) -> LossFn:
  def loss_fn(params, teacher_params, batch, rng, step):
    del teacher_params, step
    logits, _ = _apply(model, params, batch, rng, train=True)
    return losses.supervised_loss(logits, batch['labels'], batch['weights'])

  return loss_fn


def distill_loss_fn(
  student: nn.Module, teacher: nn.Module | None, objective: kd_objective.Objective
) -> LossFn:
  """Student trained against a frozen teacher run in inference mode (no dropout).

  With `teacher=None` the teacher's logits come precomputed in `batch['teacher_logits']`
  (the teacher-output cache), with its pooled vectors in `batch['teacher_pooled']` when a
  pooled term reads them, and the teacher never runs. When the objective has learned
  heads (projections, CRD), params = {'student': ..., 'kd_heads': ...}.
  """
  with_heads = bool(objective.head_shapes)

  def loss_fn(params, teacher_params, batch, rng, step):
    student_params, head_params = (
      (params['student'], params['kd_heads'])
      if with_heads
      else (
        params,
        {},
      )
    )
    if teacher is None:
      cached = {'pooled': batch['teacher_pooled']} if 'teacher_pooled' in batch else {}
      teacher_out = (batch['teacher_logits'], cached)
    else:
      teacher_out = _apply(teacher, teacher_params, batch, None, train=False)
    # stop_gradient makes the freeze explicit in the graph, not only in the optimizer.
    teacher_out = jax.lax.stop_gradient(teacher_out)
    student_out = _apply(student, student_params, batch, rng, train=True)
    return objective(step, student_out, teacher_out, batch, head_params)

  return loss_fn


def multi_teacher_loss_fn(
  student: nn.Module,
  teachers: Sequence[nn.Module] | None,
  objectives: Sequence[kd_objective.Objective],
  mode: str,
  teacher_weights: Sequence[float],
) -> LossFn:
  """Student trained against K frozen teachers; `teacher_params` is a tuple of K params.

  With `teachers=None` the teachers' logits come cached in `batch['teacher_logits']`
  [B, K, C]. `teacher_weights` sum to 1. 'average_probs': one objective against the
  pseudo-logits of the weighted mixture of the teachers' softmax(z/T) (see
  kd.ensemble.mixture_logits). 'sum_losses': Σ_k w_k · objective_k(student, teacher_k),
  one objective per teacher (each built for that teacher's outputs); metrics are weighted
  the same way. Because the weights sum to 1 the teacher-free CE term, identical in every
  objective_k, enters once with its configured weight, not K times. Learned heads of
  objective k live in params['kd_heads']['teacher_<k>'] (with one teacher, this is
  distill_loss_fn: heads in params['kd_heads']).
  """
  num = len(teacher_weights)
  weights = tuple(float(w) for w in teacher_weights)
  with_heads = any(o.head_shapes for o in objectives)

  def loss_fn(params, teacher_params, batch, rng, step):
    student_params, head_params = (
      (params['student'], params['kd_heads']) if with_heads else (params, {})
    )
    if teachers is None:
      outs = [(batch['teacher_logits'][:, k], {}) for k in range(num)]
    else:
      outs = [_apply(t, p, batch, None, train=False) for t, p in zip(teachers, teacher_params)]
    outs = jax.lax.stop_gradient(outs)
    student_out = _apply(student, student_params, batch, rng, train=True)
    if num == 1:  # one teacher is its own mixture and its own sum: the single-teacher loss
      return objectives[0](step, student_out, outs[0], batch, head_params)
    s_logits, w = student_out[0], batch['weights']
    temperature = objectives[0].temperature(step)
    if mode == 'average_probs':
      stacked = jnp.stack([o[0] for o in outs], axis=1)
      target = kd_ensemble.mixture_logits(stacked, weights, temperature)
      loss, metrics = objectives[0](step, student_out, (target, {}), batch)
      # The pseudo-logits are tied to T: KL at T = 1 is taken to the T = 1 mixture.
      at_one = kd_ensemble.mixture_logits(stacked, weights, 1.0)
      metrics['kl_T1'] = kd_output.forward_kl(s_logits, at_one, 1.0, w)
    else:
      parts = [
        objective(step, student_out, out, batch, head_params.get(f'teacher_{k}', {}))
        for k, (objective, out) in enumerate(zip(objectives, outs))
      ]
      loss = sum(wk * part[0] for wk, part in zip(weights, parts))
      metrics = {
        name: (sum(wk * part[1][name][0] for wk, part in zip(weights, parts)), value[1])
        for name, value in parts[0][1].items()
      }
    for k, out in enumerate(outs):
      metrics[f'teacher_{k}/kl_T'] = kd_output.forward_kl(s_logits, out[0], temperature, w)
      metrics[f'teacher_{k}/agreement'] = losses.agreement(s_logits, out[0], w)
    return loss, metrics

  return loss_fn


def mutual_loss_fn(model: nn.Module, num_students: int, kd_weight: float, temperature: float):
  """Deep mutual learning: params = {'student_0': ..., 'student_<n-1>': ...}, one model
  class, each copy with its own dropout noise (kd.ensemble.mutual_learning)."""
  names = [f'student_{i}' for i in range(num_students)]

  def loss_fn(params, teacher_params, batch, rng, step):
    del teacher_params, step
    rngs = jax.random.split(rng, num_students)
    logits = [_apply(model, params[n], batch, r, train=True)[0] for n, r in zip(names, rngs)]
    return kd_ensemble.mutual_learning(
      logits, batch['labels'], batch['weights'], temperature, kd_weight
    )

  return loss_fn


def online_loss_fn(
  student: nn.Module,
  teacher: nn.Module,
  objective: kd_objective.Objective,
  teacher_kd_weight: float,
) -> LossFn:
  """Teacher and student trained together; params = {'teacher': ..., 'student': ...}.

  The teacher learns from the labels (plus, if teacher_kd_weight > 0, from the student as
  in deep mutual learning); the student learns from the objective against the teacher.
  Each soft target is stop-gradiented so a KD term only moves the model it trains.
  """

  def loss_fn(params, teacher_params, batch, rng, step):
    del teacher_params
    t_rng, s_rng = jax.random.split(rng)
    teacher_logits, _ = _apply(teacher, params['teacher'], batch, t_rng, train=True)
    student_out = _apply(student, params['student'], batch, s_rng, train=True)
    teacher_loss, teacher_metrics = losses.supervised_loss(
      teacher_logits, batch['labels'], batch['weights']
    )
    student_loss, metrics = objective(
      step, student_out, (jax.lax.stop_gradient(teacher_logits), {}), batch
    )
    mutual = losses.mean(
      kd_output.forward_kl(
        teacher_logits,
        jax.lax.stop_gradient(student_out[0]),
        metrics['schedule/temperature'][0],
        batch['weights'],
      )
    )
    total = student_loss + teacher_loss + teacher_kd_weight * mutual
    metrics['teacher_ce'] = teacher_metrics['ce']
    metrics['teacher_accuracy'] = teacher_metrics['accuracy']
    metrics['loss'] = (total * metrics['ce'][1], metrics['ce'][1])
    return total, metrics

  return loss_fn


def apply_gradients(
  state: TrainState,
  tx: optax.GradientTransformation,
  grads,
  metrics,
  loss: jax.Array | None = None,
):
  """One optimizer update from (already reduced) gradients; adds the gradient norm.

  With `loss` given (the 'skip' non-finite policy), a step whose loss, gradient norm or any
  metric is NaN/Inf leaves params and optimizer state as they were (the loop sees the same
  non-finite metrics and counts the step); the step counter still advances, so the data
  order and dropout keys stay those of the run.
  """
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = (grad_norm, jnp.ones((), jnp.float32))
  if loss is not None:
    # Every reported figure, so the host's check (loop._nonfinite) sees the same verdict.
    finite = jnp.isfinite(loss) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(metrics)])
    )
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def train_step_fn(loss_fn: LossFn, tx: optax.GradientTransformation, skip_nonfinite=False):
  """The un-jitted step over a whole (global) batch; kdjax.parallel compiles it per mode."""

  def step(state: TrainState, teacher_params, batch: Batch):
    # fold_in ties dropout noise to the step number, so a resumed run draws the same masks.
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, teacher_params, batch, rng, state.step
    )
    return apply_gradients(state, tx, grads, metrics, loss if skip_nonfinite else None)

  return step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, skip_nonfinite=False):
  # The old state is dead after the step; donating it lets XLA update buffers in place.
  return jax.jit(train_step_fn(loss_fn, tx, skip_nonfinite), donate_argnums=0)


def make_logits_fn(model: nn.Module):
  """Inference-mode logits for evaluation and prediction (one compile per bucket length)."""

  @jax.jit
  def logits_fn(params, batch: Batch):
    logits, _ = _apply(model, params, batch, None, train=False)
    return logits

  return logits_fn
