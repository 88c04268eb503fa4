"""MNIST input, the MLP, the max-norm constraint, bias correction and the Hinton experiment's
whole run (on a small IDX folder cut from the real test set), including resume."""

import gzip
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import hinton_mnist
from kdjax import config as config_lib
from kdjax import image_train
from kdjax.data import mnist
from kdjax.data.errors import DataError

# Published per-class counts of the MNIST test set (digits 0..9).
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_idx(path, array: np.ndarray, magic: int, compress: bool) -> None:
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  if compress:
    path = path.with_name(path.name + '.gz')
    payload = gzip.compress(payload)
  path.write_bytes(payload)


def _small_mnist(folder, train: int, test: int) -> None:
  """An IDX folder of real digits: `train` + `test` images taken from the shipped test set."""
  images, labels = mnist.load_split('test')
  folder.mkdir(parents=True, exist_ok=True)
  parts = {'train': slice(0, train), 't10k': slice(train, train + test)}
  for prefix, rows in parts.items():
    _write_idx(folder / f'{prefix}-images-idx3-ubyte', images[rows], 2051, compress=True)
    _write_idx(folder / f'{prefix}-labels-idx1-ubyte', labels[rows], 2049, compress=False)


def test_shipped_test_split_has_the_published_class_counts():
  images, labels = mnist.load_split('test')
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert np.bincount(labels, minlength=10).tolist() == TEST_CLASS_COUNTS


def test_idx_round_trip_gzipped_and_raw(tmp_path):
  array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28))
  _write_idx(tmp_path / 'a', array, 2051, compress=True)
  _write_idx(tmp_path / 'b', array, 2051, compress=False)
  for name in ('a.gz', 'b'):
    np.testing.assert_array_equal(mnist.read_idx(tmp_path / name, 2051), array)


def test_bad_idx_files_fail_with_one_line_naming_the_file(tmp_path):
  _write_idx(tmp_path / 'labels', np.arange(5), 2049, compress=False)
  with pytest.raises(DataError, match=r'labels: IDX magic number 2049, expected 2051'):
    mnist.read_idx(tmp_path / 'labels', 2051)
  raw = (tmp_path / 'labels').read_bytes()
  (tmp_path / 'short').write_bytes(raw[:-2])
  with pytest.raises(DataError, match=r'short: 11 bytes, expected 13 .*truncated'):
    mnist.read_idx(tmp_path / 'short', 2049)
  with pytest.raises(DataError, match=r'train-images-idx3-ubyte\[\.gz\] not found'):
    mnist.load_split('train', str(tmp_path))
  with pytest.raises(DataError, match=r"split 'dev' does not exist; valid: train, test"):
    mnist.load_split('dev')


def test_jitter_matches_a_shift_with_zero_fill():
  images = np.random.default_rng(1).integers(1, 256, size=(6, 28, 28)).astype(np.uint8)
  rng = np.random.default_rng(7)
  shifted = mnist.jitter(images, 2, np.random.default_rng(7))
  shifts = rng.integers(0, 5, size=(6, 2)) - 2  # the same draws: offsets in [-2, 2]
  for image, out, (dy, dx) in zip(images, shifted, shifts):
    expected = np.zeros_like(image)
    # out[r, c] = image[r + dy, c + dx] where that pixel exists, else background.
    src = image[max(dy, 0) : 28 + min(dy, 0), max(dx, 0) : 28 + min(dx, 0)]
    expected[max(-dy, 0) : 28 - max(dy, 0), max(-dx, 0) : 28 - max(dx, 0)] = src
    np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(mnist.jitter(images, 0, rng), images)


def test_jitter_keeps_real_digits_whole():
  # A digit with no ink in its 2-pixel border (most of MNIST) loses none to a 2-pixel shift.
  images, _ = mnist.load_split('test')
  inner = np.zeros((28, 28), bool)
  inner[2:26, 2:26] = True
  images = images[:500][(images[:500] * ~inner).reshape(500, -1).sum(1) == 0]
  assert len(images) > 400
  shifted = mnist.jitter(images, 2, np.random.default_rng(0))
  np.testing.assert_array_equal(
    shifted.reshape(len(images), -1).sum(1), images.reshape(len(images), -1).sum(1)
  )


def test_batches_resume_exactly():
  images, labels = mnist.load_split('test')
  images, labels = images[:300], labels[:300]
  extra = {'teacher_logits': np.arange(300 * 10, dtype=np.float32).reshape(300, 10)}
  a = mnist.ImageBatches(images, labels, 64, seed=3, max_shift=2, row_data=extra)
  for _ in range(6):  # crosses an epoch boundary (4 full batches per epoch)
    next(a)
  state = a.get_state()
  b = mnist.ImageBatches(images, labels, 64, seed=3, max_shift=2, row_data=extra)
  b.set_state(json.loads(json.dumps(state)))
  for _ in range(3):
    x, y = next(a), next(b)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  # Labels travel with their rows, and so do per-row extras.
  row = int(x['teacher_logits'][0, 0]) // 10
  assert x['labels'][0] == labels[row]


