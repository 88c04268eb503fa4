"""Model lookup by name, construction with validated keywords, and size helpers."""

import dataclasses
from typing import Any, Dict, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.compress import lowrank
from kdjax.models.bert import BertClassifier
from kdjax.models.bilstm import BiLSTMClassifier
from kdjax.models.cnn import CNNClassifier

MODELS: Dict[str, Type[nn.Module]] = {
  'bert': BertClassifier,
  'bilstm': BiLSTMClassifier,
  'cnn': CNNClassifier,
}
# Every nn.Module dataclass carries these; they are not model hyperparameters.
_MODULE_FIELDS = ('parent', 'name')


def low_rank_models() -> list[str]:
  """Names of the models whose Dense layers a `low_rank` keyword can factorise."""
  return sorted(n for n, cls in MODELS.items() if 'low_rank' in _fields(cls))


def _hashable(value):
  """Lists (from configs and JSON, at any depth) as tuples: module fields must be hashable."""
  return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fields(cls: Type[nn.Module]) -> Dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _MODULE_FIELDS}


def build_model(name: str, vocab_size: int, num_classes: int, **kwargs) -> nn.Module:
  """MODELS[name](vocab_size=..., num_classes=..., **kwargs) with one-line errors."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; valid names: {sorted(MODELS)}')
  cls = MODELS[name]
  fields = _fields(cls)
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(
      f'unknown argument(s) {unknown} for model {name!r}; valid fields: {sorted(fields)}'
    )
  kwargs = dict(kwargs, vocab_size=vocab_size, num_classes=num_classes)
  missing = sorted(
    n
    for n, f in fields.items()
    if n not in kwargs
    and f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
  )
  if missing:
    raise ValueError(f'model {name!r} needs argument(s) {missing}')
  # Configs and JSON specs hand over lists; module fields should be hashable tuples.
  kwargs = {k: _hashable(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  low_rank = kwargs.get('low_rank', ())
  if not low_rank:
    return cls(**kwargs)
  low_rank = lowrank.normalise_low_rank(low_rank, f'model {name!r} low_rank')
  model = cls(**{**kwargs, 'low_rank': low_rank})
  # Once here, not in the modules: a path the model lacks would silently build a full Dense.
  lowrank.check_low_rank_paths(low_rank, dense_paths(model), f'model {name!r}')
  return model


def _dummy_inputs(batch_size: int, seq_len: int):
  input_ids = jnp.full((batch_size, seq_len), 2, dtype=jnp.int32)  # [CLS] id
  attention_mask = jnp.ones((batch_size, seq_len), dtype=jnp.int32)
  return input_ids, attention_mask


def dense_paths(model: nn.Module, batch_size: int = 2, seq_len: int = 16) -> list[str]:
  """The model's Dense layer paths ('layer_0/attention/query', 'classifier', ...): the paths
  its `low_rank` keyword may name."""
  seq_len = min(seq_len, getattr(model, 'max_len', seq_len))  # BERT rejects longer inputs
  return lowrank.dense_paths(model, *_dummy_inputs(batch_size, seq_len), deterministic=True)


def init_params(model: nn.Module, rng: jax.Array, batch_size: int = 2, seq_len: int = 16) -> Any:
  """Parameters from dummy all-real int32 inputs (deterministic, so no dropout rng)."""
  input_ids, attention_mask = _dummy_inputs(batch_size, seq_len)
  # jit: tracing once is far cheaper than dispatching every init op eagerly.
  init = jax.jit(
    lambda key, ids, mask: model.init({'params': key}, ids, mask, deterministic=True)['params']
  )
  return init(rng, input_ids, attention_mask)


def output_shapes(model: nn.Module, batch_size: int = 2, seq_len: int = 16) -> Dict[str, tuple]:
  """Shapes of `logits` and of every `out` entry, without running the model (eval_shape)."""
  input_ids, attention_mask = _dummy_inputs(batch_size, seq_len)
  (logits, out), _ = jax.eval_shape(
    lambda: model.init_with_output(
      {'params': jax.random.PRNGKey(0)}, input_ids, attention_mask, deterministic=True
    )
  )
  return {'logits': logits.shape, **{k: v.shape for k, v in out.items()}}


def count_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def param_bytes(params: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))
