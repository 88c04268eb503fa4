"""Post-training quantization of a run's exported model, measured.

  python -m kdjax.ptq --workdir=RUN [--model=distill/export/student] --bits=8 \\
      [--asymmetric] [--per_tensor] [--rules='kernel$,embedding$'] [--sparse_rules=...] \\
      --output=DIR

Quantizes the weights the rules select (compress/quantize.py), writes the compact artifact
(compress/artifact.py: the bytes on disk are the real size), and evaluates on the run's eval
split, side by side: the float32 export, and the quantized weights dequantized inside the
jitted forward pass (what a memory-bound deployment runs). Latency is timed at batch 1 and 32
for both. Writes DIR/report.json and prints a table.
"""

import json
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
from absl import app, flags

from kdjax import checkpoint, evaluate, train
from kdjax import step as step_lib
from kdjax.compress import artifact, quantize, rules
from kdjax.data import pipeline, text
from kdjax.data.errors import DataError
from kdjax.predict import load_model, model_dir


def eval_data(workdir: pathlib.Path, tokenizer):
  """The run's eval split, encoded with the export's tokenizer, and the padding buckets."""
  config = json.loads((workdir / 'config.json').read_text())
  d = config['data']
  sentences, labels = pipeline.load_split(
    d['name'], d['eval_split'], d['tfds_data_dir'] or train.default_tfds_dir(), d['raw_dir']
  )
  return pipeline.encode(sentences, tokenizer, d['max_len']), labels, tuple(d['buckets'])


def replace_artifact(directory: pathlib.Path, params, spec: dict, sparse_rules=()) -> None:
  """Writes the compact artifact at `directory` (pruned weights, `sparse_rules`, as a bit mask
  plus the kept values where smaller). A re-run replaces its own earlier artifact whole, so
  no stale file is counted in its size."""
  if directory.is_dir():
    shutil.rmtree(directory)
  artifact.save(directory, params, spec, sparse_rules=tuple(sparse_rules))


def dequantizing(logits_fn):
  """`logits_fn` on quantized weights: they stay quantized in memory and are dequantized
  inside the compiled forward pass (what a memory-bound deployment runs)."""
  return jax.jit(lambda qparams, batch: logits_fn(quantize.dequantize_params(qparams), batch))


