"""Inference latency of the teacher, the students and their compressed variants.

  python benchmarks/latency.py [--batch-sizes=1,32] [--seq-len=64] [--repeats=200]
      [--models=teacher,bilstm,cnn,bert] [--variants=float32,int8,sparse50,sparse90,structured]
      [--runs=DIR[:MODEL] ...] [--out=runs/bench_latency.json]

Every row is one jitted forward pass (logits only, deterministic) on a fixed batch of
`--seq-len` real tokens already on the device, timed call by call with block_until_ready.
Models are the MiniLM-sized teacher and the BiLSTM, CNN and transformer (`bert`) students of
experiments/sst2_minilm_students.py, each as:
  float32     the model as trained;
  int8        kdjax.ptq's quantized inference path: the weights it quantizes by default (int8
              values + float32 per-channel scales) stay int8 in device memory and are
              dequantized to float32 inside the compiled forward, whose matmuls are float32
              (kdjax has no int8 matmul kernel);
  sparse50/90 unstructured magnitude pruning (compress/pruning.py, config.prune's rules):
              zeros in dense arrays of the same shapes, so the same work as float32;
  structured  units physically removed (compress/structured.py): half the BiLSTM units, half
              the CNN filters, half the transformer's FFN neurons or attention heads.
The teacher gets float32 and int8 only. Weights are random (latency does not depend on their
values) unless `--runs` names trained run directories, which then replace the built-in models:
DIR uses the run's final student (the teacher export for a teacher run), DIR:MODEL an export
inside it (e.g. runs/bert_student:distill/export/student).

All (model, batch size) rows are compiled first (compile s: trace, lower and XLA compile of
that row's forward), then timed in turns: each round gives every row `--block` consecutive
calls, so background load hits all of them alike, until each has `--repeats` timings. The
table gives p50 / p90 ms, examples/s at the p50, parameters, float32 bytes and bytes as stored
(int8 rows: quantization_report, with int4 alongside in the JSON; sparse rows: the compact
artifact with mask + nonzeros, artifact.size_bytes). int8 rows also record in the JSON the
largest logit difference from the float32 model on the same batch.
"""

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

import flax
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import default  # noqa: E402
from experiments import sst2_minilm_students, sst2_minilm_teacher  # noqa: E402
from kdjax import checkpoint, train  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from kdjax.compress import artifact, pruning, quantize, structured  # noqa: E402
from kdjax.models import registry  # noqa: E402
from kdjax.predict import load_model  # noqa: E402

VOCAB = 30522  # the teacher's WordPiece vocabulary, shared by every student
MODELS = ('teacher', 'bilstm', 'cnn', 'bert')
VARIANTS = ('float32', 'int8', 'sparse50', 'sparse90', 'structured')
STRUCTURED = {  # model name -> (part, label) per structured variant
  'bilstm': (('', 'half units'),),
  'cnn': (('', 'half filters'),),
  'bert': (('', 'half FFN'), ('heads', 'half heads')),
}
QUANTIZED_PATH = (
  'kdjax.ptq: weights selected by config.quant.rules stored as int8 QTensors (symmetric, '
  'per-channel float32 scales) in device memory, dequantized to float32 inside the jitted '
  'forward, float32 matmuls (no int8 matmul path exists in kdjax)'
)


def _spec(preset) -> dict:
  return {
    'model': preset.model,
    'vocab_size': VOCAB,
    'num_classes': 2,
    'kwargs': preset.kwargs.to_dict(),
  }


def builtin_bases(names):
  """(name, spec, params, source) per model: the experiment presets, random weights."""
  bases = []
  for i, name in enumerate(names):
    if name == 'teacher':
      preset = sst2_minilm_teacher.minilm_teacher(init_from='')
    else:
      preset = sst2_minilm_students.get_config(f'student={name}').student
    spec = _spec(preset)
    params = registry.init_params(train.build(spec), jax.random.PRNGKey(i))
    bases.append((name, spec, jax.device_get(params), 'random init'))
  return bases


