"""Students initialised from a teacher: layer maps, FFN pruning, factorised embeddings."""

import jax
import numpy as np
import pytest

from kdjax.models import from_teacher, registry

VOCAB = 50
TEACHER = dict(
  hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, max_len=32, dropout_rate=0.0
)


def _bert(**overrides):
  kwargs = dict(TEACHER, **overrides)
  return registry.build_model('bert', vocab_size=VOCAB, num_classes=2, **kwargs)


def _inputs(seed=0, batch=4, length=12):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  return ids, mask


@pytest.fixture(scope='module')
def teacher():
  model = _bert()
  return model, jax.device_get(registry.init_params(model, jax.random.PRNGKey(0)))


def _student(teacher_params, layer_map=(), **overrides):
  model = _bert(**overrides)
  fresh = jax.device_get(registry.init_params(model, jax.random.PRNGKey(5)))
  params, info = from_teacher.student_from_teacher('bert', teacher_params, fresh, layer_map)
  return model, params, info


def test_uniform_layer_map():
  assert from_teacher.uniform_layer_map(6, 2) == (2, 5)
  assert from_teacher.uniform_layer_map(6, 3) == (1, 3, 5)
  assert from_teacher.uniform_layer_map(4, 4) == (0, 1, 2, 3)
  with pytest.raises(ValueError, match='cannot copy'):
    from_teacher.uniform_layer_map(2, 3)


def test_same_shape_student_reproduces_the_teacher(teacher):
  model, t_params = teacher
  s_model, s_params, _ = _student(t_params)
  ids, mask = _inputs()
  t_logits, _ = model.apply({'params': t_params}, ids, mask)
  s_logits, _ = s_model.apply({'params': s_params}, ids, mask)
  np.testing.assert_array_equal(np.asarray(s_logits), np.asarray(t_logits))


def test_layer_map_copies_the_named_layers(teacher):
  _, t_params = teacher
  _, s_params, info = _student(t_params, layer_map=(3, 1), num_layers=2)
  assert info['layer_map'] == [3, 1]
  for s_index, t_index in ((0, 3), (1, 1)):
    same = jax.tree_util.tree_map(
      np.array_equal, s_params[f'layer_{s_index}'], t_params[f'layer_{t_index}']
    )
    assert all(jax.tree_util.tree_leaves(same))
  with pytest.raises(ValueError, match='init_layers'):
    _student(t_params, layer_map=(0, 9), num_layers=2)


def test_ffn_pruning_keeps_the_strongest_neurons_and_their_function(teacher):
  model, t_params = teacher
  t_params = jax.tree_util.tree_map(np.array, t_params)
  # Make neuron importance unambiguous: scale some neurons' input weights up.
  strong = np.array([3, 17, 40, 99, 100, 127])
  for i in range(TEACHER['num_layers']):
    t_params[f'layer_{i}']['intermediate']['kernel'][:, strong] *= 10.0
  s_model, s_params, _ = _student(t_params, intermediate_size=len(strong))
  for i in range(TEACHER['num_layers']):
    np.testing.assert_array_equal(
      s_params[f'layer_{i}']['intermediate']['kernel'],
      t_params[f'layer_{i}']['intermediate']['kernel'][:, strong],
    )
  # The pruned student computes exactly what the teacher computes with the other neurons
  # silenced (their output weights zeroed).
  silenced = jax.tree_util.tree_map(np.array, t_params)
  drop = np.setdiff1d(np.arange(TEACHER['intermediate_size']), strong)
  for i in range(TEACHER['num_layers']):
    silenced[f'layer_{i}']['output']['kernel'][drop, :] = 0.0
  ids, mask = _inputs(1)
  expected, _ = model.apply({'params': silenced}, ids, mask)
  got, _ = s_model.apply({'params': s_params}, ids, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_factorised_embeddings_at_full_rank_match_and_low_rank_is_svd(teacher):
  model, t_params = teacher
  # rank = vocabulary size (50 < hidden 64): the factorisation is exact.
  s_model, s_params, _ = _student(t_params, embedding_size=VOCAB)
  ids, mask = _inputs(2)
  t_logits, _ = model.apply({'params': t_params}, ids, mask)
  s_logits, _ = s_model.apply({'params': s_params}, ids, mask)
  np.testing.assert_allclose(np.asarray(s_logits), np.asarray(t_logits), atol=1e-4)
  # Rank 8: the product is the best rank-8 approximation (Eckart–Young error).
  _, low, _ = _student(t_params, embedding_size=8)
  emb = low['embeddings']
  product = emb['word_embeddings']['embedding'] @ emb['word_projection']['kernel']
  table = t_params['embeddings']['word_embeddings']['embedding']
  singular = np.linalg.svd(table.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(
    np.linalg.norm(table - product), np.sqrt(np.sum(singular[8:] ** 2)), rtol=1e-4
  )


def test_position_table_is_cut_to_the_student_max_len(teacher):
  _, t_params = teacher
  _, s_params, _ = _student(t_params, max_len=16)
  np.testing.assert_array_equal(
    s_params['embeddings']['position_embeddings']['embedding'],
    t_params['embeddings']['position_embeddings']['embedding'][:16],
  )


def test_width_mismatch_is_refused(teacher):
  _, t_params = teacher
  with pytest.raises(ValueError, match='same hidden size'):
    _student(t_params, hidden_size=32, num_heads=4)


def test_bilstm_embedding_starts_from_teacher_pca(teacher):
  _, t_params = teacher
  student = registry.build_model(
    'bilstm', vocab_size=VOCAB, num_classes=2, embed_dim=16, hidden_size=8, mlp_dim=8
  )
  fresh = jax.device_get(registry.init_params(student, jax.random.PRNGKey(3)))
  params, info = from_teacher.student_from_teacher('bilstm', t_params, fresh)
  table = t_params['embeddings']['word_embeddings']['embedding'].astype(np.float64)
  centred = table - table.mean(0)
  _, singular, vt = np.linalg.svd(centred, full_matrices=False)
  # The top-16 principal coordinates, each column up to sign, all up to one common scale.
  reduced = params['embedding']['embedding'].astype(np.float64)
  coords = centred @ vt[:16].T
  ratio = np.abs(reduced) / np.abs(coords)
  np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-3)
  assert 0 < info['embedding_pca_retained_variance'] <= 1
  assert np.isclose(
    info['embedding_pca_retained_variance'], np.sum(singular[:16] ** 2) / np.sum(singular**2)
  )
  # The rest of the student keeps its fresh initialisation.
  np.testing.assert_array_equal(params['classifier']['kernel'], fresh['classifier']['kernel'])
  wrong_vocab = registry.build_model(
    'bilstm', vocab_size=VOCAB + 1, num_classes=2, embed_dim=16, hidden_size=8, mlp_dim=8
  )
  with pytest.raises(ValueError, match='vocabulary'):
    from_teacher.student_from_teacher(
      'bilstm', t_params, jax.device_get(registry.init_params(wrong_vocab, jax.random.PRNGKey(0)))
    )
