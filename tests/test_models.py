"""Model shapes, padding invariance, attention against NumPy, registry errors.

conftest.py sets jax_numpy_rank_promotion='raise' for the whole suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.models import MODELS, build_model, count_params, init_params, param_bytes
from kdjax.models.bert import BertEncoder

VOCAB, CLASSES = 50, 3
TINY = {
  'bert': dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_len=32),
  'bilstm': dict(embed_dim=8, hidden_size=8, mlp_dim=8, num_layers=2),
  'cnn': dict(embed_dim=8, num_filters=6, mlp_dim=8, kernel_sizes=(2, 3)),
}
NAMES = sorted(TINY)


def key(seed):
  # 'rbg' keys compile far faster than the default threefry on CPU (dropout and
  # initialisers sample many tensors), which keeps this file well under a minute.
  return jax.random.key(seed, impl='rbg')


def make_batch(lengths, seq_len, seed=0):
  """Right-padded ids: [CLS]=2 at position 0, random words, pad id 0 after the length."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, size=(len(lengths), seq_len))
  ids[:, 0] = 2
  mask = (np.arange(seq_len)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  return jnp.asarray(ids * mask, jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope='module')
def built():
  """name -> (model, params), initialised once for the whole file."""
  result = {}
  for i, name in enumerate(NAMES):
    model = build_model(name, VOCAB, CLASSES, **TINY[name])
    result[name] = (model, init_params(model, key(i)))
  return result


_JITTED = {}


def apply(model, params, ids, mask, deterministic=True, seed=0):
  """model.apply under one cached jit per (model, deterministic): eager dispatch of
  every op is what makes CPU tests slow, and shared shapes then hit the cache."""
  cache_key = (model, deterministic)
  if cache_key not in _JITTED:
    _JITTED[cache_key] = jax.jit(
      lambda p, i, m, rng: model.apply(
        {'params': p}, i, m, deterministic=deterministic, rngs={'dropout': rng}
      )
    )
  return _JITTED[cache_key](params, ids, mask, key(seed))


def expected_shapes(name, batch, seq_len):
  cfg = TINY[name]
  if name == 'bert':
    d, h = cfg['hidden_size'], cfg['num_heads']
    shapes = {'embeddings': (batch, seq_len, d), 'pooled': (batch, d)}
    for i in range(cfg['num_layers'] + 1):
      shapes[f'hidden_{i}'] = (batch, seq_len, d)
    for i in range(1, cfg['num_layers'] + 1):
      shapes[f'attn_{i}'] = (batch, h, seq_len, seq_len)
      for projection in ('query', 'key', 'value'):
        shapes[f'{projection}_{i}'] = (batch, seq_len, d)
  elif name == 'bilstm':
    d = 2 * cfg['hidden_size']
    shapes = {'embeddings': (batch, seq_len, cfg['embed_dim']), 'pooled': (batch, d)}
    for i in range(1, cfg['num_layers'] + 1):
      shapes[f'hidden_{i}'] = (batch, seq_len, d)
  else:
    f = cfg['num_filters']
    shapes = {
      'embeddings': (batch, seq_len, cfg['embed_dim']),
      'pooled': (batch, f * len(cfg['kernel_sizes'])),
    }
    for i in range(1, len(cfg['kernel_sizes']) + 1):
      shapes[f'hidden_{i}'] = (batch, seq_len, f)
  return shapes


@pytest.mark.parametrize('name', NAMES)
def test_output_shapes(built, name):
  model, params = built[name]
  ids, mask = make_batch([5, 8, 1], 8)
  logits, out = apply(model, params, ids, mask)
  assert logits.shape == (3, CLASSES)
  assert {k: v.shape for k, v in out.items()} == expected_shapes(name, 3, 8)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in [logits, *out.values()])


@pytest.mark.parametrize('name', NAMES)
def test_extra_padding_changes_nothing_real(built, name):
  model, params = built[name]
  lengths = [4, 7, 8]
  ids, mask = make_batch(lengths, 8)
  ids_long = jnp.pad(ids, ((0, 0), (0, 5)))
  mask_long = jnp.pad(mask, ((0, 0), (0, 5)))
  logits, out = apply(model, params, ids, mask)
  logits_long, out_long = apply(model, params, ids_long, mask_long)
  np.testing.assert_allclose(logits_long, logits, atol=1e-5)
  np.testing.assert_allclose(out_long['pooled'], out['pooled'], atol=1e-5)
  for key in out:
    if key.startswith('hidden_'):
      for row, n in enumerate(lengths):
        np.testing.assert_allclose(out_long[key][row, :n], out[key][row, :n], atol=1e-5)


