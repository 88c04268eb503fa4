"""Greedy, beam search and sampling against full-forward references on tiny random models."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import decode
from kdjax.models.seq2seq import Seq2SeqTransformer

BOS, EOS, PAD = 1, 2, 0
MAX_LEN = 8
ALPHA = 0.6


def _model(vocab: int = 13, **overrides) -> Seq2SeqTransformer:
  fields = dict(
    vocab_size=vocab,
    d_model=32,
    num_heads=2,
    enc_layers=1,
    dec_layers=1,
    d_ff=64,
    max_len=16,
    share_embeddings=False,
    tie_output=False,
  )
  return Seq2SeqTransformer(**{**fields, **overrides})


def _init(model, seed: int, eos_bias: float):
  """Random params; a bias on EOS makes rows end at varied lengths instead of never."""
  ids = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), ids, ids, ids, ids, deterministic=True)['params']
  params['output']['bias'] = params['output']['bias'].at[EOS].set(eos_bias)
  return params


def _sources():
  """Six rows of source ids with padding; row 1 is all padding but one token."""
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 13, size=(6, 7)).astype(np.int32)
  lengths = np.array([7, 1, 4, 6, 2, 5])
  mask = (np.arange(7)[None, :] < lengths[:, None]).astype(np.int32)
  return jnp.asarray(ids * mask), jnp.asarray(mask)


@pytest.fixture(scope='module')
def setup():
  model = _model()
  return model, _init(model, 0, 1.5), *_sources()


def _token_log_probs(model, params, src, src_mask, tokens, lengths) -> np.ndarray:
  """Reference: log-probs of `tokens` [B, L] from one teacher-forced full forward pass, 0 after
  each row's length."""
  tokens = np.asarray(tokens)
  tgt_in = np.concatenate([np.full((tokens.shape[0], 1), BOS), tokens[:, :-1]], axis=1)
  valid = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
  logits, _ = model.apply(
    {'params': params},
    src,
    src_mask,
    jnp.asarray(tgt_in, jnp.int32),
    jnp.asarray(valid, jnp.int32),
    deterministic=True,
  )
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  picked = np.take_along_axis(log_probs, tokens[:, :, None], axis=-1)[:, :, 0]
  return np.where(valid, picked, 0.0)


def _penalised(model, params, src, src_mask, tokens, lengths) -> np.ndarray:
  total = _token_log_probs(model, params, src, src_mask, tokens, lengths).sum(axis=1)
  return total / ((5.0 + np.asarray(lengths)) / 6.0) ** ALPHA