def run_bases(runs):
  """(name, spec, params, source) per `DIR[:MODEL]`, loaded as kdjax.predict loads a run."""
  bases = []
  for arg in runs:
    workdir, _, model_path = arg.partition(':')
    workdir = pathlib.Path(workdir)
    # Several exports of one run (e.g. a chain's distill and recover stages) by their stage.
    name = f'{workdir.name}:{model_path.split("/")[0]}' if model_path else workdir.name
    if not model_path:
      final = json.loads((workdir / 'results.json').read_text()).get('final_student')
      # A teacher-only run has no final student; its model is the teacher export.
      model_path = final or 'teacher/export/teacher'
    _, params, _ = load_model(workdir, model_path)
    export = workdir / model_path
    # A chain's final student is its quantize stage's artifact (the spec inside it; the
    # params above are its dequantized weights, which the int8 variant quantizes again).
    is_artifact = (export / artifact.MANIFEST).is_file()
    spec = artifact.load(export)[1] if is_artifact else checkpoint.read_export_spec(export)
    bases.append((name, spec, jax.device_get(params), str(workdir / model_path)))
  return bases


def _dir_bytes(params, spec, sparse_rules) -> int:
  with tempfile.TemporaryDirectory() as tmp:
    artifact.save(tmp, params, spec, sparse_rules=sparse_rules)
    return artifact.size_bytes(tmp)


def variants(name, spec, params, wanted):
  """Rows of one base model: dicts with the jitted forward, its params and their sizes."""
  model = train.build(spec)
  float_fn = step_lib.make_logits_fn(model)
  float_bytes = registry.param_bytes(params)
  cfg = default.get_config()
  rows = []

  def row(variant, label, fn, p, stored, **extra):
    rows.append(
      dict(
        name=f'{name} {label}'.strip(),
        base=name,
        variant=variant,
        vocab_size=spec['vocab_size'],
        fn=fn,
        params=jax.device_put(p),
        num_params=artifact.dense_float32_bytes(p) // 4,  # a QTensor counts its values
        float32_bytes=artifact.dense_float32_bytes(p),
        stored_bytes=stored,
        **extra,
      )
    )

  if 'float32' in wanted:
    row('float32', '', float_fn, params, float_bytes, storage='float32')
  if 'int8' in wanted:
    rule_list = tuple(cfg.quant.rules)
    # Jitted only to build the weights in one compiled program instead of op by op.
    qparams = jax.jit(lambda p: quantize.quantize_params(p, 8, rules=rule_list))(params)
    int4 = jax.jit(lambda p: quantize.quantize_params(p, 4, rules=rule_list))(params)
    int4 = quantize.quantization_report(int4)
    # Exactly kdjax.ptq's forward: QTensors in, dequantized inside the compiled function.
    quant_fn = jax.jit(lambda q, batch: float_fn(quantize.dequantize_params(q), batch))
    row(
      'int8',
      'int8',
      quant_fn,
      qparams,
      quantize.quantization_report(qparams)['bytes'],
      storage='int8 (quantization_report)',
      int4_bytes=int4['bytes'],
      reference=(float_fn, jax.device_put(params)),
    )
  if name != 'teacher':
    for sparsity in (0.5, 0.9):
      if f'sparse{round(100 * sparsity)}' not in wanted:
        continue
      rules, exclude = tuple(cfg.prune.rules), tuple(cfg.prune.exclude)
      prune = jax.jit(
        lambda p, s: pruning.apply_masks(p, pruning.magnitude_masks(p, s, rules, exclude=exclude))
      )
      pruned = jax.device_get(prune(params, sparsity))
      row(
        f'sparse{round(100 * sparsity)}',
        f'{round(100 * sparsity)}% unstructured',
        # A jit of its own, so its compile time is measured rather than a cache hit.
        step_lib.make_logits_fn(model),
        pruned,
        _dir_bytes(pruned, spec, rules),
        storage='float32, mask + nonzeros (artifact)',
      )
    if 'structured' in wanted:
      for part, label in STRUCTURED.get(spec['model'], ()):
        small, small_spec, _ = structured.prune(params, spec, 0.5, part)
        row(
          'structured',
          label,
          step_lib.make_logits_fn(train.build(small_spec)),
          small,
          registry.param_bytes(small),
          storage='float32',
          kwargs_after=small_spec['kwargs'],
        )
  return rows


