"""Data-parallel steps on 8 simulated CPU devices (tests/conftest.py sets the device count):
pmap, shard_map and the mesh (replicated or FSDP) give one device's loss and parameters, and
compile once."""

import chex
import jax
import numpy as np
import optax
import pytest

from configs import default
from configs import models as presets
from kdjax import checkpoint, losses, parallel
from kdjax import step as step_lib
from kdjax.kd import objective as kd_objective
from kdjax.models import registry

VOCAB = 60
GLOBAL_BATCH = 16
STEPS = 3
MODES = ('single', 'pmap', 'shard_map', 'mesh')

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8, reason='needs 8 devices (XLA_FLAGS, see tests/conftest.py)'
)


def _batches(seed=0, length=12):
  """Batches with padded positions and zero-weight filler rows, spread so that devices hold
  different numbers of real examples and tokens: a per-device mean would be wrong here."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    lengths = rng.integers(2, length + 1, GLOBAL_BATCH)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(4, VOCAB, (GLOBAL_BATCH, length)).astype(np.int32) * mask
    ids[:, 0] = 2
    weights = np.ones(GLOBAL_BATCH, np.float32)
    weights[rng.choice(GLOBAL_BATCH, 5, replace=False)] = 0.0
    out.append(
      {
        'input_ids': ids,
        'attention_mask': mask,
        'labels': rng.integers(0, 2, GLOBAL_BATCH).astype(np.int32),
        'weights': weights,
      }
    )
  return out


def _bert(hidden, layers, dropout=0.0):
  p = presets.bert_tiny()
  kwargs = dict(p.kwargs.to_dict(), hidden_size=hidden, num_layers=layers, dropout_rate=dropout)
  return registry.build_model('bert', vocab_size=VOCAB, num_classes=2, **kwargs)


@pytest.fixture(scope='module')
def setup():
  """A 2-layer 64-wide teacher and a 1-layer 32-wide student distilled with CE, KL at T=2,
  hidden-state MSE through a learned projection and attention KL."""
  teacher, student = _bert(64, 2), _bert(32, 1)
  loss_cfg = default.get_config().loss
  for name, value in {'ce': 0.5, 'kl': 0.5, 'hidden_mse': 1.0, 'attention_kl': 1.0}.items():
    loss_cfg.weights[name] = value
  objective = kd_objective.build(
    loss_cfg, STEPS, registry.output_shapes(student), registry.output_shapes(teacher)
  )
  params = {
    'student': registry.init_params(student, jax.random.PRNGKey(0)),
    'kd_heads': objective.init_heads(jax.random.PRNGKey(2)),
  }
  teacher_params = registry.init_params(teacher, jax.random.PRNGKey(1))
  loss_fn = step_lib.distill_loss_fn(student, teacher, objective)
  return loss_fn, jax.device_get(params), jax.device_get(teacher_params)


def _train(setup, mode, **placement):
  loss_fn, params, teacher_params = setup
  dp = parallel.DataParallel(mode=mode, fsdp_min_size=64, **placement)
  # SGD with momentum: Adam's g / (|g| + eps) would turn float-summation-order noise in
  # near-zero gradients into whole learning-rate steps, hiding real mismatches in noise.
  tx = optax.sgd(0.5, momentum=0.9)
  # One trace per mode: a retrace after the first step would fail here.
  step = dp.train_step(chex.assert_max_traces(loss_fn, n=1), tx)
  state = dp.put_state(step_lib.create_state(params, tx, jax.random.PRNGKey(3)))
  teacher = dp.put_teacher(teacher_params)
  history = []
  for batch in _batches():
    state, metrics = step(state, teacher, dp.put_batch(batch))
    history.append({k: float(s) / float(c) for k, (s, c) in jax.device_get(metrics).items()})
  return parallel.to_host(state.params), history, state


@pytest.fixture(scope='module')
def reference(setup):
  return _train(setup, 'single')


def _assert_close(tree, reference_tree, rtol=1e-5, atol=1e-7):
  chex.assert_trees_all_close(tree, reference_tree, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
  'mode,placement',
  [
    ('pmap', {}),
    ('shard_map', {}),
    ('mesh', {}),
    ('mesh', {'params': 'fsdp', 'teacher': 'fsdp'}),
  ],
)
def test_every_path_matches_one_device(setup, reference, mode, placement):
  chex.clear_trace_counter()
  params, history, _ = _train(setup, mode, **placement)
  ref_params, ref_history, _ = reference
  _assert_close(params, ref_params)
  for got, want in zip(history, ref_history):
    assert set(got) == set(want)
    for name in (
      'loss',
      'ce',
      'kl_T',
      'kl_T1',
      'hidden_mse',
      'attention_kl',
      'agreement',
      'grad_norm',
    ):
      assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


def test_fsdp_shards_large_leaves_and_keeps_small_ones_whole(setup):
  chex.clear_trace_counter()
  _, _, state = _train(setup, 'mesh', params='fsdp')
  embedding = state.params['student']['embeddings']['word_embeddings']['embedding']  # [60, 32]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec(None, 'data')
  assert len({str(s.index) for s in embedding.addressable_shards}) == 8  # 8 distinct slices
  bias = state.params['student']['classifier']['bias']  # 2 elements: below fsdp_min_size
  assert bias.sharding.is_fully_replicated


def test_global_batch_must_split_over_devices():
  dp = parallel.DataParallel(mode='mesh')
  with pytest.raises(parallel.ParallelError, match='multiple of 8'):
    dp.local_batch_size(12)
  assert dp.local_batch_size(16) == 16  # one process: it feeds the whole global batch


def test_unknown_mode_is_refused():
  with pytest.raises(parallel.ParallelError, match='valid modes are single, pmap'):
    parallel.DataParallel(mode='ddp')


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert parallel.fsdp_spec((16, 64), 1, 8) == jax.sharding.PartitionSpec(None, 'data')
  assert parallel.fsdp_spec((6, 40), 1, 8) == jax.sharding.PartitionSpec(None, 'data')
  assert parallel.fsdp_spec((6, 10), 1, 8) == jax.sharding.PartitionSpec()  # none divides
  assert parallel.fsdp_spec((64, 64), 10**6, 8) == jax.sharding.PartitionSpec()  # too small


def test_mean_under_a_data_axis_is_a_share_of_the_global_mean():
  """Summed over devices, the per-device means give the global weighted mean."""
  values = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  weights = np.zeros((8, 3), np.float32)
  weights[0] = 1.0
  weights[5, :2] = 1.0  # devices hold 3, 0 and 2 real items

  def share(v, w):
    with losses.data_axis('d'):
      return jax.lax.psum(losses.mean(losses.weighted(v, w)), 'd')

  got = jax.pmap(share, axis_name='d')(values, weights)
  want = (values * weights).sum() / weights.sum()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize('saved_on,restored_on', [('mesh', 'single'), ('single', 'mesh')])
def test_checkpoint_restores_on_another_topology(setup, tmp_path, saved_on, restored_on):
  """A state saved from 8 FSDP-sharded devices restores onto one device, and the reverse,
  with the same values and in the placement of the restoring run."""
  _, params, _ = setup
  tx = optax.sgd(0.1, momentum=0.9)
  state = step_lib.create_state(params, tx, jax.random.PRNGKey(0))
  # Non-trivial optimizer state: one momentum update.
  grads = jax.tree.map(lambda p: np.full(np.shape(p), 0.25, np.float32), params)
  state, _ = step_lib.apply_gradients(state, tx, grads, {})
  place = {
    'mesh': parallel.DataParallel(mode='mesh', params='fsdp', fsdp_min_size=64),
    'single': parallel.DataParallel(mode='single'),
  }
  writer = checkpoint.StageCheckpointer(tmp_path / 'ckpt', keep=1)
  writer.save(7, place[saved_on].put_state(state), {'epoch': 0, 'position': 3})
  writer.wait()
  writer.close()

  fresh = place[restored_on].put_state(step_lib.create_state(params, tx, jax.random.PRNGKey(9)))
  reader = checkpoint.StageCheckpointer(tmp_path / 'ckpt', keep=1)
  restored, position = reader.restore_latest(fresh)
  reader.close()
  assert position == {'epoch': 0, 'position': 3}
  chex.assert_trees_all_equal(parallel.to_host(restored), parallel.to_host(state))
  embedding = restored.params['student']['embeddings']['word_embeddings']['embedding']
  if restored_on == 'mesh':
    assert embedding.sharding.spec == jax.sharding.PartitionSpec(None, 'data')
  else:  # one device's array, or host numpy as the fresh state had
    assert not isinstance(embedding, jax.Array) or len(embedding.devices()) == 1
