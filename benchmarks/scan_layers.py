"""Layers unrolled vs one lax.scan (BERT scan_layers): compile time, program size, memory and
step time as the teacher gets deeper, both sides built and timed in the same process.

  python benchmarks/scan_layers.py [--depths=6,12,24] [--seq-len=64] [--rounds=5]
      [--scale=full|tiny] [--out=runs/bench_scan_layers.json]

Models: the MiniLM teacher's width (hidden 384, 12 heads, FFN 1536, WordPiece vocabulary) at
each depth in --depths, batch 32. Programs:
  fine-tune   one kdjax train step (AdamW, dropout on, donated state): the teacher fine-tuning
              step of benchmarks/distill_step.py.
  forward     inference logits (deterministic): what a frozen teacher costs inside a
              distillation step.
Columns: trace+lower and XLA compile seconds (one fresh compile each, the jit caches cleared
between variants), StableHLO text size, peak bytes from XLA's memory analysis, and ms/step
(median and p90 over --rounds rounds of 3 steps, the variants alternating round by round).
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks import distill_step as ds  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from kdjax.models import registry  # noqa: E402

BATCH = 32
STEPS_PER_ROUND = 3


class Program:
  """One compiled program (fine-tune step or forward) of a BERT with `num_layers` layers."""

  def __init__(self, kind: str, num_layers: int, scan: bool, seq_len: int, scale: str):
    name, kwargs = ds._text_specs(scale)['teacher']
    kwargs.update(num_layers=num_layers, scan_layers=scan, max_len=max(kwargs['max_len'], seq_len))
    model = registry.build_model(name, vocab_size=ds._vocab(scale), num_classes=2, **kwargs)
    params = registry.init_params(model, jax.random.PRNGKey(0))
    self.batch = jax.device_put(ds.make_batch('finetune_teacher', BATCH, seq_len, scale, False))
    jax.clear_caches()  # every variant pays its own trace, lowering and compile
    start = time.perf_counter()
    if kind == 'fine-tune':
      tx = optax.adamw(ds.LEARNING_RATE)
      self.state = step_lib.create_state(params, tx, jax.random.PRNGKey(2))
      fn = step_lib.make_train_step(step_lib.supervised_loss_fn(model), tx)
      lowered = fn.lower(self.state, None, self.batch)
    else:
      self.params = params
      fn = step_lib.make_logits_fn(model)
      lowered = fn.lower(params, self.batch)
    self.lower_s = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.hlo_chars = len(lowered.as_text())
    self.costs = common.compiled_costs(self.compiled)
    self.kind, self.times = kind, []
    self.run()  # first call: allocation, not timed

  def run(self):
    if self.kind == 'fine-tune':
      self.state, metrics = self.compiled(self.state, None, self.batch)
      jax.block_until_ready((self.state, metrics))
    else:
      jax.block_until_ready(self.compiled(self.params, self.batch))

  def time_round(self):
    for _ in range(STEPS_PER_ROUND):
      start = time.perf_counter()
      self.run()
      self.times.append(time.perf_counter() - start)


def rows_for(kind: str, depth: int, args) -> list[dict]:
  variants = {
    'unrolled': Program(kind, depth, False, args.seq_len, args.scale),
    'scan': Program(kind, depth, True, args.seq_len, args.scale),
  }
  for _ in range(args.rounds):
    for program in variants.values():
      program.time_round()
  base = variants['unrolled']
  rows = []
  for label, p in variants.items():
    rows.append(
      {
        'program': kind,
        'layers': depth,
        'variant': label,
        'lower_s': p.lower_s,
        'compile_s': p.compile_s,
        'compile_speedup': (base.lower_s + base.compile_s) / (p.lower_s + p.compile_s),
        'hlo_chars': p.hlo_chars,
        'peak_bytes': p.costs['peak_bytes'],
        **common.summary_ms(p.times),
        'step_time_ratio': statistics.median(p.times) / statistics.median(base.times),
        'samples': len(p.times),
      }
    )
  print(f'done {kind} layers={depth}', flush=True)
  return rows


def print_table(result):
  header = (
    f'{"program":10} {"layers":>6} {"variant":9} {"lower s":>8} {"compile s":>9} '
    f'{"× faster":>8} {"HLO kchars":>10} {"peak MB":>8} {"ms/step":>8} {"p90":>8} {"× time":>7}'
  )
  print(header)
  for r in result['rows']:
    print(
      f'{r["program"]:10} {r["layers"]:>6} {r["variant"]:9} {r["lower_s"]:>8.2f} '
      f'{r["compile_s"]:>9.2f} {r["compile_speedup"]:>8.2f} {r["hlo_chars"] / 1e3:>10.0f} '
      f'{r["peak_bytes"] / 2**20:>8.0f} {r["median_ms"]:>8.1f} {r["p90_ms"]:>8.1f} '
      f'{r["step_time_ratio"]:>7.2f}'
    )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--depths', default='6,12,24')
  parser.add_argument('--seq-len', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--programs', default='fine-tune,forward')
  parser.add_argument('--scale', choices=('full', 'tiny'), default='full')
  parser.add_argument('--out', default='runs/bench_scan_layers.json')
  args = parser.parse_args(argv)
  depths = [int(d) for d in args.depths.split(',')]
  result = {'args': vars(args), 'environment': common.environment(), 'batch': BATCH}
  rows = []
  for kind in args.programs.split(','):
    for depth in depths:
      rows += rows_for(kind, depth, args)
  return common.finish(result, rows, print_table, args.out)


if __name__ == '__main__':
  main()