def _check_layout(tokens, lengths, max_len=MAX_LEN):
  """EOS ends a row (only there), pad after it, lengths count up to and including EOS."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  assert tokens.shape[1] == max_len and tokens.dtype == np.int32
  for row, length in zip(tokens, lengths):
    assert 1 <= length <= max_len
    assert EOS not in row[: length - 1]
    assert (row[length:] == PAD).all()
    if length < max_len:
      assert row[length - 1] == EOS


def test_greedy_layout_and_teacher_forced_argmax(setup):
  model, params, src, src_mask = setup
  tokens, lengths = decode.greedy_decode(model, params, src, src_mask, max_len=MAX_LEN)
  _check_layout(tokens, lengths)
  lengths = np.asarray(lengths)
  assert (lengths < MAX_LEN).any() and (lengths > 1).any(), lengths  # the test covers both
  # Independent reference: every greedy token is the argmax of the full forward pass.
  tokens = np.asarray(tokens)
  tgt_in = np.concatenate([np.full((6, 1), BOS), tokens[:, :-1]], axis=1)
  logits, _ = model.apply(
    {'params': params},
    src,
    src_mask,
    jnp.asarray(tgt_in),
    jnp.ones_like(tgt_in),
    deterministic=True,
  )
  valid = np.arange(MAX_LEN)[None, :] < lengths[:, None]
  np.testing.assert_array_equal(np.where(valid, np.argmax(logits, -1), PAD), tokens)


def test_rows_do_not_depend_on_the_batch(setup):
  model, params, src, src_mask = setup
  greedy = decode.greedy_decode(model, params, src, src_mask, max_len=MAX_LEN)
  beam = decode.beam_search(model, params, src, src_mask, beam_size=3, max_len=MAX_LEN)
  for row in (1, 4):  # row 1: a single real source token
    alone = (src[row : row + 1], src_mask[row : row + 1])
    one = decode.greedy_decode(model, params, *alone, max_len=MAX_LEN)
    np.testing.assert_array_equal(one[0][0], greedy[0][row])
    assert one[1][0] == greedy[1][row]
    one = decode.beam_search(model, params, *alone, beam_size=3, max_len=MAX_LEN)
    np.testing.assert_array_equal(one[0][0], beam[0][row])
    np.testing.assert_allclose(one[2][0], beam[2][row], atol=1e-5)


@pytest.mark.parametrize('alpha', [ALPHA, 5.0])
def test_beam_size_one_is_greedy(setup, alpha):
  """A strong length penalty would let a longer beam overtake greedy's finished hypothesis if
  the row did not stop once its pool is full."""
  model, params, src, src_mask = setup
  greedy = decode.greedy_decode(model, params, src, src_mask, max_len=MAX_LEN)
  tokens, lengths, _ = decode.beam_search(
    model, params, src, src_mask, beam_size=1, length_penalty=alpha, max_len=MAX_LEN
  )
  np.testing.assert_array_equal(tokens, greedy[0])
  np.testing.assert_array_equal(lengths, greedy[1])


def test_beam_score_matches_forward_and_beats_greedy(setup):
  model, params, src, src_mask = setup
  tokens, lengths, scores = decode.beam_search(
    model, params, src, src_mask, beam_size=4, length_penalty=ALPHA, max_len=MAX_LEN
  )
  _check_layout(tokens, lengths)
  beam_scores = _penalised(model, params, src, src_mask, tokens, lengths)
  np.testing.assert_allclose(scores, beam_scores, atol=1e-4)
  greedy = decode.greedy_decode(model, params, src, src_mask, max_len=MAX_LEN)
  greedy_scores = _penalised(model, params, src, src_mask, *greedy)
  assert (beam_scores >= greedy_scores - 1e-5).all(), (beam_scores, greedy_scores)
  assert (beam_scores > greedy_scores + 1e-3).any()  # beam search actually did something


def _all_hypotheses(vocab: int, max_len: int):
  """Every sequence beam search can return: non-EOS prefix then EOS, or max_len without EOS."""
  others = [t for t in range(vocab) if t != EOS]
  for length in range(1, max_len + 1):
    for prefix in itertools.product(others, repeat=length - 1):
      yield list(prefix) + [EOS], length
      if length == max_len:
        for last in others:
          yield list(prefix) + [last], length


def test_beam_search_equals_exhaustive_search():
  vocab, max_len = 5, 3
  model = _model(vocab, max_len=4)
  params = _init(model, 3, 0.0)
  src = jnp.array([[3, 4, 3], [4, 0, 0]], jnp.int32)
  src_mask = jnp.array([[1, 1, 1], [1, 0, 0]], jnp.int32)
  hypotheses = list(_all_hypotheses(vocab, max_len))
  tokens = np.array([h + [PAD] * (max_len - len(h)) for h, _ in hypotheses], np.int32)
  lengths = np.array([n for _, n in hypotheses])
  for row in range(2):
    rows = (jnp.repeat(src[row : row + 1], len(hypotheses), 0),) * 1 + (
      jnp.repeat(src_mask[row : row + 1], len(hypotheses), 0),
    )
    scores = _penalised(model, params, *rows, tokens, lengths)
    best = int(np.argmax(scores))
    # 100 beams hold every one of the 4**2 * 5 = 80 hypotheses of the last step.
    got, got_len, got_score = decode.beam_search(
      model,
      params,
      src[row : row + 1],
      src_mask[row : row + 1],
      beam_size=100,
      length_penalty=ALPHA,
      max_len=max_len,
    )
    np.testing.assert_array_equal(got[0], tokens[best])
    assert got_len[0] == lengths[best]
    np.testing.assert_allclose(got_score[0], scores[best], atol=1e-5)


def test_sample_top_k_one_is_greedy_and_reproducible(setup):
  model, params, src, src_mask = setup
  greedy = decode.greedy_decode(model, params, src, src_mask, max_len=MAX_LEN)
  rng = jax.random.PRNGKey(7)
  tokens, lengths, _ = decode.sample(model, params, src, src_mask, rng, top_k=1, max_len=MAX_LEN)
  np.testing.assert_array_equal(tokens, greedy[0])
  np.testing.assert_array_equal(lengths, greedy[1])
  # A vanishing nucleus keeps only the top token too.
  tokens, _, _ = decode.sample(model, params, src, src_mask, rng, top_p=1e-6, max_len=MAX_LEN)
  np.testing.assert_array_equal(tokens, greedy[0])


def test_sample_log_probs_match_forward(setup):
  model, params, src, src_mask = setup
  rng = jax.random.PRNGKey(3)
  kwargs = dict(temperature=0.7, top_k=5, top_p=0.9, max_len=MAX_LEN)
  tokens, lengths, log_probs = decode.sample(model, params, src, src_mask, rng, **kwargs)
  _check_layout(tokens, lengths)
  again = decode.sample(model, params, src, src_mask, rng, **kwargs)
  for a, b in zip((tokens, lengths, log_probs), again):
    np.testing.assert_array_equal(a, b)
  other = decode.sample(model, params, src, src_mask, jax.random.PRNGKey(4), **kwargs)
  assert not np.array_equal(tokens, other[0])
  # Log-probs are under the unmodified T=1 distribution, not the filtered one.
  expected = _token_log_probs(model, params, src, src_mask, tokens, lengths)
  np.testing.assert_allclose(log_probs, expected, atol=1e-5)


def test_compiled_decoders_are_reused(setup):
  model, params, src, src_mask = setup
  decode.greedy_decode(model, params, src, src_mask, max_len=MAX_LEN)
  hits = decode._build_greedy.cache_info().hits
  compiled = decode._build_greedy(model, BOS, EOS, PAD, MAX_LEN)
  traces = compiled._cache_size()
  decode.greedy_decode(model, params, src, src_mask, max_len=MAX_LEN)
  assert decode._build_greedy.cache_info().hits == hits + 2
  assert compiled._cache_size() == traces  # same shapes: no new trace


def test_bad_arguments_raise(setup):
  model, params, src, src_mask = setup
  with pytest.raises(ValueError, match='beam_size'):
    decode.beam_search(model, params, src, src_mask, beam_size=0, max_len=MAX_LEN)
  with pytest.raises(ValueError, match='max_len'):
    decode.greedy_decode(model, params, src, src_mask, max_len=model.max_len + 1)
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='temperature'):
    decode.sample(model, params, src, src_mask, rng, temperature=0.0, max_len=MAX_LEN)
  for top_p in (0.0, 1.5):
    with pytest.raises(ValueError, match='top_p'):
      decode.sample(model, params, src, src_mask, rng, top_p=top_p, max_len=MAX_LEN)