def test_attention_is_a_distribution_over_real_keys(built):
  model, params = built['bert']
  ids, mask = make_batch([3, 6, 8], 8)
  _, out = apply(model, params, ids, mask)
  for layer in (1, 2):
    probs = np.asarray(out[f'attn_{layer}'])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    padded_keys = np.asarray(mask)[:, None, None, :] == 0
    assert np.all(np.where(padded_keys, probs, 0.0) == 0.0)


@pytest.mark.parametrize('name', NAMES)
def test_dropout_only_when_not_deterministic(built, name):
  model, params = built[name]
  ids, mask = make_batch([6, 4, 8], 8)
  det_a, _ = apply(model, params, ids, mask, deterministic=True, seed=1)
  det_b, _ = apply(model, params, ids, mask, deterministic=True, seed=2)
  np.testing.assert_array_equal(det_a, det_b)
  drop_a, _ = apply(model, params, ids, mask, deterministic=False, seed=1)
  drop_b, _ = apply(model, params, ids, mask, deterministic=False, seed=2)
  assert not np.allclose(drop_a, det_a)
  assert not np.allclose(drop_a, drop_b)


def test_jit_matches_eager(built):
  # Every other test runs its model under jax.jit (see `apply`); eager execution is
  # only compared on the CNN because op-by-op dispatch of the others is slow on CPU.
  model, params = built['cnn']
  ids, mask = make_batch([4, 7, 8], 8)
  logits, out = apply(model, params, ids, mask)
  eager_logits, eager_out = model.apply({'params': params}, ids, mask, deterministic=True)
  np.testing.assert_allclose(logits, eager_logits, atol=1e-5)
  assert set(out) == set(eager_out)


def test_bert_mean_pooling_reads_the_average_of_real_tokens(built):
  """pooling='mean' feeds the pooler the masked mean of the last hidden states (NumPy here),
  with the same parameters as [CLS] pooling, and padding cannot move it."""
  _, params = built['bert']
  model = build_model('bert', VOCAB, CLASSES, **TINY['bert'], pooling='mean')
  lengths = [3, 8, 5]
  ids, mask = make_batch(lengths, 8)
  logits, out = apply(model, params, ids, mask)
  last = np.asarray(out[f'hidden_{TINY["bert"]["num_layers"]}'])
  means = np.stack([last[row, :n].mean(axis=0) for row, n in enumerate(lengths)])
  pooler = params['pooler']
  expected = np.tanh(means @ np.asarray(pooler['kernel']) + np.asarray(pooler['bias']))
  np.testing.assert_allclose(out['pooled'], expected, atol=1e-5)
  classifier = params['classifier']
  np.testing.assert_allclose(
    logits, expected @ np.asarray(classifier['kernel']) + np.asarray(classifier['bias']), atol=1e-5
  )
  padded = apply(model, params, jnp.pad(ids, ((0, 0), (0, 4))), jnp.pad(mask, ((0, 0), (0, 4))))
  np.testing.assert_allclose(padded[0], logits, atol=1e-5)
  cls_model, _ = built['bert']
  assert not np.allclose(apply(cls_model, params, ids, mask)[0], logits)
  with pytest.raises(ValueError, match=r"pooling='max' is unknown; valid: \('cls', 'mean'\)"):
    init_params(build_model('bert', VOCAB, CLASSES, **TINY['bert'], pooling='max'), key(0))


def test_registry_errors():
  with pytest.raises(ValueError, match=r"unknown model 'gpt'.*'bert'.*'bilstm'.*'cnn'"):
    build_model('gpt', VOCAB, CLASSES)
  with pytest.raises(ValueError, match=r"unknown argument.*'hiden_size'.*hidden_size"):
    build_model('bert', VOCAB, CLASSES, **TINY['bert'], hiden_size=4)
  with pytest.raises(ValueError, match=r"needs argument.*'mlp_dim'"):
    build_model('cnn', VOCAB, CLASSES, embed_dim=4, num_filters=2)
  with pytest.raises(ValueError) as err:
    build_model('bilstm', VOCAB, CLASSES, embed_dim=4, hidden_size=4, mlp_dim=4, width=3)
  assert '\n' not in str(err.value)
  assert set(MODELS) == {'bert', 'bilstm', 'cnn'}
  # Lists from configs become tuples so the module stays hashable.
  assert build_model(
    'cnn', VOCAB, CLASSES, embed_dim=4, num_filters=2, mlp_dim=4, kernel_sizes=[3, 5]
  ).kernel_sizes == (3, 5)


