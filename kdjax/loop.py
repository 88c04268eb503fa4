"""The one training loop every stage runs: steps, progress, metrics, checkpoints, resume."""

import dataclasses
import math
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from kdjax import checkpoint, parallel, report
from kdjax import step as step_lib


class TrainingDiverged(FloatingPointError):
  """A loss or gradient became NaN/Inf; the last checkpoint before it is kept."""


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
  # One process speaks for the job (the trainer gives the others a writer that drops records).
  say = print if parallel.is_lead_process() else lambda *args, **kwargs: None
  state = dp.put_state(step_lib.create_state(spec.params, spec.tx, spec.rng))
  ckpt = checkpoint.StageCheckpointer(stage_dir / 'checkpoints', train_cfg.keep_checkpoints)
  # Restored into the placement of `state`: whatever device count wrote the checkpoint.
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, position = restored
    batches.set_state(position)
    step_done = int(parallel.to_host(state.step))
    writer.truncate_after(spec.name, step_done)
    say(
      f'[{spec.name}] resumed from step {step_done} ({ckpt.directory / str(step_done)})',
      flush=True,
    )
  train_step = dp.train_step(spec.loss_fn, spec.tx)
  teacher_params = dp.put_teacher(spec.teacher_params)

  sums, interval_examples, interval_steps, compiled_shapes = None, 0, 0, set()
  interval_compiled = False
  steady_examples, steady_seconds = 0, 0.0
  interval_start = time.perf_counter()
  first_step = int(parallel.to_host(state.step)) + 1
  for step in range(first_step, spec.steps + 1):
    batch = next(batches)
    shape = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))
    # The first batch of each new input shape compiles; keep it out of the throughput.
    interval_compiled |= shape not in compiled_shapes
    compiled_shapes.add(shape)
    state, metrics = train_step(state, teacher_params, dp.put_batch(batch))
    metrics = parallel.to_host(metrics)
    sums = metrics if sums is None else jax.tree_util.tree_map(np.add, sums, metrics)
    # This process's rows; the others feed as many.
    interval_examples += int(batch['weights'].sum()) * jax.process_count()
    interval_steps += 1

    if step % train_cfg.log_every == 0 or step == spec.steps:
      means = _means(sums)
      bad = [k for k, v in means.items() if not math.isfinite(v)]
      if bad:
        raise TrainingDiverged(
          f'[{spec.name}] non-finite {", ".join(bad)} at step {step} (values '
          f'{ {k: means[k] for k in bad} }); the last good checkpoint is kept in '
          f'{ckpt.directory}'
        )
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
      values = spec.evaluate(parallel.to_host(state.params))
      writer.write(
        {'stage': spec.name, 'step': step, **{f'eval_{k}': v for k, v in values.items()}}
      )
      say(
        f'[{spec.name}] step {step} eval ' + ' '.join(f'{k} {v:.4f}' for k, v in values.items()),
        flush=True,
      )
      interval_start = time.perf_counter()

    if step % train_cfg.checkpoint_every == 0 or step == spec.steps:
      ckpt.save(step, state, batches.get_state())
  ckpt.wait()
  ckpt.close()
  info = {
    'steps': spec.steps,
    'train_examples_per_sec': (
      steady_examples / steady_seconds if steady_seconds else float('nan')
    ),
  }
  return parallel.to_host(state.params), info
