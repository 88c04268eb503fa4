"""The one training loop every stage runs: steps, progress, metrics, checkpoints, resume,
non-finite guards and preemption."""

import contextlib
import dataclasses
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from kdjax import checkpoint, optim, parallel, report
from kdjax import step as step_lib


class TrainingDiverged(FloatingPointError):
  """A loss or gradient became NaN/Inf; the last checkpoint before it is kept."""


class Preempted(RuntimeError):
  """SIGTERM (or a TPU preemption notice) stopped training after a checkpoint of the current
  step was saved; the same command resumes there."""


@contextlib.contextmanager
def _termination_requests():
  """An Event set by SIGTERM while training (main thread of a one-process job only: in a
  multi-process job the processes must agree on the step, which JAX's preemption sync
  point does)."""
  requested = threading.Event()
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield requested
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
  try:
    yield requested
  finally:
    signal.signal(signal.SIGTERM, previous)


def _preemption_noticed(step: int) -> bool:
  """True once every process of a multi-process job reached `step` after a preemption notice
  (the TPU maintenance-event / SIGTERM service started by jax.distributed)."""
  if jax.process_count() == 1:
    return False
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is not running in this cluster
    return False


@dataclasses.dataclass
class StageSpec:
  name: str  # also the key in metrics.jsonl records
  loss_fn: step_lib.LossFn
  tx: optax.GradientTransformation
  schedule: optax.Schedule  # learning rate by step, for the logs
  params: Any  # initial trainable params
  rng: jax.Array  # base key for dropout
  steps: int
  teacher_params: Any = None  # frozen teacher, or None
  evaluate: Callable[[Any], dict] | None = None  # params -> {metric: value}


def _nonfinite(metrics: dict) -> list[str]:
  """Names of the step's metrics (loss terms, gradient norm) that are NaN or Inf."""
  return [
    name
    for name, (total, count) in metrics.items()
    if not (math.isfinite(float(total)) and math.isfinite(float(count)))
  ]


def _means(sums: dict) -> dict:
  return {k: float(total) / max(float(count), 1.0) for k, (total, count) in sums.items()}


