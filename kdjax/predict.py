"""`python -m kdjax.predict --workdir=DIR --input=FILE [--output=FILE] [--model=stage/role]`.

Reads one sentence per line, or a TSV whose header has a `sentence` column, and writes, with
the run's final student (or --model):
  * for a classifier (kdjax.main runs): a TSV of `label`, `prob_<class>`… and the sentence;
  * for a translation model (kdjax.translate runs): one detokenised translation per line,
    by beam search (`--beam_size`, default the run's decode.beam_size; 1 = greedy).
"""

import csv
import json
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from kdjax import checkpoint, evaluate, train, translate
from kdjax import step as step_lib
from kdjax.compress import artifact
from kdjax.data import pipeline, text
from kdjax.data.errors import DataError


def read_sentences(path: str) -> list[str]:
  p = pathlib.Path(path)
  if not p.is_file():
    raise DataError(f'{path}: input file not found')
  try:
    lines = p.read_text(encoding='utf-8').splitlines()
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  header = lines[0].split('\t') if lines else []
  if 'sentence' in header:
    column = header.index('sentence')
    rows = list(csv.reader(lines[1:], delimiter='\t', quoting=csv.QUOTE_NONE))
    for number, row in enumerate(rows, start=2):
      if len(row) != len(header):
        raise DataError(f'{path}:{number}: {len(row)} fields, the header has {len(header)}')
    return [row[column].strip() for row in rows]
  return [line.strip() for line in lines]


def model_dir(workdir: pathlib.Path, model_path: str = '') -> pathlib.Path:
  """The export (or kdjax.ptq artifact) to run: `model_path` inside the workdir (an absolute
  path is used as it is), by default the run's final student from results.json."""
  if not model_path:
    results = workdir / 'results.json'
    if not results.is_file():
      raise checkpoint.CheckpointError(
        f'{results} not found: the run has not finished; '
        'pass --model=<stage>/export/<role> to use a stage export'
      )
    model_path = json.loads(results.read_text())['final_student']
  return workdir / model_path


def load_model(workdir: pathlib.Path, model_path: str):
  export_dir = model_dir(pathlib.Path(workdir), model_path)
  if (export_dir / artifact.MANIFEST).is_file():
    # A compressed artifact (kdjax.ptq): the model runs on its dequantized weights.
    stored, spec = artifact.load(export_dir)
    return train.build(spec), artifact.materialize(stored), text.load_tokenizer(export_dir)
  model, params, _ = train.load_exported_model(export_dir)
  return model, params, text.load_tokenizer(export_dir)


def predict(
  workdir: str, sentences: list[str], model_path: str = '', batch_size: int = 64
) -> np.ndarray:
  """Class probabilities [N, C] for `sentences` from an exported model of a run."""
  workdir = pathlib.Path(workdir)
  model, params, tokenizer = load_model(workdir, model_path)
  config = json.loads((workdir / 'config.json').read_text())
  max_len, buckets = config['data']['max_len'], tuple(config['data']['buckets'])
  ids = pipeline.encode(sentences, tokenizer, max_len)
  batches = pipeline.ordered_pass(ids, np.zeros(len(ids), np.int32), batch_size, buckets)
  logits_fn = step_lib.make_logits_fn(model)
  logits = evaluate.predict_logits(logits_fn, params, batches)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def is_translation_model(export_dir: pathlib.Path) -> bool:
  spec = export_dir / 'model.json'
  return spec.is_file() and json.loads(spec.read_text()).get('model') == translate.MODEL_NAME


def translate_sentences(
  workdir: str, sentences: list[str], model_path: str = '', beam_size: int = 0, batch_size=64
) -> list[str]:
  """Detokenised translations of `sentences` by an exported model of a translate run, with
  the run's tokenization, buckets and decoding settings (beam_size 0: the run's own)."""
  workdir = pathlib.Path(workdir)
  model, params, tok = translate.load_export(model_dir(workdir, model_path))
  config = json.loads((workdir / 'config.json').read_text())
  data, decoding = config['data'], config['decode']
  decode_cfg = ml_collections.ConfigDict(dict(decoding, batch_size=batch_size))
  ids = tok.encode_batch(sentences, data['max_len'])
  beam = beam_size or decoding['beam_size']
  return translate.translate(model, params, tok, ids, decode_cfg, tuple(data['buckets']), beam)


def _classify_lines(sentences: list[str], probs: np.ndarray) -> list[str]:
  lines = ['label\t' + '\t'.join(f'prob_{c}' for c in range(probs.shape[1])) + '\tsentence']
  for sentence, p in zip(sentences, probs):
    lines.append(f'{int(np.argmax(p))}\t' + '\t'.join(f'{x:.6f}' for x in p) + f'\t{sentence}')
  return lines


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  try:
    f = flags.FLAGS
    sentences = read_sentences(f.input)
    if is_translation_model(model_dir(pathlib.Path(f.workdir), f.model)):
      lines = translate_sentences(f.workdir, sentences, f.model, f.beam_size, f.batch_size)
    else:
      lines = _classify_lines(sentences, predict(f.workdir, sentences, f.model, f.batch_size))
  except (DataError, checkpoint.CheckpointError, artifact.ArtifactError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  text = '\n'.join(lines) + '\n'
  if flags.FLAGS.output == '-':
    sys.stdout.write(text)
  else:
    pathlib.Path(flags.FLAGS.output).write_text(text, encoding='utf-8')


def define_flags() -> None:
  """Defined when run as a program, not at import, so other tools can import predict()."""
  flags.DEFINE_string('workdir', None, 'Finished run directory.')
  flags.DEFINE_string(
    'input', None, 'Text file (a sentence per line) or TSV with a `sentence` column.'
  )
  flags.DEFINE_string('output', '-', 'Output TSV path; - for stdout.')
  flags.DEFINE_string(
    'model',
    '',
    'Export inside the workdir (e.g. teacher/export/teacher) or a kdjax.ptq artifact folder; '
    'default: results.json final_student.',
  )
  flags.DEFINE_integer('batch_size', 64, 'Sentences per forward pass.')
  flags.DEFINE_integer(
    'beam_size', 0, "Translation models: beam width (1 = greedy; 0 = the run's decode.beam_size)."
  )
  flags.mark_flags_as_required(['workdir', 'input'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
