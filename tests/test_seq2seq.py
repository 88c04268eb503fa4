"""Seq2SeqTransformer: outputs, masking and cached incremental decoding vs full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.models.seq2seq import Seq2SeqTransformer

SRC = np.array([[5, 6, 7, 8, 9, 3], [4, 0, 0, 0, 0, 0], [3, 4, 5, 0, 0, 0]], np.int32)
SRC_MASK = (SRC > 0).astype(np.int32)
TGT = np.array([[1, 6, 7, 4, 3], [1, 5, 2, 0, 0], [1, 3, 3, 9, 2]], np.int32)
TGT_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)


def _model(**overrides) -> Seq2SeqTransformer:
  fields = dict(
    vocab_size=11, d_model=32, num_heads=2, enc_layers=2, dec_layers=2, d_ff=64, max_len=12
  )
  return Seq2SeqTransformer(**{**fields, **overrides})


def _init(model, seed=0):
  return model.init(jax.random.PRNGKey(seed), SRC, SRC_MASK, TGT, TGT_MASK, deterministic=True)[
    'params'
  ]


def _forward(model, params, src=SRC, src_mask=SRC_MASK, tgt=TGT, tgt_mask=TGT_MASK):
  return model.apply({'params': params}, src, src_mask, tgt, tgt_mask, deterministic=True)


@pytest.fixture(scope='module')
def tied():
  model = _model()
  return model, _init(model)


def test_output_shapes_and_keys(tied):
  model, params = tied
  logits, out = _forward(model, params)
  assert logits.shape == (3, 5, 11) and logits.dtype == jnp.float32
  (b, s), t, h, d = SRC.shape, TGT.shape[1], 2, 32
  expected = {'encoder_output': (b, s, d), 'decoder_output': (b, t, d)}
  for i in range(3):
    expected[f'encoder_hidden_{i}'] = (b, s, d)
    expected[f'decoder_hidden_{i}'] = (b, t, d)
  for i in (1, 2):
    expected[f'encoder_attn_{i}'] = (b, h, s, s)
    expected[f'self_attn_{i}'] = (b, h, t, t)
    expected[f'cross_attn_{i}'] = (b, h, t, s)
  assert {k: v.shape for k, v in out.items()} == expected
  # Attention rows are distributions that give padded source keys no weight.
  np.testing.assert_allclose(out['cross_attn_1'].sum(-1), 1.0, atol=1e-5)
  assert float(jnp.abs(out['encoder_attn_2'] * (1 - SRC_MASK[:, None, None, :])).max()) == 0.0
  assert set(params) == {
    'src_embed',
    'encoder_layers_0',
    'encoder_layers_1',
    'encoder_norm',
    'decoder_layers_0',
    'decoder_layers_1',
    'decoder_norm',
  }  # tied and shared: one embedding table, no output layer, sinusoid has no params


def test_decoder_is_causal_and_ignores_padded_target_keys(tied):
  model, params = tied
  logits, out = _forward(model, params)
  future = TGT.copy()
  future[:, 3] = 10
  changed, _ = _forward(model, params, tgt=future)
  np.testing.assert_array_equal(changed[:, :3], logits[:, :3])
  assert not np.allclose(changed[:, 3], logits[:, 3])
  assert float(jnp.abs(jnp.triu(out['self_attn_2'], k=1)).max()) == 0.0
  # A padded key in the middle of a target is invisible to every later query.
  holed = TGT_MASK.copy()
  holed[:, 1] = 0
  base, _ = _forward(model, params, tgt_mask=holed)
  other = TGT.copy()
  other[:, 1] = 9
  swapped, _ = _forward(model, params, tgt=other, tgt_mask=holed)
  np.testing.assert_allclose(swapped[:, 2:], base[:, 2:], atol=1e-6)


def test_padded_source_tokens_do_not_matter(tied):
  model, params = tied
  logits, _ = _forward(model, params)
  garbage = np.where(SRC_MASK > 0, SRC, 7).astype(np.int32)
  np.testing.assert_allclose(_forward(model, params, src=garbage)[0], logits, atol=1e-6)
  # More padding columns change nothing either.
  wider = np.pad(SRC, ((0, 0), (0, 3)))
  wider_mask = np.pad(SRC_MASK, ((0, 0), (0, 3)))
  np.testing.assert_allclose(
    _forward(model, params, src=wider, src_mask=wider_mask)[0], logits, atol=1e-5
  )


def _incremental_logits(model, params, tgt) -> np.ndarray:
  """Teacher-forced decoding through the cache, one decode_step per position."""
  variables = {'params': params}
  memory = model.apply(variables, SRC, SRC_MASK, method='encode')
  cache = model.apply(variables, memory, SRC_MASK, model.max_len, method='init_cache')
  step = jax.jit(
    lambda c, tok, pos: model.apply(variables, c, SRC_MASK, tok, pos, method='decode_step')
  )
  logits = []
  for position in range(tgt.shape[1]):
    step_logits, cache = step(cache, tgt[:, position], jnp.int32(position))
    logits.append(step_logits)
  return np.stack(logits, axis=1)


@pytest.mark.parametrize(
  'overrides',
  [{}, {'share_embeddings': False, 'tie_output': False, 'tgt_vocab_size': 9}],
  ids=['tied', 'untied'],
)
def test_incremental_decoding_equals_full_forward(overrides):
  model = _model(**overrides)
  params = _init(model, seed=1)
  tgt = np.minimum(TGT, 8)  # valid ids for the 9-token target vocabulary
  full, _ = _forward(model, params, tgt=tgt)
  assert full.shape[-1] == model.target_vocab_size
  cached = _incremental_logits(model, params, tgt)
  valid = TGT_MASK > 0  # positions after a row's target padding are not comparable
  np.testing.assert_allclose(cached[valid], np.asarray(full)[valid], atol=1e-5)


def test_cache_layout(tied):
  model, params = tied
  variables = {'params': params}
  memory = model.apply(variables, SRC, SRC_MASK, method='encode')
  np.testing.assert_allclose(memory, _forward(model, params)[1]['encoder_output'], atol=1e-6)
  cache = model.apply(variables, memory, SRC_MASK, 7, method='init_cache')
  shapes = {k: v.shape for k, v in cache.items()}
  for i in (1, 2):
    assert shapes[f'self_k_{i}'] == shapes[f'self_v_{i}'] == (3, 7, 2, 16)
    assert shapes[f'cross_k_{i}'] == shapes[f'cross_v_{i}'] == (3, 6, 2, 16)
  assert len(shapes) == 8
  # Beams reorder the cache along axis 0; decode_step then follows the reordered rows.
  order = jnp.array([2, 0, 1])
  reordered = jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, order, axis=0), cache)
  logits, _ = model.apply(
    variables, reordered, SRC_MASK[order], TGT[order, 0], jnp.int32(0), method='decode_step'
  )
  full, _ = _forward(model, params)
  np.testing.assert_allclose(logits, full[order, 0], atol=1e-5)


def test_dropout_and_bfloat16():
  model = _model(dropout_rate=0.5)
  params = _init(model)
  clean, _ = _forward(model, params)
  noisy, _ = model.apply(
    {'params': params},
    SRC,
    SRC_MASK,
    TGT,
    TGT_MASK,
    deterministic=False,
    rngs={'dropout': jax.random.PRNGKey(1)},
  )
  assert not np.allclose(clean, noisy)
  half = _model(dtype=jnp.bfloat16)
  logits, out = _forward(half, params)
  assert logits.dtype == jnp.float32 and out['decoder_output'].dtype == jnp.bfloat16
  np.testing.assert_allclose(logits, clean, atol=0.15)


def test_bad_configurations_raise():
  with pytest.raises(ValueError, match='share_embeddings'):
    _init(_model(tgt_vocab_size=9))
  with pytest.raises(ValueError, match='exceeds max_len'):
    _init(_model(max_len=4))
