"""Before/after figures of candidate speed-ups, each pair timed alternately in one process.

  python benchmarks/speedups.py [--steps=1] [--rounds=3] [--seq-lens=32,128]
      [--groups=threefry,attention,layout,prefetch,checkpoint,bf16] [--loop-steps=20]
      [--bf16-seq-lens=32]
      [--out=runs/bench_speedups.json]

Groups (batch 32; the models of benchmarks/distill_step.py):
  threefry    dropout's PRNG lowered as jax's CPU default (threefry's rounds in an XLA while
              loop) vs unrolled (kdjax.step.unroll_cpu_threefry, on by default since it gives
              the same bits); teacher fine-tuning and distillation at the longest --seq-lens.
              Every other group runs with kdjax.step's default (unrolled).
  attention   BERT attention_impl 'explicit' vs 'fused' (jax.nn.dot_product_attention) for
              teacher fine-tuning and the MiniLM teacher (live) -> 4.5 M transformer step.
              'fused' has no attention dropout, so the trained model's attention_dropout_rate
              is 0 there; the middle row (explicit, attention dropout 0) separates what the
              fusion buys from what dropping the dropout mask buys.
  layout      the attention block alone (scores, float32 softmax with a padding bias, context;
              MiniLM's 12 heads of 32): its einsums over [batch, position, head, dim] tensors
              as the BERT attention had them before, vs heads moved first ([batch, head,
              position, dim], kdjax.models.bert now); forward, and forward + backward.
  prefetch    `--loop-steps` distillation steps (L = 32) fed from a host iterator: each batch
              jax.device_put and waited for before its step, vs kdjax.data.prefetch
              .prefetch_to_device(size=2). Both wait for every step's result (as a loop
              reading metrics does). steps/s.
  checkpoint  the same loop with kdjax.checkpoint.StageCheckpointer.save every 10 steps (at
              steps 5, 15, ...): orbax's background save vs the same save followed by wait();
              the time includes waiting for the last save. steps/s.
  bf16        teacher fine-tuning with the model's dtype float32 vs bfloat16 (parameters and
              AdamW stay float32); at --bf16-seq-lens.
ms/step: median (p90) of `--rounds` rounds of `--steps` steps each. MFU as in distill_step.py:
analytic FLOPs / median step time / the float32 jnp.dot peak measured in this process (for bf16
the same float32 peak, so its MFU is comparable with the float32 row's).
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks import distill_step as ds  # noqa: E402
from kdjax import checkpoint  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from kdjax.data.prefetch import prefetch_to_device  # noqa: E402

GROUPS = ('threefry', 'attention', 'layout', 'prefetch', 'checkpoint', 'bf16')
BATCH = 32


class Step:
  """One compiled kdjax train step (AdamW) of `task` with the models changed by `changes`
  ({'student': kwargs, 'teacher': kwargs} for flax `clone`); params from the same keys as
  distill_step.py, so every variant starts from the same weights."""

  def __init__(self, task, seq_len, scale, changes=None, rolled_threefry=False):
    changes = changes or {}
    student, teacher, _ = ds.models_for(task, scale, seq_len)
    student = student.clone(**changes.get('student', {}))
    teacher = teacher.clone(**changes.get('teacher', {})) if teacher is not None else None
    params = ds._init(student, jax.random.PRNGKey(0), task)
    self.teacher_params = ds._init(teacher, jax.random.PRNGKey(1), task) if teacher else None
    self.flops = 3 * ds.forward_flops(student, params, BATCH, seq_len)
    if teacher is not None:
      self.flops += ds.forward_flops(teacher, self.teacher_params, BATCH, seq_len)
      loss_fn = step_lib.distill_loss_fn(student, teacher, ds._objective(task))
    else:
      loss_fn = step_lib.supervised_loss_fn(student)
    tx = optax.adamw(ds.LEARNING_RATE)
    self.state = step_lib.create_state(params, tx, jax.random.PRNGKey(2))
    self.task, self.seq_len, self.scale = task, seq_len, scale
    self.batch = jax.device_put(self.host_batch(0))
    step = step_lib.make_train_step(loss_fn, tx)
    # The PRNG lowering is chosen when the step is compiled; kdjax.step's default is unrolled.
    step_lib.unroll_cpu_threefry(not rolled_threefry)
    try:
      self.step = step.lower(self.state, self.teacher_params, self.batch).compile()
    finally:
      step_lib.unroll_cpu_threefry(True)
    self.run(self.batch)
    self.times = []

  def host_batch(self, seed: int) -> dict:
    return ds.make_batch(self.task, BATCH, self.seq_len, self.scale, False, seed=seed)

  def run(self, batch):
    self.state, metrics = self.step(self.state, self.teacher_params, batch)
    jax.block_until_ready((self.state, metrics))

  def time_steps(self, steps: int):
    _time_calls(lambda: self.run(self.batch), steps, self.times)


def _time_calls(call, steps: int, times: list) -> None:
  """Appends the wall time of each of `steps` calls of `call` (which waits for its result)."""
  for _ in range(steps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)


def _alternate(variants: dict, rounds: int, timed) -> None:
  """`timed(label, variant)` once per variant per round, variants in turn, so drifting load
  hits them alike."""
  for _ in range(rounds):
    for label, variant in variants.items():
      timed(label, variant)


def _step_rows(group, config, variants, peak, args):
  _alternate(variants, args.rounds, lambda _, v: v.time_steps(args.steps))
  rows, first = [], None
  for label, v in variants.items():
    median = statistics.median(v.times)
    first = first or median
    rows.append(
      {
        'group': group,
        'config': config,
        'variant': label,
        **common.summary_ms(v.times),
        'mfu': v.flops / median / peak,
        'analytic_flops': v.flops,
        'speedup': first / median,
        'samples': len(v.times),
      }
    )
  return rows


def attention_rows(args, peak):
  rows = []
  no_drop = {'attention_dropout_rate': 0.0}
  for task, name in (('finetune_teacher', 'teacher fine-tuning'), ('distill_bert', 'distill')):
    for seq_len in args.seq_lens:
      # The frozen teacher runs deterministic: fused needs no change to its dropout rate.
      teacher = lambda impl: (
        {'teacher': {'attention_impl': impl}} if task != 'finetune_teacher' else {}
      )
      variants = {
        'explicit': Step(task, seq_len, args.scale),
        'explicit, attn dropout 0': Step(task, seq_len, args.scale, {'student': no_drop}),
        'fused (attn dropout 0)': Step(
          task,
          seq_len,
          args.scale,
          {'student': {**no_drop, 'attention_impl': 'fused'}, **teacher('fused')},
        ),
      }
      rows += _step_rows('attention', f'{name} b={BATCH} L={seq_len}', variants, peak, args)
      print(f'done attention {name} L={seq_len}', flush=True)
  return rows


def _attention_block(layout: str):
  """q, k, v [b, l, h, d] and an additive bias [b, 1, 1, l] -> context [b, l, h, d]."""

  def block(q, k, v, bias):
    if layout == 'head-major':
      q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
      scores = jnp.einsum('bhqd,bhkd->bhqk', q, k)
    else:
      scores = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    probs = jax.nn.softmax(scores / q.shape[-1] ** 0.5 + bias, axis=-1)
    if layout == 'head-major':
      return jnp.einsum('bhqk,bhkd->bhqd', probs, v).transpose(0, 2, 1, 3)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v)

  return block


class Kernel:
  """A jitted function of fixed arguments, timed call by call like Step.time_steps; `output`
  is the result of the first (compiling) call."""

  def __init__(self, fn, args, flops):
    self.fn, self.args, self.flops, self.times = jax.jit(fn), args, flops, []
    self.output = jax.block_until_ready(self.fn(*args))

  def time_steps(self, steps: int):
    _time_calls(lambda: jax.block_until_ready(self.fn(*self.args)), steps, self.times)


def layout_rows(args, peak):
  heads, head_dim = (4, 8) if args.scale == 'tiny' else (12, 32)
  rows = []
  for seq_len in args.seq_lens:
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, grad = (jax.random.normal(key, (BATCH, seq_len, heads, head_dim)) for key in keys)
    # The last quarter of every row's positions is padding, as in a length-bucketed batch.
    valid = jnp.arange(seq_len) < seq_len - seq_len // 4
    bias = jnp.where(valid, 0.0, -1e9)[None, None, None, :].repeat(BATCH, 0)
    forward_flops = 4 * BATCH * seq_len**2 * heads * head_dim
    for direction, flops in (('forward', forward_flops), ('forward + backward', 3 * forward_flops)):
      variants = {}
      for layout in ('position-major', 'head-major'):
        block = _attention_block(layout)
        if direction == 'forward':
          variants[layout] = Kernel(block, (q, k, v, bias), flops)
        else:
          # The cotangent of the context, back to q, k and v.
          fwd_bwd = lambda q, k, v, b, g, block=block: jax.vjp(
            lambda q, k, v: block(q, k, v, b), q, k, v
          )[1](g)
          variants[layout] = Kernel(fwd_bwd, (q, k, v, bias, grad), flops)
      outputs = [jax.tree.leaves(kernel.output) for kernel in variants.values()]
      gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*outputs))
      if gap > 1e-4:  # timing two blocks that disagree would compare nothing
        raise SystemExit(f'speedups.py layout: the two layouts differ by {gap:.2e} (> 1e-4)')
      config = f'attention block {direction}, b={BATCH} L={seq_len} h={heads}'
      # A block takes milliseconds, not a step's seconds: ten calls per round.
      many = argparse.Namespace(**{**vars(args), 'steps': 10 * args.steps})
      rows += _step_rows('layout', config, variants, peak, many)
    print(f'done layout L={seq_len}', flush=True)
  return rows


def threefry_rows(args, peak):
  rows = []
  seq_len = max(args.seq_lens)
  for task, name in (('finetune_teacher', 'teacher fine-tuning'), ('distill_bert', 'distill')):
    variants = {
      'threefry rolled loop (jax CPU default)': Step(
        task, seq_len, args.scale, rolled_threefry=True
      ),
      'threefry unrolled (kdjax.step default)': Step(task, seq_len, args.scale),
    }
    rows += _step_rows('threefry', f'{name} b={BATCH} L={seq_len}', variants, peak, args)
    print(f'done threefry {name} L={seq_len}', flush=True)
  return rows


def bf16_rows(args, peak):
  rows = []
  for seq_len in args.bf16_seq_lens:
    variants = {
      'float32': Step('finetune_teacher', seq_len, args.scale),
      'bfloat16 compute': Step(
        'finetune_teacher', seq_len, args.scale, {'student': {'dtype': jnp.bfloat16}}
      ),
    }
    rows += _step_rows('bf16', f'teacher fine-tuning b={BATCH} L={seq_len}', variants, peak, args)
    print(f'done bf16 L={seq_len}', flush=True)
  return rows


def _loop_rows(group, config, timers, args):
  """timers: label -> fn() running one loop of args.loop_steps steps; rows of steps/s."""
  times = {label: [] for label in timers}
  _alternate(timers, args.rounds, lambda label, fn: _time_calls(fn, 1, times[label]))
  rows, first = [], None
  for label, seconds in times.items():
    median = statistics.median(seconds)
    first = first or median
    rows.append(
      {
        'group': group,
        'config': config,
        'variant': label,
        'steps_per_sec': args.loop_steps / median,
        'median_ms': 1e3 * median / args.loop_steps,
        'p90_ms': 1e3 * common.percentile(seconds, 90) / args.loop_steps,
        'speedup': first / median,
        'samples': len(seconds),
      }
    )
  return rows


def prefetch_rows(args):
  step = Step('distill_bert', 32, args.scale)
  batches = lambda: (step.host_batch(seed) for seed in range(args.loop_steps))

  def synchronous():
    for host in batches():
      batch = jax.block_until_ready(jax.device_put(host))
      step.run(batch)

  def prefetched():
    for batch in prefetch_to_device(batches(), size=2):
      step.run(batch)

  timers = {'device_put before each step': synchronous, 'prefetch_to_device(size=2)': prefetched}
  config = f'distill b={BATCH} L=32, {args.loop_steps} steps'
  rows = _loop_rows('prefetch', config, timers, args)
  print('done prefetch', flush=True)
  return rows


def checkpoint_rows(args):
  step = Step('distill_bert', 32, args.scale)
  root = tempfile.mkdtemp(prefix='kdjax_speedups_')
  ckpts = {b: checkpoint.StageCheckpointer(os.path.join(root, b), keep=2) for b in ('bg', 'bl')}
  counters = {'bg': 0, 'bl': 0}  # step numbers keep growing across rounds, as in a run

  def loop(kind, blocking):
    ckpt = ckpts[kind]
    for i in range(args.loop_steps):
      step.run(step.batch)
      counters[kind] += 1
      if i % 10 == 4:
        ckpt.save(counters[kind], step.state, {'position': counters[kind]})
        if blocking:
          ckpt.wait()
    ckpt.wait()  # the last save counts too: a run ends only once it is on disk

  timers = {
    'save then wait() (blocking)': lambda: loop('bl', True),
    'background save (StageCheckpointer)': lambda: loop('bg', False),
  }
  config = f'distill b={BATCH} L=32, {args.loop_steps} steps, save every 10'
  try:
    rows = _loop_rows('checkpoint', config, timers, args)
  finally:
    for ckpt in ckpts.values():
      ckpt.close()
  print('done checkpoint', flush=True)
  return rows


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1, help='timed steps per round (step groups)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seq-lens', default='32,128', help='attention and layout groups')
  parser.add_argument('--bf16-seq-lens', default='32', help='bf16 group')
  parser.add_argument('--loop-steps', type=int, default=20, help='prefetch/checkpoint loops')
  parser.add_argument('--groups', default=','.join(GROUPS))
  parser.add_argument('--scale', default='full', choices=('full', 'tiny'), help='tiny: tests')
  parser.add_argument('--out', default='runs/bench_speedups.json')
  args = parser.parse_args(argv)
  args.groups = args.groups.split(',')
  unknown = sorted(set(args.groups) - set(GROUPS))
  if unknown:
    raise SystemExit(f'speedups.py: unknown group(s) {unknown}; valid: {GROUPS}')
  args.seq_lens = [int(s) for s in args.seq_lens.split(',')]
  args.bf16_seq_lens = [int(s) for s in args.bf16_seq_lens.split(',')]
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = {'args': vars(args), 'environment': common.environment()}
  result['jax_matmul_peak_flops'] = peak = common.jax_matmul_peak()
  rows = []
  if 'threefry' in args.groups:
    rows += threefry_rows(args, peak)
  if 'attention' in args.groups:
    rows += attention_rows(args, peak)
  if 'layout' in args.groups:
    rows += layout_rows(args, peak)
  if 'prefetch' in args.groups:
    rows += prefetch_rows(args)
  if 'checkpoint' in args.groups:
    rows += checkpoint_rows(args)
  if 'bf16' in args.groups:
    rows += bf16_rows(args, peak)
  return common.finish(result, rows, _print_table, args.out)


def _print_table(result):
  env = result['environment']
  print(
    f'{env["device_kind"]} ({env["platform"]}), {env["cpu_count"]} CPUs, jax {env["jax"]}; '
    f'matmul peak {result["jax_matmul_peak_flops"] / 1e9:.0f} GFLOP/s; load '
    f'{env["loadavg_start"][0]:.1f} -> {result["loadavg_end"][0]:.1f}'
  )
  print('| group | config | variant | ms/step (median, p90) | MFU or steps/s | vs first row |')
  print('|---|---|---|---|---:|---:|')
  for r in result['rows']:
    figure = f'{100 * r["mfu"]:.1f} %' if 'mfu' in r else f'{r["steps_per_sec"]:.2f} steps/s'
    print(
      f'| {r["group"]} | {r["config"]} | {r["variant"]} | {r["median_ms"]:.1f}, '
      f'{r["p90_ms"]:.1f} | {figure} | {r["speedup"]:.2f}x |'
    )


if __name__ == '__main__':
  main()
