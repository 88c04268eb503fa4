"""Named model presets: ConfigDict(model=<registry name>, kwargs=..., path, init_from, init_layers)."""

import ml_collections


def _preset(model: str, **kwargs) -> ml_collections.ConfigDict:
  # path / init_from are part of every role's schema (see configs/default.py), so a preset
  # can replace config.teacher or config.student whole.
  if model == 'bert':
    # 0: hidden_size // num_heads. A key of its own so a head-pruned export (kdjax.structured_prune
    # --part=heads) can be trained further: --config.student.kwargs.head_dim=<its width>.
    kwargs.setdefault('head_dim', 0)
  return ml_collections.ConfigDict(
    {'model': model, 'kwargs': kwargs, 'path': '', 'init_from': '', 'init_layers': ()}
  )


def bert_small() -> ml_collections.ConfigDict:
  """A 2-layer BERT trained from scratch: the teacher that fits a 2-core CPU budget."""
  return _preset(
    'bert',
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    intermediate_size=512,
    max_len=64,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
  )


def bert_tiny() -> ml_collections.ConfigDict:
  return _preset(
    'bert',
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    intermediate_size=128,
    max_len=64,
    dropout_rate=0.1,
    attention_dropout_rate=0.0,
  )


def minilm_l6() -> ml_collections.ConfigDict:
  """all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads); set init_from='minilm'."""
  return _preset(
    'bert',
    hidden_size=384,
    num_layers=6,
    num_heads=12,
    intermediate_size=1536,
    max_len=512,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
  )


def bilstm_small() -> ml_collections.ConfigDict:
  """Tang et al. (2019)-style BiLSTM student, narrowed to CPU scale."""
  return _preset(
    'bilstm', embed_dim=128, hidden_size=128, num_layers=1, mlp_dim=128, dropout_rate=0.1
  )


def cnn_small() -> ml_collections.ConfigDict:
  """Kim (2014) CNN student."""
  return _preset(
    'cnn', embed_dim=128, num_filters=100, kernel_sizes=(3, 4, 5), mlp_dim=128, dropout_rate=0.1
  )


PRESETS = {
  'bert_small': bert_small,
  'bert_tiny': bert_tiny,
  'minilm_l6': minilm_l6,
  'bilstm_small': bilstm_small,
  'cnn_small': cnn_small,
}
