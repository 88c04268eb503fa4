"""Distillation epoch time with the teacher-output cache vs running the teacher live.

  python benchmarks/teacher_cache.py --teacher=runs/minilm_teacher [--examples=8192]
      [--student=bilstm] [--repeats=2] [--out=runs/bench_teacher_cache.json]

Both variants run the same student, loss, batches and optimizer in this process, alternating
(live, cached, live, cached, ...) after a warm-up pass that compiles every bucket shape; the
table reports the median epoch time of each, the one-time cost of filling the cache, and the
break-even number of epochs. `--examples=0` uses the whole SST-2 training split.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import sst2_minilm_students  # noqa: E402
from kdjax import config as config_lib  # noqa: E402
from kdjax import optim, teacher_cache, train  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from kdjax.data import pipeline, text  # noqa: E402
from kdjax.kd import objective as kd_objective  # noqa: E402
from kdjax.models import registry  # noqa: E402


def epoch_seconds(step_fn, state, teacher_params, batches, extra=None):
  start = time.perf_counter()
  for _ in range(batches.batches_per_epoch):
    batch = next(batches)
    if extra is not None:
      batch['teacher_logits'] = extra[batch['index']]
    state, metrics = step_fn(state, teacher_params, batch)
  jax.block_until_ready(metrics)
  return time.perf_counter() - start, state


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--teacher', default='runs/minilm_teacher')
  parser.add_argument('--examples', type=int, default=8192)
  parser.add_argument('--student', default='bilstm', choices=('bilstm', 'cnn', 'bert'))
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--out', default='runs/bench_teacher_cache.json')
  args = parser.parse_args(argv)

  config = sst2_minilm_students.get_config(f'student={args.student},teacher={args.teacher}')
  teacher_dir = config_lib.teacher_export_dir(args.teacher)
  teacher, teacher_params, _ = train.load_exported_model(teacher_dir)
  tokenizer = text.load_tokenizer(teacher_dir)
  sentences, labels = pipeline.load_split('sst2_local', 'train', train.default_tfds_dir())
  if args.examples:
    sentences, labels = sentences[: args.examples], labels[: args.examples]
  ids = pipeline.encode(sentences, tokenizer, config.data.max_len)

  spec = config.student  # the same student as experiments/sst2_minilm_students.py
  student = registry.build_model(
    spec.model, vocab_size=len(tokenizer), num_classes=2, **spec.kwargs.to_dict()
  )
  params = registry.init_params(student, jax.random.PRNGKey(0))
  tx = optim.make_optimizer(config.student_optim, 10_000)
  # The experiment's loss (logit MSE + CE) reads logits only, as the cache stores them.
  objective = kd_objective.logits_only(config.loss, 10_000)
  live_step = step_lib.make_train_step(step_lib.distill_loss_fn(student, teacher, objective), tx)
  cached_step = step_lib.make_train_step(step_lib.distill_loss_fn(student, None, objective), tx)

  def batches():
    return pipeline.BatchIterator(
      ids, labels, args.batch_size, tuple(config.data.buckets), 0, True, True
    )

  # One-time cost: the teacher over every example in inference mode.
  start = time.perf_counter()
  logits_fn = step_lib.make_logits_fn(teacher)
  eval_batches = pipeline.BatchIterator(
    ids, labels, 256, tuple(config.data.buckets), 0, False, False, sort_by_length=True
  )
  cached = teacher_cache.compute_outputs(
    lambda b: (jax.device_get(logits_fn(teacher_params, b)), {}),
    eval_batches.one_epoch(),
    len(ids),
    pooled=False,
  )['logits']
  fill_seconds = time.perf_counter() - start

  def fresh_state():
    return step_lib.create_state(
      jax.tree_util.tree_map(np.array, params), tx, jax.random.PRNGKey(1)
    )

  # Warm-up: compile both steps for every bucket length.
  epoch_seconds(live_step, fresh_state(), teacher_params, batches())
  epoch_seconds(cached_step, fresh_state(), None, batches(), cached)
  live, fed = [], []
  for _ in range(args.repeats):
    live.append(epoch_seconds(live_step, fresh_state(), teacher_params, batches())[0])
    fed.append(epoch_seconds(cached_step, fresh_state(), None, batches(), cached)[0])
  live_s, fed_s = statistics.median(live), statistics.median(fed)
  result = {
    'examples': len(ids),
    'student': args.student,
    'batch_size': args.batch_size,
    'live_epoch_seconds': live,
    'cached_epoch_seconds': fed,
    'cache_fill_seconds': fill_seconds,
    'speedup': live_s / fed_s,
    'break_even_epochs': fill_seconds / max(live_s - fed_s, 1e-9),
    'devices': [str(d) for d in jax.devices()],
  }
  print(f'| {len(ids)} examples, {args.student} student, batch {args.batch_size} | seconds |')
  print('|---|---:|')
  print(f'| epoch, teacher live (median of {args.repeats}) | {live_s:.1f} |')
  print(f'| epoch, teacher outputs from the cache (median of {args.repeats}) | {fed_s:.1f} |')
  print(f'| filling the cache once (teacher inference) | {fill_seconds:.1f} |')
  print(f'| speed-up per epoch | {result["speedup"]:.1f}x |')
  print(f'| cache pays for itself after | {result["break_even_epochs"]:.2f} epochs |')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  return result


if __name__ == '__main__':
  main()
