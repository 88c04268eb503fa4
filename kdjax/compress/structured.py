"""Structured pruning that physically removes units, so the exported model is smaller:
BiLSTM hidden units, CNN filters, BERT FFN neurons and BERT attention heads.

Each function takes host params and the export's model spec (`model.json`: name, vocab size,
keywords) and returns `(params, spec, kept)`: a model with fewer units, and the indices of the
units kept per pruned layer. Units are ranked by a
magnitude score (the product of the norms of the weights into and out of the unit) and the
best `round(keep_fraction * n)` are kept, in their original order. Dropping a unit equals
zeroing every weight that carries its output to the rest of the network: the kept units then
compute exactly what they computed before (tests/test_structured.py checks this against the
full model with those weights zeroed). Accuracy is recovered by distilling the smaller model
from the teacher (`config.student.init_from=<pruned export>`).
"""

from __future__ import annotations

import copy

import numpy as np

from kdjax.models import from_teacher

LSTM_GATES = ('i', 'f', 'g', 'o')


def _keep(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f'keep_fraction={keep_fraction}: must be in (0, 1]')
  count = max(1, int(round(keep_fraction * len(scores))))
  # Stable: ties keep the lower index, and the kept units stay in their original order.
  return np.sort(np.argsort(-scores, kind='stable')[:count])


def _norms(x: np.ndarray, axis) -> np.ndarray:
  return np.sqrt(np.sum(np.square(np.asarray(x, np.float64)), axis=axis))


def prune_bilstm(params, spec: dict, keep_fraction: float):
  """Keeps the same hidden units in the forward and backward LSTM of every layer (the
  scores of both directions added), slicing gate kernels, the recurrent kernels on both
  sides, the next layer's inputs and the MLP's rows."""
  params = copy.deepcopy(params)
  kwargs = spec['kwargs']
  hidden, layers = kwargs['hidden_size'], kwargs.get('num_layers', 1)
  kept_per_layer = []
  for layer in range(layers):
    cells = [params[f'lstm_{layer}_{d}']['cell'] for d in ('forward', 'backward')]
    scores = np.zeros(hidden)
    for cell in cells:
      for gate in LSTM_GATES:
        scores += _norms(cell[f'i{gate}']['kernel'], 0) * _norms(cell[f'h{gate}']['kernel'], 1)
    keep = _keep(scores, keep_fraction)
    kept_per_layer.append(keep)
    for cell in cells:
      for gate in LSTM_GATES:
        cell[f'i{gate}']['kernel'] = cell[f'i{gate}']['kernel'][:, keep]
        cell[f'h{gate}']['kernel'] = cell[f'h{gate}']['kernel'][np.ix_(keep, keep)]
        cell[f'h{gate}']['bias'] = cell[f'h{gate}']['bias'][keep]
    # The next consumer sees [forward units, backward units] concatenated.
    rows = np.concatenate([keep, hidden + keep])
    if layer + 1 < layers:
      for d in ('forward', 'backward'):
        nxt = params[f'lstm_{layer + 1}_{d}']['cell']
        for gate in LSTM_GATES:
          nxt[f'i{gate}']['kernel'] = nxt[f'i{gate}']['kernel'][rows]
    else:
      params['mlp']['kernel'] = params['mlp']['kernel'][rows]
  new_spec = copy.deepcopy(spec)
  new_spec['kwargs']['hidden_size'] = len(kept_per_layer[0])
  return params, new_spec, {f'lstm_{i}': k for i, k in enumerate(kept_per_layer)}


def prune_cnn(params, spec: dict, keep_fraction: float):
  """Keeps the best filters of each convolution (the same number per width, since the model
  has one `num_filters`), slicing the conv kernels and biases and the MLP's rows."""
  params = copy.deepcopy(params)
  kwargs = spec['kwargs']
  filters, widths = kwargs['num_filters'], len(kwargs.get('kernel_sizes', (3, 4, 5)))
  mlp = params['mlp']['kernel']
  rows, kept = [], {}
  for i in range(widths):
    conv = params[f'conv_{i}']
    block = mlp[i * filters : (i + 1) * filters]
    keep = _keep(_norms(conv['kernel'], (0, 1)) * _norms(block, 1), keep_fraction)
    conv['kernel'], conv['bias'] = conv['kernel'][..., keep], conv['bias'][keep]
    rows.append(i * filters + keep)
    kept[f'conv_{i}'] = keep
  params['mlp']['kernel'] = mlp[np.concatenate(rows)]
  new_spec = copy.deepcopy(spec)
  new_spec['kwargs']['num_filters'] = len(rows[0])
  return params, new_spec, kept


