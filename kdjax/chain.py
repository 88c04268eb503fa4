"""Compression chained with distillation in one run: the 'compress', 'recover' and
'quantize' stages of config.stages, e.g.

  ('teacher', 'distill', 'compress', 'recover', 'quantize')

  compress  transforms the student exported by the stage before it, without training:
            config.compress.method 'units' (BiLSTM hidden units, CNN filters, BERT FFN
            neurons), 'heads' (BERT attention heads) or 'lowrank' (SVD of Dense kernels into
            two smaller layers). The export is physically smaller: its model.json carries
            the new sizes.
  recover   distills that export from the teacher again (train.py runs it as a distilling
            stage whose model comes from the export, not from config.student), for
            train.recover_steps under recover_optim. With 'recover' in config.prune.stages
            it also prunes gradually; in config.quant.stages it trains quantization-aware.
  quantize  post-training quantization (config.quant.ptq_bits, with quant's symmetric,
            per-channel and rules settings) of the stage before's student into the compact
            artifact (compress/artifact.py) that kdjax.predict runs. Weights an earlier
            stage pruned are stored as a bit mask plus their nonzero values.

Every chain stage measures its model the same way (`measure`): parameters, zeros, bytes on
disk of its artifact (a float one for unquantized stages, so every row counts the same
format), bits per parameter, dev accuracy, and CPU latency at batch 1 and 32. The rows land
in each stage's result.json under 'compression' and in one table of report.md
(report.compression_table).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Callable

import jax
import numpy as np

from kdjax import checkpoint, evaluate, parallel, ptq, strategies, train
from kdjax import config as config_lib
from kdjax import step as step_lib
from kdjax.compress import artifact, lowrank, quantize, structured
from kdjax.compress import rules as rules_lib
from kdjax.data import text

ARTIFACT = 'artifact'


def source_stage(config, name: str) -> str:
  """The stage whose exported student `name` takes over: the nearest one before it that
  exports a student (config.validate made sure there is one)."""
  names = strategies.stage_names(config)
  for earlier in reversed(names[: names.index(name)]):
    if strategies.base_stage(earlier) in config_lib.STUDENT_EXPORTS:
      return earlier
  raise config_lib.ConfigError(f"stage '{name}' has no student stage before it in {names}")


def source_export(config, workdir: pathlib.Path, name: str) -> pathlib.Path:
  return workdir / source_stage(config, name) / 'export' / 'student'


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """The dev split every chain row is measured on."""

  ids: list
  labels: np.ndarray
  buckets: tuple
  batches: Callable  # a zero-argument factory of one ordered pass


def pruned_through(config, stage: str) -> bool:
  """Whether `stage` or one before it pruned the student unstructured (so its zeros are
  worth storing as a mask plus values)."""
  if config.prune.method == 'none':
    return False
  names = strategies.stage_names(config)
  return any(s in config.prune.stages for s in names[: names.index(stage) + 1])


def compress_params(params, spec: dict, cfg) -> tuple[dict, dict, dict]:
  """(params, spec, details) of config.compress applied to a host param tree."""
  if cfg.method in ('units', 'heads'):
    part = 'heads' if cfg.method == 'heads' else ''
    params, spec, kept = structured.prune(params, spec, cfg.keep, part)
    return params, spec, {'kept_units': {k: [int(i) for i in v] for k, v in kept.items()}}
  if cfg.method == 'lowrank':
    rank = cfg.rank or None
    energy = None if rank else cfg.energy
    params, spec, layers = lowrank.factorise_model(
      params, spec, tuple(cfg.rules), rank=rank, energy=energy, exclude=tuple(cfg.exclude)
    )
    return params, spec, {'layers': layers}
  raise config_lib.ConfigError(
    f"config.compress.method={cfg.method!r} cannot run the 'compress' stage; "
    f'valid: {", ".join(config_lib.COMPRESS_METHODS[1:])}'
  )


def _matrix_zeros(params) -> tuple[int, int, dict]:
  """(zeros, size, fraction per path) over the matrices and embedding tables of a float
  param tree: where pruning puts its zeros (biases and norms are never pruned)."""
  zeros, size, per_layer = 0, 0, {}
  for path, leaf in zip(rules_lib.param_paths(params), jax.tree_util.tree_leaves(params)):
    arr = np.asarray(leaf)
    if arr.ndim >= 2:
      z = int(arr.size - np.count_nonzero(arr))
      zeros, size, per_layer[path] = zeros + z, size + arr.size, z / arr.size
  return zeros, size, per_layer


def measure(
  stage: str, model: str, float_params, run_params, run_fn, artifact_dir, evalset, repeats
) -> tuple[dict, np.ndarray]:
  """One row of the compression table and the dev logits. `float_params` is the model's
  float tree (what is counted), `run_params` what `run_fn` runs (the same tree, or its
  quantized form), `artifact_dir` the artifact already written for it."""
  logits, rate = evaluate.timed_logits(run_fn, run_params, evalset.batches)
  num_params = evaluate.model_stats(float_params)['params']
  zeros, matrix_size, per_layer = _matrix_zeros(float_params)
  size = artifact.size_bytes(artifact_dir)
  e = evalset
  return {
    'stage': stage,
    'model': model,
    'params': num_params,
    'zeros': zeros,
    'sparsity': zeros / matrix_size if matrix_size else 0.0,
    'zeros_per_layer': per_layer,
    'artifact_bytes': size,
    'bits_per_param': 8 * size / num_params,
    'eval_accuracy': evaluate.accuracy(logits, e.labels),
    'eval_examples_per_sec': rate,
    **{
      f'latency_ms_batch{b}': ptq.latency_ms(
        run_fn, run_params, e.ids, e.labels, e.buckets, b, repeats
      )
      for b in (1, 32)
    },
  }, logits


def _write_artifact(directory: pathlib.Path, params, spec: dict, sparse_rules) -> None:
  """The stage's compact artifact, replaced whole so no stale file is counted in its size."""
  if parallel.is_lead_process():
    ptq.replace_artifact(directory, params, spec, sparse_rules)
  parallel.barrier(f'artifact {directory}')


