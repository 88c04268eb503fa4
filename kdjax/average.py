"""Checkpoint averaging: the mean of one stage's saved parameters, written as a model export.

Averaging the weights of the last checkpoints of a single run (Vaswani et al. 2017; Polyak
tail averaging) smooths out the noise of the final SGD steps at no training cost. Only
checkpoints of one trajectory should be averaged: they share a basin, independent runs do
not.
  python -m kdjax.average --workdir=runs/minilm_teacher3 --stage=teacher \\
      --steps=1500,1750,2000,2100 --output=runs/minilm_teacher3_avg
The output is an export folder (model.json, params/, tokenizer) that `teacher.path`,
`init_from` and kdjax.predict accept. The run's dev accuracy of the average and of each
averaged checkpoint is printed, so the gain is measured rather than assumed.
"""

import json
import pathlib

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from kdjax import checkpoint, evaluate, train
from kdjax import step as step_lib
from kdjax.cli import exit_on_user_errors
from kdjax.data import text

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory holding the stage.')
_STAGE = flags.DEFINE_string('stage', 'teacher', 'Stage whose checkpoints are averaged.')
_STEPS = flags.DEFINE_list('steps', None, 'Checkpoint steps to average (kept ones).')
_OUTPUT = flags.DEFINE_string('output', None, 'Export folder to write.')
flags.mark_flags_as_required(['workdir', 'steps', 'output'])


def checkpoint_params(stage_dir: pathlib.Path, step: int):
  """The trainable params saved at `step` (optimizer state is not needed)."""
  path = stage_dir / 'checkpoints' / str(step)
  if not path.is_dir():
    kept = sorted(p.name for p in (stage_dir / 'checkpoints').glob('[0-9]*'))
    raise checkpoint.CheckpointError(f'no checkpoint {path}; kept steps: {", ".join(kept)}')
  return checkpoint.restore_on_host(path / 'state')['params']


def average(trees: list):
  """Element-wise float32 mean of parameter trees with one structure."""
  return jax.tree_util.tree_map(lambda *xs: np.mean(np.stack(xs), axis=0), *trees)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  with exit_on_user_errors():
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    stage_dir = workdir / _STAGE.value
    export_dir = next((stage_dir / 'export').iterdir())  # the stage's single trained role
    spec = checkpoint.read_export_spec(export_dir)
    steps = [int(s) for s in _STEPS.value]
    trees = [checkpoint_params(stage_dir, s) for s in steps]
    averaged = average(trees)
    output = pathlib.Path(_OUTPUT.value)
    checkpoint.export_model(output, averaged, spec)
    text.save_tokenizer(text.load_tokenizer(export_dir), output)

    config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
    data = train.prepare_data(config, workdir)
    logits_fn = step_lib.make_logits_fn(train.build(spec))
    batches = train.eval_batches(config, data.eval_ids, data.eval_labels)
    accuracy = {}
    for name, params in [*zip(map(str, steps), trees), ('average', averaged)]:
      logits = evaluate.predict_logits(logits_fn, params, batches())
      accuracy[name] = evaluate.accuracy(logits, data.eval_labels)
      print(f'{config.data.eval_split} accuracy {name}: {100 * accuracy[name]:.2f}', flush=True)
    (output / 'average.json').write_text(
      json.dumps({'source': str(stage_dir), 'steps': steps, 'eval_accuracy': accuracy}, indent=2)
    )


if __name__ == '__main__':
  app.run(main)