def train_stage(
  spec: StageSpec,
  batches,
  stage_dir: pathlib.Path,
  train_cfg,
  writer: report.MetricsWriter,
  data_parallel: parallel.DataParallel | None = None,
) -> tuple[Any, dict]:
  """Trains `spec.params` for `spec.steps` steps, resuming from the newest checkpoint.

  With `data_parallel` the step runs over every device of the job; `batches` then yields
  this process's rows of each global batch. The returned params are host numpy arrays.
  """
  dp = data_parallel or parallel.DataParallel()
  # train.ema_decay > 0: the optimizer also keeps a moving average of the weights (in its
  # state, so checkpoints carry it), and that average is what the evaluations see and the
  # stage returns; the steps themselves are unchanged.
  ema_decay = train_cfg.get('ema_decay', 0.0)
  tx = optim.with_param_ema(spec.tx, ema_decay) if ema_decay else spec.tx

  def weights(state):
    return state.params if not ema_decay else optim.ema_params(state.opt_state)

  # One process speaks for the job (the trainer gives the others a writer that drops records).
  say = print if parallel.is_lead_process() else lambda *args, **kwargs: None
  state = dp.put_state(step_lib.create_state(spec.params, tx, spec.rng))
  ckpt = checkpoint.StageCheckpointer(stage_dir / 'checkpoints', train_cfg.keep_checkpoints)
  # Restored into the placement of `state`: whatever device count wrote the checkpoint.
  restored = ckpt.restore_latest(state)
  done, skipped = 0, 0  # steps finished, and of those skipped as non-finite
  if restored is not None:
    state, position = restored
    batches.set_state(position)
    done, skipped = int(parallel.to_host(state.step)), int(position.get('skipped_steps', 0))
    writer.truncate_after(spec.name, done)
    say(f'[{spec.name}] resumed from step {done} ({ckpt.directory / str(done)})', flush=True)
  policy = train_cfg.get('nonfinite', 'stop')
  train_step = dp.train_step(spec.loss_fn, tx, skip_nonfinite=policy == 'skip')
  teacher_params = dp.put_teacher(spec.teacher_params)

  def save(step: int) -> None:
    ckpt.save(step, state, {**batches.get_state(), 'skipped_steps': skipped})

  sums, interval_examples, interval_steps, compiled_shapes = None, 0, 0, set()
  interval_compiled = False
  steady_examples, steady_seconds = 0, 0.0
  interval_start = time.perf_counter()
  max_skipped = train_cfg.get('max_skipped_steps', 0)
  # However the loop ends (divergence, preemption, an error, Ctrl-C), leaving `ckpt` finishes
  # the saves already started, so the checkpoints an error message points to exist.
  with ckpt, _termination_requests() as terminate:
    for step in range(done + 1, spec.steps + 1):
      batch = next(batches)
      shape = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))
      # The first batch of each new input shape compiles; keep it out of the throughput.
      interval_compiled |= shape not in compiled_shapes
      compiled_shapes.add(shape)
      state, metrics = train_step(state, teacher_params, dp.put_batch(batch))
      metrics = parallel.to_host(metrics)
      bad = _nonfinite(metrics)  # the step skipped its update on device iff this is non-empty
      if bad and policy == 'stop':
        last = ckpt.latest_step()
        raise TrainingDiverged(
          f'[{spec.name}] non-finite {", ".join(bad)} at step {step}; '
          + (
            f'the last good checkpoint (step {last}) is kept in {ckpt.directory}'
            if last is not None
            else 'no checkpoint was written before it'
          )
          + "; set train.nonfinite='skip' to skip such steps"
        )
      if bad:
        skipped += 1
        say(f'[{spec.name}] step {step} skipped: non-finite {", ".join(bad)}', flush=True)
        if skipped > max_skipped:
          raise TrainingDiverged(
            f'[{spec.name}] {skipped} non-finite steps skipped (the last at step {step}: '
            f'{", ".join(bad)}), more than train.max_skipped_steps={max_skipped}; the last '
            f'good checkpoint is kept in {ckpt.directory}'
          )
      else:
        sums = metrics if sums is None else jax.tree_util.tree_map(np.add, sums, metrics)
        # This process's rows; the others feed as many.
        interval_examples += int(batch['weights'].sum()) * jax.process_count()
        interval_steps += 1

      if (step % train_cfg.log_every == 0 or step == spec.steps) and sums is not None:
        means = _means(sums)
        seconds = time.perf_counter() - interval_start
        if not interval_compiled:
          steady_examples += interval_examples
          steady_seconds += seconds
        rate = interval_examples / seconds
        writer.write(
          {
            'stage': spec.name,
            'step': step,
            'learning_rate': float(spec.schedule(step)),
            'examples_per_sec': rate,
            'skipped_steps': skipped,
            **means,
          }
        )
        eta = (spec.steps - step) * seconds / interval_steps
        say(
          f'[{spec.name}] step {step}/{spec.steps} loss {means["loss"]:.4f} '
          f'acc {means["accuracy"]:.3f} {rate:.0f} ex/s eta {eta:.0f}s',
          flush=True,
        )
        sums, interval_examples, interval_steps, interval_compiled = None, 0, 0, False
        interval_start = time.perf_counter()

      if (
        spec.evaluate
        and train_cfg.eval_every
        and step % train_cfg.eval_every == 0
        and step != spec.steps
      ):
        values = spec.evaluate(parallel.to_host(weights(state)))
        writer.write(
          {'stage': spec.name, 'step': step, **{f'eval_{k}': v for k, v in values.items()}}
        )
        say(
          f'[{spec.name}] step {step} eval ' + ' '.join(f'{k} {v:.4f}' for k, v in values.items()),
          flush=True,
        )
        interval_start = time.perf_counter()

      # A sync point in a multi-process job: every process asks once per step.
      stop = terminate.is_set() or _preemption_noticed(step)
      if stop or step % train_cfg.checkpoint_every == 0 or step == spec.steps:
        save(step)
      if stop:
        raise Preempted(
          f'[{spec.name}] stopped by SIGTERM/preemption at step {step}/{spec.steps}; '
          f'checkpoint saved in {ckpt.directory / str(step)}; run the same command to resume'
        )
  info = {
    'steps': spec.steps,
    'skipped_steps': skipped,
    'train_examples_per_sec': (
      steady_examples / steady_seconds if steady_seconds else float('nan')
    ),
  }
  return parallel.to_host(weights(state)), info