def latency_ms(logits_fn, params, ids, labels, buckets, batch_size: int, repeats: int) -> float:
  """Median wall time of one forward pass on a fixed batch, after compilation."""
  batch = next(
    iter(pipeline.ordered_pass(ids[:batch_size], labels[:batch_size], batch_size, buckets))
  )
  jax.block_until_ready(logits_fn(params, batch))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(logits_fn(params, batch))
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def run(
  workdir,
  output,
  model_path='',
  bits=8,
  symmetric=True,
  per_channel=True,
  rule_list=quantize.DEFAULT_RULES,
  repeats=20,
  sparse_rules=(),
) -> dict:
  workdir, output = pathlib.Path(workdir), pathlib.Path(output)
  model, params, tokenizer = load_model(workdir, model_path)
  # Exports restore as host arrays; timing them would time a 16 MB copy per call.
  params = jax.device_put(params)
  export_dir = model_dir(workdir, model_path)
  spec = checkpoint.read_export_spec(export_dir)
  qparams = jax.device_put(
    quantize.quantize_params(params, bits, symmetric, per_channel, tuple(rule_list))
  )
  replace_artifact(output / 'artifact', qparams, spec, sparse_rules)
  # The model's size: weights and manifest, compared with float32 weights. The tokenizer,
  # saved beside them so kdjax.predict --model=<artifact> runs it, is the same file for
  # either and is reported on its own.
  artifact_bytes = artifact.size_bytes(output / 'artifact')
  text.save_tokenizer(tokenizer, output / 'artifact')
  tokenizer_bytes = artifact.size_bytes(output / 'artifact') - artifact_bytes
  ids, labels, buckets = eval_data(workdir, tokenizer)

  float_fn = step_lib.make_logits_fn(model)
  quant_fn = dequantizing(float_fn)
  figures = {}
  for name, fn, p in (('float32', float_fn, params), (f'int{bits}', quant_fn, qparams)):
    logits = evaluate.predict_logits(fn, p, pipeline.ordered_pass(ids, labels, 64, buckets))
    figures[name] = {
      'eval_accuracy': evaluate.accuracy(logits, labels),
      'latency_ms_batch1': latency_ms(fn, p, ids, labels, buckets, 1, repeats),
      'latency_ms_batch32': latency_ms(fn, p, ids, labels, buckets, 32, repeats),
    }
    figures[name]['logits'] = logits
  agreement = evaluate.agreement(
    figures['float32'].pop('logits'), figures[f'int{bits}'].pop('logits')
  )
  report = {
    'export': str(export_dir),
    'bits': bits,
    'symmetric': symmetric,
    'per_channel': per_channel,
    'rules': list(rule_list),
    'sparse_rules': list(sparse_rules),
    'quantized_params': rules.selected_paths(params, tuple(rule_list)),
    'float32_bytes': artifact.dense_float32_bytes(params),
    'artifact_bytes': artifact_bytes,
    'tokenizer_bytes': tokenizer_bytes,
    'models': figures,
    'agreement': agreement,
  }
  report['compression'] = report['float32_bytes'] / report['artifact_bytes']
  report['accuracy_drop'] = (
    figures['float32']['eval_accuracy'] - figures[f'int{bits}']['eval_accuracy']
  )
  output.mkdir(parents=True, exist_ok=True)
  (output / 'report.json').write_text(json.dumps(report, indent=2, sort_keys=True) + '\n')
  return report


def format_report(r: dict) -> str:
  lines = [
    '| weights | bytes | dev acc % | latency batch 1 (ms) | batch 32 (ms) |',
    '|---|---:|---:|---:|---:|',
  ]
  for name, m in r['models'].items():
    size = r['float32_bytes'] if name == 'float32' else r['artifact_bytes']
    lines.append(
      f'| {name} | {size:,} | {100 * m["eval_accuracy"]:.2f} | '
      f'{m["latency_ms_batch1"]:.2f} | {m["latency_ms_batch32"]:.2f} |'
    )
  lines.append(
    f'compression {r["compression"]:.2f}x, accuracy drop {100 * r["accuracy_drop"]:.2f} points, '
    f'top-1 agreement {100 * r["agreement"]:.2f} %'
  )
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    report = run(
      f.workdir,
      f.output,
      f.model,
      int(f.bits),
      not f.asymmetric,
      not f.per_tensor,
      f.rules,
      f.timing_repeats,
      f.sparse_rules,
    )
  except (DataError, checkpoint.CheckpointError, rules.RuleError, artifact.ArtifactError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_report(report))


def define_flags() -> None:
  """Defined when run as a program, not at import (kdjax.predict defines --workdir too)."""
  flags.DEFINE_string('workdir', None, 'Finished run directory.')
  flags.DEFINE_string('model', '', 'Export inside the workdir; default: final_student.')
  flags.DEFINE_string('output', None, 'Folder for the artifact and report.json.')
  flags.DEFINE_enum('bits', '8', ['8', '4'], 'Bits per quantized weight.')
  flags.DEFINE_bool('asymmetric', False, 'Affine (min/max) instead of symmetric.')
  flags.DEFINE_bool('per_tensor', False, 'One scale per tensor, not per channel.')
  flags.DEFINE_list('rules', list(quantize.DEFAULT_RULES), 'Regexes of weights to quantize.')
  flags.DEFINE_integer('timing_repeats', 20, 'Timed forward passes per figure.')
  flags.DEFINE_list('sparse_rules', [], 'Regexes of pruned weights to store sparsely.')
  flags.mark_flags_as_required(['workdir', 'output'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
