"""Every experiment config loads and validates; every bad value is named in one line."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from configs import default
from kdjax import config as config_lib
from kdjax import image_train, translate
from kdjax.sweep import apply_overrides, load_points

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / 'experiments').glob('*.py') if p.stem != '__init__')
ARGS = {
  'sst2_from_scratch': ['', 'runlocal', 'student=cnn'],
  'sst2_seeds': ['teacher='],
  'sst2_quickstart': ['', 'runlocal', 'student=cnn'],
  'sst2_minilm_students': ['student=bilstm', 'student=cnn', 'student=bert', 'runlocal'],
  'sst2_minilm_teacher': ['', 'runlocal', 'recipe=standard', 'continue_from=runs/minilm_teacher'],
  'hinton_mnist': ['', 'runlocal'],
  'multi30k': ['', 'teacher_only', 'runlocal,on_policy'],
}
# Experiments run by another entry point than kdjax.main, with that runner's validation.
OTHER_RUNNERS = {'hinton_mnist': image_train.validate, 'multi30k': translate.validate}


def _needs_missing_teacher(config) -> bool:
  """Configs that read a trained teacher from disk are validated only where one exists."""
  uses_teacher = 'distill' in config.stages or config.student.init_from == 'teacher'
  if not uses_teacher or 'teacher' in config.stages:
    return False
  return not (config_lib.teacher_export_dir(config.teacher.path) / 'model.json').is_file()


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_experiment_config_loads_and_validates(name):
  module = importlib.import_module(f'experiments.{name}')
  if name in OTHER_RUNNERS:
    for arg in ARGS[name]:
      OTHER_RUNNERS[name](module.get_config(arg))
    return
  if not hasattr(module, 'get_config') or 'stages' not in module.get_config(
    ARGS.get(name, [''])[0]
  ):
    pytest.skip('not a kdjax.main run config (a script, or checked by its own tool and tests)')
  for arg in ARGS.get(name, ['']):
    config = module.get_config(arg)
    continuing = str(config.teacher.init_from).startswith('runs/')
    if _needs_missing_teacher(config) or continuing:
      continue  # needs a trained model on disk; the run itself validates it
    config_lib.validate(config)
  if hasattr(module, 'get_sweep'):
    # Every sweep point must name real keys (the teacher path is checked at run time).
    for overrides in module.get_sweep():
      apply_overrides(module.get_config(ARGS.get(name, [''])[0]), overrides)


def test_default_schema_validates():
  config_lib.validate(default.get_config())


@pytest.mark.parametrize(
  'key, value, fragment',
  [
    ('loss.temperature', 0.0, 'config.loss.temperature=0.0 is invalid: must be > 0'),
    ('loss.weights.kl', -1.0, 'config.loss.weights.kl=-1.0 is invalid: a number >= 0'),
    ('loss.weights.jsd', float('inf'), 'config.loss.weights.jsd=inf is invalid: must be a finite'),
    ('loss.dkd_beta', float('nan'), 'config.loss.dkd_beta=nan is invalid: must be a finite'),
    ('data.buckets', (16, 8, 64), 'config.data.buckets=(16, 8, 64) is invalid'),
    ('data.eval_split', 'test', 'test has no labels'),
    ('train.checkpoint_every', 7, 'must be a multiple of train.log_every=50'),
    ('train.ema_decay', 1.0, 'config.train.ema_decay=1.0 is invalid: a decay in [0, 1)'),
    ('train.ema_decay', -0.5, 'a decay in [0, 1): 0 = off'),
    ('stages', ('distill',), "'distill' needs a teacher"),
    ('stages', ('teacher', 'teacher'), 'each stage at most once'),
    ('teacher_optim.schedule', 'exp', 'one of constant, linear, cosine'),
    ('teacher.path', '/nonexistent/run', 'no trained teacher found'),
    ('parallel.mode', 'ddp', "config.parallel.mode='ddp' is invalid: one of single, pmap"),
    ('parallel.params', 'fsdp', "fsdp needs parallel.mode='mesh' (mode is 'single')"),
    ('parallel.teacher', 'zero3', "config.parallel.teacher='zero3' is invalid"),
    ('parallel.distributed.initialize', 'yes', 'one of never, auto, always'),
    ('parallel.distributed.process_id', -2, '-1 (unset) or >= 0'),
    ('distill.augment_replace', 'pos', "config.distill.augment_replace='pos' is invalid"),
    ('distill.augment_replace', 'neighbours', "needs data.tokenizer='wordpiece'"),
  ],
)
def test_bad_values_are_named(key, value, fragment):
  config = default.get_config()
  if key == 'teacher.path':
    config.stages = ('distill',)
  config = apply_overrides(config, {key: value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert fragment in str(e.value)
  assert '\n' not in str(e.value)


def test_bad_model_field_is_named():
  config = default.get_config()
  config.student.kwargs.hidden_sise = 3
  with pytest.raises(config_lib.ConfigError, match=r'config.student: .*hidden_sise'):
    config_lib.validate(config)


def test_sweep_with_a_bad_point_fails_before_running():
  config = default.get_config()
  with pytest.raises(config_lib.ConfigError, match='sweep point loss.temperature=-2'):
    load_points(config, [{'loss.temperature': 2.0}, {'loss.temperature': -2.0}])
  with pytest.raises(config_lib.ConfigError, match='loss.temprature=2.0: no such config key'):
    load_points(config, [{'loss.temprature': 2.0}])


@pytest.mark.parametrize(
  'argv, fragment',
  [
    (['--config.loss.temprature=3'], 'Did you mean "temperature"'),
    (['--config.loss.temperature=abc'], 'could not convert string to float'),
    (['--config.loss.temperature=-1'], 'config.loss.temperature=-1.0 is invalid: must be > 0'),
  ],
)
def test_cli_reports_bad_config_in_one_line_with_exit_code_2(argv, fragment, tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'kdjax.main',
      '--config=experiments/sst2_from_scratch.py',
      f'--workdir={tmp_path / "run"}',
      *argv,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], proc.stderr
  assert not (tmp_path / 'run' / 'config.json').exists()  # failed before doing anything


def test_workdir_written_before_new_schema_keys_still_resumes(tmp_path):
  """Keys the schema gained after a workdir was written are accepted at their defaults, and
  only there: a new key set to another value is a different experiment."""
  import json

  from kdjax import train

  config = default.get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved['mutual']
  del saved['distill']['generations']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  train._check_config(config, tmp_path)  # resumes
  config.distill.generations = 2
  with pytest.raises(config_lib.ConfigError, match=r'config\.distill\.generations was None, now 2'):
    train._check_config(config, tmp_path)


def test_a_workdir_resumes_on_another_parallel_layout(tmp_path):
  """Where a run executes (parallel.*) may change between runs of one workdir; what it
  computes may not."""
  from kdjax import train

  config = default.get_config()
  train._check_config(config, tmp_path)
  config.parallel.mode = 'mesh'
  config.parallel.params = 'fsdp'
  train._check_config(config, tmp_path)  # resumes
  config.train.batch_size = 128
  with pytest.raises(config_lib.ConfigError, match=r'config\.train\.batch_size was 64, now 128'):
    train._check_config(config, tmp_path)


@pytest.mark.parametrize(
  'experiment, validate, key',
  [
    ('sst2_quickstart', config_lib.validate, 'loss.temperature'),
    ('hinton_mnist', image_train.validate, 'student_train.optim.learning_rate'),
    ('multi30k', translate.validate, 'train.label_smoothing'),
  ],
)
@pytest.mark.parametrize('value', [float('inf'), float('-inf'), float('nan')])
def test_every_job_refuses_nan_and_infinity_in_a_float_setting(experiment, validate, key, value):
  config = importlib.import_module(f'experiments.{experiment}').get_config('')
  config = apply_overrides(config, {key: value})
  with pytest.raises(config_lib.ConfigError) as e:
    validate(config)
  assert str(e.value) == f'config.{key}={value!r} is invalid: must be a finite number'


@pytest.mark.parametrize('value', [float('inf'), float('nan'), 1.0, -0.1])
def test_model_rates_and_numbers_must_be_finite_and_in_range(value):
  config = default.get_config()
  config.student.kwargs.dropout_rate = value
  with pytest.raises(config_lib.ConfigError, match=r'^config\.student\.kwargs\.dropout_rate='):
    config_lib.validate(config)


@pytest.mark.parametrize(
  'name, arg, fragment',
  [
    ('sst2_minilm_teacher', 'recipe=long', "recipe='long'; valid: ('quick', 'standard')"),
    ('sst2_minilm_students', 'student=gru', "student='gru'; valid: ('bilstm', 'cnn', 'bert')"),
    ('sst2_minilm_teacher', 'epochs=3', "unknown argument(s) ['epochs']"),
    ('sst2_compression_chain', 'method=fp8', "method='fp8'; valid: ('heads', 'lowrank'"),
  ],
)
def test_bad_experiment_arguments_are_named(name, arg, fragment):
  module = importlib.import_module(f'experiments.{name}')
  with pytest.raises(ValueError) as error:
    module.get_config(arg)
  assert f'experiments/{name}.py' in str(error.value) and fragment in str(error.value)