def _batch(rng, batch_size, seq_len, vocab_size):
  # Every position a real token: the worst case of padded buckets of this length.
  ids = rng.integers(min(1000, vocab_size // 2), vocab_size, (batch_size, seq_len))
  ids = ids.astype(np.int32)
  return jax.device_put({'input_ids': ids, 'attention_mask': np.ones_like(ids)})


def _versions() -> dict:
  import jaxlib
  import optax

  return {
    'python': platform.python_version(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'flax': flax.__version__,
    'optax': optax.__version__,
    'numpy': np.__version__,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch-sizes', default='1,32')
  parser.add_argument('--seq-len', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=200, help='timed calls per row')
  parser.add_argument('--block', type=int, default=10, help='consecutive calls per turn')
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--runs', nargs='*', default=[], help='DIR or DIR:MODEL (replace --models)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='runs/bench_latency.json')
  args = parser.parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  wanted = args.variants.split(',')
  for v in wanted:
    if v not in VARIANTS:
      parser.error(f'--variants: {v!r} is not one of {VARIANTS}')
  names = args.models.split(',')
  for n in names:
    if n not in MODELS:
      parser.error(f'--models: {n!r} is not one of {MODELS}')

  bases = run_bases(args.runs) if args.runs else builtin_bases(names)
  models = []
  for name, spec, params, source in bases:
    for r in variants(name, spec, params, wanted):
      models.append(dict(r, source=source))

  # Compile every (model, batch size) ahead of time: the timed calls run that executable.
  rng = np.random.default_rng(args.seed)
  items = []
  for m in models:
    for b in batch_sizes:
      batch = _batch(rng, b, args.seq_len, m['vocab_size'])
      start = time.perf_counter()
      compiled = m['fn'].lower(m['params'], batch).compile()
      compile_s = time.perf_counter() - start
      logits = jax.block_until_ready(compiled(m['params'], batch))  # warm-up
      item = dict(model=m, batch_size=b, batch=batch, compiled=compiled, compile_s=compile_s)
      if 'reference' in m:
        ref_fn, ref_params = m['reference']
        reference = np.asarray(ref_fn(ref_params, batch))
        item['max_abs_diff_vs_float32'] = float(np.max(np.abs(np.asarray(logits) - reference)))
        item['max_abs_float32_logit'] = float(np.max(np.abs(reference)))
      item['times'] = []
      items.append(item)

  for _ in range(math.ceil(args.repeats / args.block)):
    for item in items:
      compiled, params, batch = item['compiled'], item['model']['params'], item['batch']
      for _ in range(min(args.block, args.repeats - len(item['times']))):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        item['times'].append(time.perf_counter() - start)

  device = jax.devices()[0]
  print(
    f'{device.platform} ({device.device_kind}), {os.cpu_count()} CPUs; {args.seq_len} tokens '
    f'per example; {args.repeats} calls per row in turns of {args.block}'
  )
  print(
    '| model | batch | p50 ms | p90 ms | examples / s | compile s | params | float32 MB '
    '| stored MB |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  rows = []
  for item in items:
    m = item['model']
    p50, p90 = (1e3 * float(x) for x in np.percentile(item['times'], [50, 90]))
    row = {
      'name': m['name'],
      'base': m['base'],
      'variant': m['variant'],
      'source': m['source'],
      'batch_size': item['batch_size'],
      'p50_ms': p50,
      'p90_ms': p90,
      'examples_per_sec': item['batch_size'] / (p50 / 1e3),
      'compile_s': item['compile_s'],
      'num_params': m['num_params'],
      'float32_bytes': m['float32_bytes'],
      'stored_bytes': m['stored_bytes'],
      'storage': m['storage'],
    }
    for key in ('int4_bytes', 'kwargs_after'):
      if key in m:
        row[key] = m[key]
    for key in ('max_abs_diff_vs_float32', 'max_abs_float32_logit'):
      if key in item:
        row[key] = item[key]
    rows.append(row)
    print(
      f'| {row["name"]} | {row["batch_size"]} | {p50:.2f} | {p90:.2f} | '
      f'{row["examples_per_sec"]:.0f} | {row["compile_s"]:.2f} | {row["num_params"]:,} | '
      f'{row["float32_bytes"] / 1e6:.1f} | {row["stored_bytes"] / 1e6:.1f} |'
    )
  result = {
    'args': vars(args),
    'versions': _versions(),
    'cpu_count': os.cpu_count(),
    'device': {
      'platform': device.platform,
      'kind': device.device_kind,
      'count': jax.device_count(),
    },
    'quantized_path': QUANTIZED_PATH,
    'rows': rows,
  }
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
  return result


if __name__ == '__main__':
  main()
