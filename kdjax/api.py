"""Python API: runs, evaluations and sweeps as Python objects, so a notebook needs no CLI.

  import kdjax
  run = kdjax.train('experiments/sst2_from_scratch.py:runlocal', 'runs/nb')  # or a ConfigDict
  run.summary['distilled_student_accuracy']; run.load_final_student().predict(['great !'])
  kdjax.evaluate(run.workdir, split='validation').accuracy
  sweep = kdjax.sweep_run('experiments/x.py', 'runs/x', parallel=2); sweep.plots

Runs resume and sweeps skip finished points exactly as the commands do: these functions call
the same code (kdjax.train.run, kdjax.sweep.run_points).
"""

import dataclasses
import pathlib
from typing import Sequence

import numpy as np

from kdjax import config as config_lib
from kdjax import report, sweep


def load_config(experiment, overrides: dict | None = None):
  """A validated config from a ConfigDict or an experiment file `path.py[:args]` (args as
  on the command line), with dotted-key `overrides` ({'loss.temperature': 4.0}) applied."""
  if isinstance(experiment, (str, pathlib.Path)):
    path = str(experiment)
    module = sweep.load_experiment(path)
    config = module.get_config(path.split(':', 1)[1]) if ':' in path else module.get_config()
  else:
    config = experiment
  config = sweep.apply_overrides(config, overrides or {})
  config_lib.validate(config)
  return config


@dataclasses.dataclass
class Model:
  """An exported model with its tokenizer and the data settings of the run that made it."""

  model: object
  params: object
  tokenizer: object
  export_dir: pathlib.Path
  max_len: int
  buckets: tuple

  def predict(self, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Class probabilities [N, C]."""
    import jax

    from kdjax import evaluate as evaluate_lib
    from kdjax import step as step_lib
    from kdjax.data import pipeline

    ids = pipeline.encode(list(sentences), self.tokenizer, self.max_len)
    batches = pipeline.ordered_pass(ids, np.zeros(len(ids), np.int32), batch_size, self.buckets)
    logits = evaluate_lib.predict_logits(step_lib.make_logits_fn(self.model), self.params, batches)
    return np.asarray(jax.nn.softmax(logits, axis=-1))


@dataclasses.dataclass
class RunResult:
  """A finished run: its workdir and results.json (`results`)."""

  workdir: pathlib.Path
  results: dict

  @property
  def summary(self) -> dict:
    return self.results['summary']

  @property
  def final_student(self) -> pathlib.Path | None:
    """The export folder of the run's final student (None if no stage trains one)."""
    final = self.results.get('final_student')
    return self.workdir / final if final else None

  def load_final_student(self) -> Model:
    if self.final_student is None:
      raise ValueError(f'{self.workdir}: the run has no final student')
    return load_model(self.final_student)


@dataclasses.dataclass
class Evaluation:
  """Predictions of one model on sentences, or on a labelled split (then `accuracy`)."""

  sentences: list[str]
  probabilities: np.ndarray  # [N, C]
  predictions: np.ndarray  # [N] argmax class
  labels: np.ndarray | None = None  # gold labels, when a split was evaluated
  accuracy: float | None = None


@dataclasses.dataclass
class SweepResult:
  workdir: pathlib.Path
  points: dict[str, RunResult]  # by point name, in sweep order
  overrides: dict[str, dict]  # by point name
  groups: list[dict]  # kdjax.sweep.aggregate rows: mean, std, n per figure
  table: str  # results.md
  results_csv: pathlib.Path
  points_csv: pathlib.Path
  plots: list[pathlib.Path]


def train(experiment, workdir, overrides: dict | None = None) -> RunResult:
  """Runs (or resumes, or reads back) every stage of a config in `workdir`."""
  from kdjax import train as train_lib

  config = load_config(experiment, overrides)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  return RunResult(workdir, train_lib.run(config, workdir))


def _run_of(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(run workdir, export folder) for a run workdir (its final student) or an export or
  kdjax.ptq artifact folder inside or beside one."""
  from kdjax import checkpoint, predict

  path = pathlib.Path(path).expanduser().absolute()
  if (path / 'results.json').is_file():
    return path, predict.model_dir(path)
  workdir = next((p for p in path.parents if (p / 'config.json').is_file()), None)
  if workdir is None:
    raise checkpoint.CheckpointError(
      f'{path}: no run config.json in it or a folder above it (needed for the data settings)'
    )
  return workdir, path


def load_model(model_dir) -> Model:
  """The model of a run workdir (its final student), a stage export or a kdjax.ptq artifact."""
  from kdjax import predict

  workdir, export = _run_of(model_dir)
  model, params, tokenizer = predict.load_model(workdir, str(export))
  data = report.read_json(workdir / 'config.json')['data']
  return Model(model, params, tokenizer, export, data['max_len'], tuple(data['buckets']))


def evaluate(
  model_dir, sentences: Sequence[str] | None = None, split: str | None = None
) -> Evaluation:
  """Predictions of a model (see load_model) for `sentences`, or for a labelled `split` of
  the run's dataset (e.g. 'validation'), then with accuracy."""
  if (sentences is None) == (split is None):
    raise ValueError('kdjax.evaluate: pass sentences or split, not both')
  m = load_model(model_dir)
  labels = None
  if split is not None:
    from kdjax import train as train_lib
    from kdjax.data import pipeline

    data = report.read_json(_run_of(model_dir)[0] / 'config.json')['data']
    tfds_dir = data['tfds_data_dir'] or train_lib.default_tfds_dir()
    sentences, labels = pipeline.load_split(data['name'], split, tfds_dir, data['raw_dir'])
  probabilities = m.predict(sentences)
  predictions = np.argmax(probabilities, axis=-1)
  accuracy = None if labels is None else float(np.mean(predictions == labels))
  return Evaluation(list(sentences), probabilities, predictions, labels, accuracy)


def sweep_run(
  experiment,
  workdir,
  sweep_points: list[dict] | None = None,
  parallel: int = 1,
  overrides: dict | None = None,
  plots: bool = True,
) -> SweepResult:
  """`python -m kdjax.sweep` from Python: `experiment` is a file `path.py[:args]` (its
  get_sweep() gives the points unless `sweep_points` does) or a ConfigDict with
  `sweep_points`. Every point is validated first; finished points are read back."""
  if sweep_points is None:
    if not isinstance(experiment, (str, pathlib.Path)):
      raise ValueError('kdjax.sweep_run: a ConfigDict needs sweep_points')
    sweep_points = sweep.sweep_of(sweep.load_experiment(str(experiment)), str(experiment))
  config = load_config(experiment, overrides)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  points = sweep.load_points(config, sweep_points)
  finished = sweep.run_points(points, workdir, parallel)
  out = sweep.write_outputs(workdir, finished, plots=plots)
  return SweepResult(
    workdir=workdir,
    points={n: RunResult(workdir / sweep.point_dir(n), r) for n, _, r in finished},
    overrides={n: o for n, o, _ in finished},
    groups=sweep.aggregate(finished),
    table=out['table'],
    results_csv=out['results_csv'],
    points_csv=out['points_csv'],
    plots=out['plots'],
  )
