"""One distillation step on one device against the same step data-parallel over every device.

  python benchmarks/parallel_step.py [--devices=8] [--batch=64] [--length=64] [--steps=20]
      [--teacher_layers=4] [--teacher_width=256] [--out=runs/bench_parallel_step.json]

A BERT teacher (live, frozen) distils into a BERT student a quarter as deep and half as wide
with CE + KL + hidden-state MSE through a learned projection, at the same global batch in
every row. Rows: `single` (jit, one device), `pmap`, `shard_map`, `mesh` (jit over a
NamedSharding mesh, state replicated) and `mesh+fsdp` (state and teacher sharded). Each row
is compiled and warmed up first, then the rows are timed in turns (round-robin, `--rounds`
times) and the median step time is reported with the overhead against `single`, the
throughput, and the parameter bytes each device holds.

On a CPU the devices are simulated (`--devices` sets XLA_FLAGS before JAX starts): the eight
"devices" share this machine's cores, so the overhead column is the cost of splitting the
step and of its collectives on the same hardware, not a speed-up. On a GPU or TPU host the
real devices are used and `--devices` is ignored.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

if __name__ == '__main__':
  _devices = next((a.split('=')[1] for a in sys.argv if a.startswith('--devices=')), '8')
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={_devices}'
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import default  # noqa: E402
from kdjax import parallel  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from kdjax.kd import objective as kd_objective  # noqa: E402
from kdjax.models import registry  # noqa: E402

VOCAB = 30522
ROWS = {
  'single': dict(mode='single'),
  'pmap': dict(mode='pmap'),
  'shard_map': dict(mode='shard_map'),
  'mesh': dict(mode='mesh'),
  'mesh+fsdp': dict(mode='mesh', params='fsdp', teacher='fsdp'),
}


def _bert(layers, width):
  return registry.build_model(
    'bert',
    vocab_size=VOCAB,
    num_classes=2,
    hidden_size=width,
    num_layers=layers,
    num_heads=max(width // 64, 1),
    intermediate_size=4 * width,
    max_len=512,
    dropout_rate=0.1,
    attention_dropout_rate=0.0,
  )


def _batch(rng, batch, length):
  lengths = rng.integers(length // 2, length + 1, batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return {
    'input_ids': rng.integers(1000, VOCAB, (batch, length)).astype(np.int32) * mask,
    'attention_mask': mask,
    'labels': rng.integers(0, 2, batch).astype(np.int32),
    'weights': np.ones(batch, np.float32),
  }


def _device_bytes(tree) -> int:
  """Bytes of `tree` held by the first device (replicated leaves count whole)."""
  first = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == first)
    else:
      total += np.asarray(leaf).nbytes
  return total


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--length', type=int, default=64)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--teacher_layers', type=int, default=4)
  parser.add_argument('--teacher_width', type=int, default=256)
  parser.add_argument('--rows', default=','.join(ROWS))
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)

  teacher = _bert(args.teacher_layers, args.teacher_width)
  student = _bert(max(args.teacher_layers // 4, 1), args.teacher_width // 2)
  loss_cfg = default.get_config().loss
  loss_cfg.weights.hidden_mse = 1.0
  objective = kd_objective.build(
    loss_cfg, 1000, registry.output_shapes(student), registry.output_shapes(teacher)
  )
  params = jax.device_get(
    {
      'student': registry.init_params(student, jax.random.PRNGKey(0)),
      'kd_heads': objective.init_heads(jax.random.PRNGKey(2)),
    }
  )
  teacher_params = jax.device_get(registry.init_params(teacher, jax.random.PRNGKey(1)))
  loss_fn = step_lib.distill_loss_fn(student, teacher, objective)
  tx = optax.adamw(1e-4)
  rng = np.random.default_rng(0)
  batches = [_batch(rng, args.batch, args.length) for _ in range(args.steps)]

  runs = {}
  for name in args.rows.split(','):
    dp = parallel.DataParallel(fsdp_min_size=2**14, **ROWS[name])
    dp.local_batch_size(args.batch)
    step = dp.train_step(loss_fn, tx)
    state = dp.put_state(step_lib.create_state(params, tx, jax.random.PRNGKey(3)))
    placed_teacher = dp.put_teacher(teacher_params)
    placed = [dp.put_batch(b) for b in batches]
    start = time.perf_counter()
    state, metrics = step(state, placed_teacher, placed[0])  # compile
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    runs[name] = {
      'dp': dp,
      'step': step,
      'state': state,
      'teacher': placed_teacher,
      'batches': placed,
      'times': [],
      'compile_s': compile_s,
    }

  for _ in range(args.rounds):
    for name, run in runs.items():
      state = run['state']
      start = time.perf_counter()
      for batch in run['batches']:
        state, metrics = run['step'](state, run['teacher'], batch)
      jax.block_until_ready((state, metrics))
      run['times'].append((time.perf_counter() - start) / len(run['batches']))
      run['state'] = state

  device = jax.devices()[0]
  print(
    f'devices: {jax.device_count()} x {device.device_kind} ({device.platform}); global batch '
    f'{args.batch} x {args.length} tokens; teacher {args.teacher_layers}x{args.teacher_width}, '
    f'student {max(args.teacher_layers // 4, 1)}x{args.teacher_width // 2}; median of '
    f'{args.rounds} rounds of {args.steps} steps'
  )
  base = statistics.median(runs['single']['times']) if 'single' in runs else None
  print(
    '| path | ms / step | overhead vs single | examples / s | compile s '
    '| state MB / device | teacher MB / device |'
  )
  print('|---|---|---|---|---|---|---|')
  table = {}
  for name, run in runs.items():
    ms = 1e3 * statistics.median(run['times'])
    overhead = f'{100 * (ms / (1e3 * base) - 1):+.1f} %' if base else '—'
    row = {
      'ms_per_step': ms,
      'examples_per_sec': args.batch / (ms / 1e3),
      'compile_s': run['compile_s'],
      'state_mb_per_device': _device_bytes(run['state']) / 2**20,
      'teacher_mb_per_device': _device_bytes(run['teacher']) / 2**20,
    }
    table[name] = row
    print(
      f'| {name} | {ms:.1f} | {overhead} | {row["examples_per_sec"]:.0f} | '
      f'{row["compile_s"]:.1f} | {row["state_mb_per_device"]:.1f} | '
      f'{row["teacher_mb_per_device"]:.1f} |'
    )
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({'args': vars(args), 'rows': table}, indent=2))
  return table


if __name__ == '__main__':
  main()