def prune_bert_ffn(params, spec: dict, keep_fraction: float):
  """Keeps the best intermediate (FFN) neurons of every layer, the same count per layer
  (the model has one `intermediate_size`), by |w_in|·|w_out| (from_teacher's score)."""
  params = copy.deepcopy(params)
  layers = spec['kwargs']['num_layers']
  size, kept = None, {}
  for i in range(layers):
    layer = params[f'layer_{i}']
    keep = _keep(
      from_teacher.ffn_neuron_scores(layer['intermediate']['kernel'], layer['output']['kernel']),
      keep_fraction,
    )
    layer['intermediate']['kernel'] = layer['intermediate']['kernel'][:, keep]
    layer['intermediate']['bias'] = layer['intermediate']['bias'][keep]
    layer['output']['kernel'] = layer['output']['kernel'][keep]
    size, kept[f'layer_{i}'] = len(keep), keep
  new_spec = copy.deepcopy(spec)
  new_spec['kwargs']['intermediate_size'] = size
  return params, new_spec, kept


def prune_bert_heads(params, spec: dict, keep_fraction: float):
  """Keeps the best attention heads of every layer, the same count per layer (the model has
  one `num_heads`), by the norm of each head's query/key/value columns times the norm of its
  rows of the output projection; the head width is kept (`head_dim` in the new spec)."""
  params = copy.deepcopy(params)
  kwargs = spec['kwargs']
  heads = kwargs['num_heads']
  head_dim = kwargs.get('head_dim') or kwargs['hidden_size'] // heads
  count, kept = None, {}
  for i in range(kwargs['num_layers']):
    attention = params[f'layer_{i}']['attention']
    per_head = lambda a: a.reshape(a.shape[0], heads, head_dim)  # [in, heads, head_dim]
    into = sum(
      np.square(np.asarray(per_head(attention[n]['kernel']), np.float64)).sum(axis=(0, 2))
      for n in ('query', 'key', 'value')
    )
    out = np.asarray(attention['output']['kernel'], np.float64).reshape(heads, head_dim, -1)
    keep = _keep(np.sqrt(into) * np.sqrt(np.square(out).sum(axis=(1, 2))), keep_fraction)
    columns = (keep[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)
    for n in ('query', 'key', 'value'):
      attention[n]['kernel'] = attention[n]['kernel'][:, columns]
      attention[n]['bias'] = attention[n]['bias'][columns]
    attention['output']['kernel'] = attention['output']['kernel'][columns]
    count, kept[f'layer_{i}'] = len(keep), keep
  new_spec = copy.deepcopy(spec)
  new_spec['kwargs'].update(num_heads=count, head_dim=head_dim)
  return params, new_spec, kept


PRUNERS = {'bilstm': prune_bilstm, 'cnn': prune_cnn, 'bert': prune_bert_ffn}
PRUNERS_BY_PART = {('bert', 'heads'): prune_bert_heads}


def prune(params, spec: dict, keep_fraction: float, part: str = ''):
  """Dispatches on the export's model name (and `part`: 'heads' for a BERT's attention
  heads; its default is the FFN); see the functions above for what each removes."""
  pruner = PRUNERS_BY_PART.get((spec['model'], part)) or (not part and PRUNERS.get(spec['model']))
  if not pruner:
    supported = list(PRUNERS) + [f'{m} ({p})' for m, p in PRUNERS_BY_PART]
    raise ValueError(
      f'structured pruning of a {spec["model"]!r} model{f" ({part})" if part else ""} is not '
      f'supported; supported: {", ".join(supported)}'
    )
  return pruner(params, spec, keep_fraction)
