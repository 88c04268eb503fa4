"""Structured pruning of a run's exported model into a smaller export, measured.

  python -m kdjax.structured_prune --workdir=RUN [--model=distill/export/student] \\
      --keep=0.5 [--part=heads] --output=DIR

Removes units (compress/structured.py: BiLSTM hidden units, CNN filters, BERT FFN neurons, or
with --part=heads a BERT's attention heads),
writes DIR as a regular export (model.json with the smaller size, params, tokenizer), and
prints parameters, bytes and dev accuracy before and after, with the batch-32 latency of
each. Recover the accuracy by distilling the pruned model from the teacher: point
`config.student.init_from` at DIR and give `config.student.kwargs` DIR's model.json sizes.
Writes DIR/structured_prune.json.
"""

import json
import pathlib
import sys

import jax
from absl import app, flags

from kdjax import checkpoint, evaluate, ptq, train
from kdjax import step as step_lib
from kdjax.compress import structured
from kdjax.data import pipeline, text
from kdjax.data.errors import DataError
from kdjax.predict import load_model, model_dir


def run(workdir, output, model_path='', keep_fraction=0.5, repeats=20, part='') -> dict:
  workdir, output = pathlib.Path(workdir), pathlib.Path(output)
  model, params, tokenizer = load_model(workdir, model_path)
  spec = checkpoint.read_export_spec(model_dir(workdir, model_path))
  pruned, new_spec, kept = structured.prune(jax.device_get(params), spec, keep_fraction, part)
  checkpoint.export_model(output, pruned, new_spec)
  text.save_tokenizer(tokenizer, output)
  ids, labels, buckets = ptq.eval_data(workdir, tokenizer)
  figures = {}
  for name, (m, p) in {'full': (model, params), 'pruned': (train.build(new_spec), pruned)}.items():
    fn = step_lib.make_logits_fn(m)
    p = jax.device_put(p)
    logits = evaluate.predict_logits(fn, p, pipeline.ordered_pass(ids, labels, 64, buckets))
    figures[name] = {
      'eval_accuracy': evaluate.accuracy(logits, labels),
      'latency_ms_batch32': ptq.latency_ms(fn, p, ids, labels, buckets, 32, repeats),
      **evaluate.model_stats(jax.device_get(p)),
    }
  report = {
    'source': str(model_dir(workdir, model_path)),
    'output': str(output),
    'keep_fraction': keep_fraction,
    'part': part or 'default',
    'kwargs_before': spec['kwargs'],
    'kwargs_after': new_spec['kwargs'],
    'kept_units': {k: [int(i) for i in v] for k, v in kept.items()},
    'models': figures,
  }
  (output / 'structured_prune.json').write_text(json.dumps(report, indent=2, sort_keys=True))
  return report


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    r = run(f.workdir, f.output, f.model, f.keep, f.timing_repeats, f.part)
  except (DataError, checkpoint.CheckpointError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for name, m in r['models'].items():
    print(
      f'{name}: {m["params"]:,} params, {m["bytes"]:,} bytes, dev acc '
      f'{100 * m["eval_accuracy"]:.2f} %, batch-32 latency {m["latency_ms_batch32"]:.2f} ms'
    )
  print(f'sizes: {r["kwargs_before"]} -> {r["kwargs_after"]}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Finished run directory.')
  flags.DEFINE_string('model', '', 'Export inside the workdir; default: final_student.')
  flags.DEFINE_string('output', None, 'Folder for the pruned export.')
  flags.DEFINE_float('keep', 0.5, 'Fraction of units kept in each pruned layer, in (0, 1].')
  flags.DEFINE_integer('timing_repeats', 20, 'Timed forward passes per figure.')
  flags.DEFINE_enum('part', '', ['', 'heads'], "What to prune: '' the model's default, heads")
  flags.mark_flags_as_required(['workdir', 'output'])
  app.run(main)