def measure_float(config, stage: str, stage_dir, params, spec: dict, evalset):
  """The row of a float model (a stage's export): its artifact stores float32 weights, with
  unstructured zeros as a mask plus values where a pruning stage made them."""
  sparse = tuple(config.prune.rules) if pruned_through(config, stage) else ()
  host = jax.device_get(params)
  _write_artifact(stage_dir / ARTIFACT, host, spec, sparse)
  fn = step_lib.make_logits_fn(train.build(spec))
  run_params = jax.device_put(host)
  return measure(
    stage,
    spec['model'],
    host,
    run_params,
    fn,
    stage_dir / ARTIFACT,
    evalset,
    config.compress.timing_repeats,
  )


def source_row(config, workdir: pathlib.Path, name: str, evalset):
  """(row, dev logits) of the source stage, measured here when the source is not itself a
  chain stage (those measure themselves); (None, None) otherwise."""
  source = source_stage(config, name)
  if source in config_lib.CHAIN_STAGES:
    return None, None
  _, params, spec = train.load_exported_model(source_export(config, workdir, name))
  return measure_float(config, source, workdir / name / 'source', params, spec, evalset)


def _result(row: dict, start: float, rows: list, **extra) -> dict:
  """A result.json shaped like a training stage's, so report tables read it unchanged."""
  model = {
    'model': row['model'],
    'eval_accuracy': row['eval_accuracy'],
    'eval_examples_per_sec': row['eval_examples_per_sec'],
    'params': row['params'],
    'bytes': row['artifact_bytes'],
  }
  return {
    'steps': 0,
    'train_examples_per_sec': 0.0,
    'models': {'student': model},
    'compression': rows,
    **extra,
    'wall_time_sec': time.perf_counter() - start,
  }


def run_compress(config, workdir: pathlib.Path, tokenizer, evalset: EvalSet, writer) -> dict:
  """The 'compress' stage: config.compress applied to the source stage's student."""
  name = 'compress'
  stage_dir = workdir / name
  start = time.perf_counter()
  source_dir = source_export(config, workdir, name)
  _, params, spec = train.load_exported_model(source_dir)
  new_params, new_spec, details = compress_params(jax.device_get(params), spec, config.compress)
  changed = {k: v for k, v in new_spec['kwargs'].items() if spec['kwargs'].get(k) != v}
  print(f'[{name}] {config.compress.method} of {source_dir}: {changed}', flush=True)
  export_dir = stage_dir / 'export' / 'student'
  checkpoint.export_model(export_dir, new_params, new_spec)  # every process joins orbax
  if parallel.is_lead_process():
    text.save_tokenizer(tokenizer, export_dir)
  rows = [source_row(config, workdir, name, evalset)[0]]
  row, _ = measure_float(config, name, stage_dir, new_params, new_spec, evalset)
  rows = [r for r in rows if r] + [row]
  result = _result(
    row,
    start,
    rows,
    source=str(source_dir),
    method=config.compress.method,
    kwargs_before=spec['kwargs'],
    kwargs_after=new_spec['kwargs'],
    **details,
  )
  return train.finish_stage(stage_dir, name, 0, result, writer)


def run_quantize(config, workdir: pathlib.Path, tokenizer, evalset: EvalSet, writer) -> dict:
  """The 'quantize' stage: post-training quantization of the source stage's student."""
  name = 'quantize'
  stage_dir = workdir / name
  start = time.perf_counter()
  q = config.quant
  source_dir = source_export(config, workdir, name)
  _, params, spec = train.load_exported_model(source_dir)
  host = jax.device_get(params)
  qparams = quantize.quantize_params(
    host, q.ptq_bits, q.symmetric, q.per_channel, tuple(q.rules), tuple(q.exclude)
  )
  sparse = tuple(config.prune.rules) if pruned_through(config, name) else ()
  _write_artifact(stage_dir / ARTIFACT, qparams, spec, sparse)
  float_fn = step_lib.make_logits_fn(train.build(spec))
  source, float_logits = source_row(config, workdir, name, evalset)
  rows = [source]
  row, quant_logits = measure(
    name,
    spec['model'],
    host,
    jax.device_put(qparams),
    ptq.dequantizing(float_fn),  # what kdjax.ptq measures
    stage_dir / ARTIFACT,
    evalset,
    config.compress.timing_repeats,
  )
  row['bits'] = q.ptq_bits
  if float_logits is None:  # the source is a chain stage: it measured itself, logits not kept
    float_logits = evaluate.predict_logits(float_fn, jax.device_put(host), evalset.batches())
  rows = [r for r in rows if r] + [row]
  if parallel.is_lead_process():
    text.save_tokenizer(tokenizer, stage_dir / ARTIFACT)
  result = _result(
    row,
    start,
    rows,
    source=str(source_dir),
    bits=q.ptq_bits,
    quantized_params=rules_lib.selected_paths(
      host, tuple(q.rules), 'quant.rules', tuple(q.exclude)
    ),
    agreement_with_float=evaluate.agreement(quant_logits, float_logits),
    float_eval_accuracy=evaluate.accuracy(float_logits, evalset.labels),
  )
  return train.finish_stage(stage_dir, name, 0, result, writer)