def test_param_counts_and_bytes(built):
  model, params = built['cnn']
  cfg = TINY['cnn']
  e, f, m = cfg['embed_dim'], cfg['num_filters'], cfg['mlp_dim']
  expected = (
    VOCAB * e
    + sum(k * e * f + f for k in cfg['kernel_sizes'])
    + 2 * f * m
    + m
    + m * CLASSES
    + CLASSES
  )
  assert count_params(params) == expected
  assert param_bytes(params) == 4 * expected


@pytest.mark.parametrize(
  'name, kwargs, expected',
  [
    ('bert', dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512), 2_527_362),
    ('bilstm', dict(embed_dim=128, hidden_size=128, mlp_dim=128), 2_344_322),
    ('cnn', dict(embed_dim=128, num_filters=100, mlp_dim=128), 2_240_686),
  ],
)
def test_reference_model_sizes(name, kwargs, expected):
  model = build_model(name, 16000, 2, **kwargs)
  # eval_shape traces init without compiling or allocating the 16k-word embeddings.
  shapes = jax.eval_shape(lambda: init_params(model, key(0)))
  assert count_params(shapes) == expected


def _numpy_attention(layer_params, hidden, mask, num_heads):
  """Independent float64 reference for one self-attention block's probabilities."""
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), layer_params['attention'])
  x = np.asarray(hidden, np.float64)
  batch, seq_len, d = x.shape
  head_dim = d // num_heads

  def heads(name):
    y = x @ p[name]['kernel'] + p[name]['bias']
    return y.reshape(batch, seq_len, num_heads, head_dim).transpose(0, 2, 1, 3)

  scores = heads('query') @ heads('key').transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  scores = np.where(np.asarray(mask)[:, None, None, :] > 0, scores, -np.inf)
  scores = scores - scores.max(-1, keepdims=True)
  weights = np.exp(scores)
  return weights / weights.sum(-1, keepdims=True)


def test_bert_attention_matches_numpy(built):
  model, params = built['bert']
  ids, mask = make_batch([7, 4, 8], 8, seed=3)
  _, out = apply(model, params, ids, mask)
  for i in range(TINY['bert']['num_layers']):
    reference = _numpy_attention(
      params[f'layer_{i}'], out[f'hidden_{i}'], mask, TINY['bert']['num_heads']
    )
    np.testing.assert_allclose(out[f'attn_{i + 1}'], reference, atol=1e-5)


def test_bert_encoder_shares_the_classifier_layout(built):
  model, params = built['bert']
  encoder = BertEncoder(VOCAB, **TINY['bert'])
  ids, mask = make_batch([5, 8, 3], 8)
  # eval_shape: only the parameter tree is needed, not initialised values.
  encoder_shapes = jax.eval_shape(lambda: encoder.init(key(0), ids, mask, deterministic=True))[
    'params'
  ]
  # The classifier is the encoder plus pooler/classifier at the top level.
  assert set(params) - set(encoder_shapes) == {'pooler', 'classifier'}
  shared = {k: params[k] for k in encoder_shapes}
  assert jax.tree_util.tree_map(lambda x: x.shape, shared) == jax.tree_util.tree_map(
    lambda x: x.shape, dict(encoder_shapes)
  )
  encode = jax.jit(
    lambda p, types: encoder.apply({'params': p}, ids, mask, types, deterministic=True)
  )
  sequence, enc_out = encode(shared, None)
  _, out = apply(model, params, ids, mask)
  np.testing.assert_allclose(sequence, out['hidden_2'], atol=1e-6)
  assert 'pooled' not in enc_out
  # Token types are an optional third argument and do change the output.
  with_types, _ = encode(shared, jnp.ones_like(ids))
  assert not np.allclose(with_types, sequence)


def test_lstm_sequence_alone_equals_sequence_in_longer_batch(built):
  model, params = built['bilstm']
  ids, mask = make_batch([4, 8, 7], 8, seed=5)
  logits_batch, out_batch = apply(model, params, ids, mask)
  logits_alone, out_alone = apply(model, params, ids[:1, :4], mask[:1, :4])
  np.testing.assert_allclose(logits_batch[:1], logits_alone, atol=1e-5)
  np.testing.assert_allclose(out_batch['hidden_2'][:1, :4], out_alone['hidden_2'], atol=1e-5)
  # Padded steps are zeroed, not left holding stale LSTM carries.
  assert np.all(np.asarray(out_batch['hidden_2'])[0, 4:] == 0.0)