def test_eval_batches_cover_every_image_once_with_padding_weighted_zero():
  images, labels = mnist.load_split('test')
  batches = list(mnist.eval_batches(images[:250], labels[:250], 100))
  assert [b['image'].shape for b in batches] == [(100, 784)] * 3
  assert sum(b['weights'].sum() for b in batches) == 250
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches])[:250], labels[:250])


def test_mlp_outputs_and_dropout():
  model = image_train.MLPClassifier(hidden_sizes=(16, 8), input_dropout=0.2, hidden_dropout=0.5)
  params = image_train.init_params(model, jax.random.PRNGKey(0))
  x = jnp.ones((3, 784))
  logits, out = model.apply({'params': params}, x)
  assert logits.shape == (3, 10)
  assert {k: v.shape for k, v in out.items()} == {
    'hidden_0': (3, 784),
    'hidden_1': (3, 16),
    'hidden_2': (3, 8),
    'pooled': (3, 8),
  }
  again, _ = model.apply({'params': params}, x)
  np.testing.assert_array_equal(logits, again)
  noisy, _ = model.apply(
    {'params': params}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)}
  )
  assert not np.allclose(noisy, logits)


def test_max_norm_projects_only_columns_over_the_limit():
  kernel = np.zeros((4, 3), np.float32)
  kernel[:, 0] = 1.0  # norm 2
  kernel[:, 1] = 3.0  # norm 6
  params = {'w': jnp.asarray(kernel), 'b': jnp.full((3,), 10.0)}
  updates = jax.tree_util.tree_map(jnp.zeros_like, params)
  tx = image_train.max_norm(3.0)
  new_updates, _ = tx.update(updates, tx.init(params), params)
  new = jax.tree_util.tree_map(lambda p, u: p + u, params, new_updates)
  np.testing.assert_allclose(np.linalg.norm(new['w'], axis=0), [2.0, 3.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(new['w'][:, 0], kernel[:, 0])
  np.testing.assert_allclose(new['w'][:, 1], 1.5, atol=1e-6)
  np.testing.assert_array_equal(new['b'], params['b'])  # biases are not constrained


def test_bias_correction_against_a_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(200, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=200)
  result = image_train.bias_correction(logits, labels, (3, 5), bias_max=2.0, bias_step=0.5)
  assert list(result) == [0.0, 0.5, 1.0, 1.5, 2.0]
  for bias, errors in result.items():
    shifted = logits.copy()
    shifted[:, [3, 5]] += bias
    assert errors == int(sum(np.argmax(row) != y for row, y in zip(shifted, labels)))


def _tiny_config(data_dir):
  config = hinton_mnist.get_config()
  config.data.dir = str(data_dir)
  config.teacher.hidden_sizes = (64, 64)
  config.student.hidden_sizes = (32, 32)
  for t in (config.teacher_train, config.student_train):
    t.epochs = 2.0
    t.batch_size = 50
    t.optim.warmup_steps = 5
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.checkpoint_every = 10
  config.train.eval_batch_size = 100
  config.omit.bias_max = 3.0
  config.omit.bias_step = 1.0
  return config


@pytest.fixture(scope='module')
def hinton_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('hinton')
  _small_mnist(root / 'data', train=600, test=300)
  config = _tiny_config(root / 'data')
  return root, config, image_train.run(config, root / 'run')


def test_hinton_run_reports_every_stage(hinton_run):
  root, _, stages = hinton_run
  assert list(stages) == ['teacher', 'student_alone', 'distill', 'distill_omit']
  threes = int(np.sum(mnist.load_split('test')[1][:600] == 3))
  assert [stages[s]['steps'] for s in stages] == [24, 24, 24, 2 * (600 - threes) // 50]
  omit = stages['distill_omit']
  assert omit['train_images'] == 600 - threes
  assert omit['omitted_test_images'] == int(np.sum(mnist.load_split('test')[1][600:900] == 3))
  errors_by_bias = omit['test_errors_by_bias']
  assert list(errors_by_bias) == ['0.0', '1.0', '2.0', '3.0']
  assert errors_by_bias['0.0'] == omit['errors']
  assert omit['errors_bias_chosen_on_test'] == min(errors_by_bias.values())
  for s in stages.values():
    assert 0 < s['errors'] < 300 and sum(s['errors_per_class']) == s['errors']
  report = (root / 'run' / 'report.md').read_text()
  assert '| teacher | 55,050 |' in report and 'chosen on test, as the paper' in report


def test_hinton_distilled_student_learns_from_the_exported_teacher(hinton_run):
  root, config, stages = hinton_run
  assert 0 <= stages['distill']['agreement'] <= 1
  records = [json.loads(line) for line in (root / 'run' / 'metrics.jsonl').read_text().splitlines()]
  distill = [r for r in records if r['stage'] == 'distill' and 'kl_T' in r]
  assert distill and all(r['schedule/temperature'] == 20.0 for r in distill)
  assert distill[-1]['kl_T'] < distill[0]['kl_T']


def test_live_teacher_loss_equals_the_loss_on_precomputed_teacher_logits():
  """A jittered transfer set has the teacher score each batch inside the step; that must be
  the same objective as reading the teacher's logits for those images from the batch."""
  config = _tiny_config('')
  student = image_train.build_model(config, 'student')
  teacher = image_train.build_model(config, 'teacher')
  params = image_train.init_params(student, jax.random.PRNGKey(0))
  teacher_params = image_train.init_params(teacher, jax.random.PRNGKey(1))
  teacher_fn = image_train.make_logits_fn(teacher)
  images, labels = mnist.load_split('test')
  batch = next(mnist.ImageBatches(images[:64], labels[:64], 16, seed=0, max_shift=2))
  objective = image_train.kd_objective.logits_only(config.loss, 10)
  live = image_train._loss_fn(student, objective, teacher_fn)
  cached = image_train._loss_fn(student, objective)
  rng = jax.random.PRNGKey(2)
  loss_live, aux_live = live(params, teacher_params, batch, rng, 3)
  with_logits = {**batch, 'teacher_logits': teacher_fn(teacher_params, batch)}
  loss_cached, aux_cached = cached(params, None, with_logits, rng, 3)
  np.testing.assert_allclose(loss_live, loss_cached, rtol=1e-6)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), aux_live, aux_cached
  )
  # The soft targets describe the jittered images: the same rows un-jittered score otherwise.
  still = next(mnist.ImageBatches(images[:64], labels[:64], 16, seed=0, max_shift=0))
  np.testing.assert_array_equal(still['labels'], batch['labels'])
  assert not np.allclose(teacher_fn(teacher_params, still), with_logits['teacher_logits'])


def test_hinton_run_resumes_after_a_kill(hinton_run, tmp_path):
  """A stage killed after its step-10 checkpoint ends with the same weights as the
  uninterrupted run."""
  root, config, stages = hinton_run
  _small_mnist(tmp_path / 'data', train=600, test=300)
  config = _tiny_config(tmp_path / 'data')
  config.stages = ('teacher',)
  workdir = tmp_path / 'run'
  code = (
    'import sys; from kdjax import image_train, loop; '
    'from tests.test_mnist import _tiny_config; import pathlib; '
    f'c = _tiny_config(pathlib.Path({str(tmp_path / "data")!r})); c.stages = ("teacher",); '
    'orig = loop.checkpoint.StageCheckpointer.save\n'
    'def save(self, step, *a):\n'
    '  orig(self, step, *a)\n'
    '  if step == 10: self.wait(); sys.exit(9)\n'
    'loop.checkpoint.StageCheckpointer.save = save\n'
    f'image_train.run(c, {str(workdir)!r})'
  )
  killed = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert killed.returncode == 9, killed.stderr[-2000:]
  resumed = image_train.run(config, workdir)
  assert resumed['teacher']['errors'] == stages['teacher']['errors']
  assert resumed['teacher']['errors_per_class'] == stages['teacher']['errors_per_class']


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('stages', ('distill',), "put 'teacher' first"),
    ('omit.classes', (11,), 'digits 0..9'),
    ('teacher_train.jitter', 12, r'pixels in \[0, 8\]'),
    ('transfer.jitter', -1, r'pixels in \[0, 8\]'),
    ('student.input_dropout', 1.0, r'probability in \[0, 1\)'),
    ('loss.weights.hidden_mse', 1.0, 'logit terms only'),
  ],
)
def test_bad_config_values_fail_in_one_line(key, value, message):
  config = hinton_mnist.get_config()
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    image_train.validate(config)


def test_cli_reports_a_missing_data_folder_in_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'kdjax.image_train',
      '--config=experiments/hinton_mnist.py:runlocal',
      f'--config.data.dir={tmp_path / "nowhere"}',
      f'--workdir={tmp_path / "run"}',
    ],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: MNIST file train-images')
