"""Initialise a smaller student from a trained teacher's parameters (`init_from='teacher'`).

Starting a student from the teacher's own weights keeps what pre-training and fine-tuning
put there; distillation then only has to repair what shrinking removed.
  * BERT student (same hidden width and heads as the teacher): student layer i copies
    teacher layer `layer_map[i]` (DistilBERT takes every other layer); a narrower FFN keeps
    the intermediate neurons with the largest |w_in|·|w_out| (structured pruning); a
    factorised word embedding (`embedding_size` < hidden) starts from the best rank-e
    approximation (SVD) of the teacher's table; the position table is cut to max_len.
  * BiLSTM/CNN student: the word embedding starts from a PCA of the teacher's table to the
    student's embed_dim (Tang et al. 2019 start theirs from word2vec for the same reason).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from kdjax.compress import embeddings as emb_compress


def uniform_layer_map(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
  """Evenly spaced teacher layers ending at the last one, e.g. 6 -> 2: (2, 5)."""
  if not 1 <= student_layers <= teacher_layers:
    raise ValueError(
      f'a student with {student_layers} layers cannot copy from {teacher_layers} teacher layers'
    )
  step = teacher_layers / student_layers
  return tuple(int(round(step * (i + 1))) - 1 for i in range(student_layers))


def ffn_neuron_scores(intermediate_kernel: np.ndarray, output_kernel: np.ndarray) -> np.ndarray:
  """Importance of each FFN neuron: |its input weights| · |its output weights|."""
  return np.linalg.norm(intermediate_kernel, axis=0) * np.linalg.norm(output_kernel, axis=1)


def teacher_word_table(teacher: dict) -> np.ndarray:
  """A BERT's [vocab, hidden] input word embeddings, multiplied out if factorised."""
  words = teacher['embeddings']['word_embeddings']['embedding']
  if 'word_projection' in teacher['embeddings']:  # a factorised teacher: multiply it out
    words = words @ teacher['embeddings']['word_projection']['kernel']
  return np.asarray(words)


def _layer_from_teacher(t_layer: dict, s_layer: dict) -> dict:
  out = jax.tree_util.tree_map(np.asarray, t_layer)
  width = s_layer['intermediate']['kernel'].shape[1]
  if width != t_layer['intermediate']['kernel'].shape[1]:
    scores = ffn_neuron_scores(t_layer['intermediate']['kernel'], t_layer['output']['kernel'])
    keep = np.sort(np.argsort(-scores, kind='stable')[:width])
    out['intermediate'] = {
      'kernel': out['intermediate']['kernel'][:, keep],
      'bias': out['intermediate']['bias'][keep],
    }
    out['output'] = dict(out['output'], kernel=out['output']['kernel'][keep, :])
  return out


def bert_from_teacher(
  teacher: dict, student: dict, layer_map: Sequence[int] = ()
) -> tuple[dict, dict]:
  """A BERT student's params (shapes of `student`) filled from a BERT teacher's."""
  t_layers = sorted(int(k.split('_')[1]) for k in teacher if k.startswith('layer_'))
  s_layers = sorted(int(k.split('_')[1]) for k in student if k.startswith('layer_'))
  layer_map = tuple(layer_map) or uniform_layer_map(len(t_layers), len(s_layers))
  if len(layer_map) != len(s_layers) or not all(0 <= i < len(t_layers) for i in layer_map):
    raise ValueError(
      f'init_layers={layer_map} must name {len(s_layers)} teacher layers in 0..{len(t_layers) - 1}'
    )
  t_hidden = teacher['layer_0']['attention']['query']['kernel'].shape
  s_hidden = student['layer_0']['attention']['query']['kernel'].shape
  if t_hidden != s_hidden:
    raise ValueError(
      f'student attention {s_hidden} differs from the teacher {t_hidden}: copying layers '
      'needs the same hidden size (shrink heads with structured pruning instead)'
    )
  params = {k: jax.tree_util.tree_map(np.asarray, v) for k, v in teacher.items()}
  params = {k: v for k, v in params.items() if not k.startswith('layer_')}
  for s_index, t_index in zip(s_layers, layer_map):
    params[f'layer_{s_index}'] = _layer_from_teacher(
      teacher[f'layer_{t_index}'], student[f'layer_{s_index}']
    )
  s_emb, t_emb = student['embeddings'], params['embeddings']
  embeddings = dict(t_emb)
  embeddings.pop('word_projection', None)
  if 'word_projection' in s_emb:
    rank = s_emb['word_embeddings']['embedding'].shape[1]
    table, projection = emb_compress.svd_factorise(teacher_word_table(teacher), rank)
    embeddings['word_embeddings'] = {'embedding': table}
    embeddings['word_projection'] = {'kernel': projection}
  else:
    embeddings['word_embeddings'] = {'embedding': teacher_word_table(teacher)}
  positions = s_emb['position_embeddings']['embedding'].shape[0]
  embeddings['position_embeddings'] = {
    'embedding': t_emb['position_embeddings']['embedding'][:positions]
  }
  params['embeddings'] = embeddings
  return _cast_like(params, student), {'layer_map': list(layer_map)}


def embedding_from_teacher(teacher: dict, student: dict) -> tuple[dict, dict]:
  """A BiLSTM/CNN student with its `embedding` table started from a PCA of the teacher's."""
  table = teacher_word_table(teacher)
  target = student['embedding']['embedding']
  if target.shape[0] != table.shape[0]:
    raise ValueError(
      f'student vocabulary {target.shape[0]} differs from the teacher {table.shape[0]}; '
      "use the teacher's tokenizer (data.tokenizer='wordpiece')"
    )
  width = target.shape[1]
  if width > table.shape[1]:
    raise ValueError(
      f'student embed_dim={width} exceeds the teacher width {table.shape[1]}; a PCA of the '
      "teacher's embeddings can give at most that many dimensions"
    )
  if width == table.shape[1]:
    reduced, retained = table, 1.0
  else:
    reduced, pca = emb_compress.pca_reduce(table, width)
    retained = float(pca['explained_variance_ratio'])
    # Keep the student's init scale: PCA coordinates are far larger than a fresh table's.
    reduced = reduced * (np.std(target) / max(float(np.std(reduced)), 1e-12))
  params = dict(student, embedding={'embedding': reduced})
  return _cast_like(params, student), {'embedding_pca_retained_variance': retained}


def _cast_like(params: Any, like: Any) -> Any:
  """`params` with the structure check and dtypes of `like` (the student's fresh init)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  got = {jax.tree_util.keystr(k): v for k, v in flat}
  flat_like, treedef = jax.tree_util.tree_flatten_with_path(like)
  out = []
  for path, leaf in flat_like:
    key = jax.tree_util.keystr(path)
    if key not in got:
      raise ValueError(f'teacher provides no value for student parameter {key}')
    value = np.asarray(got[key])
    if value.shape != leaf.shape:
      raise ValueError(f'student parameter {key}: teacher gives {value.shape}, need {leaf.shape}')
    out.append(value.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def student_from_teacher(
  model_name: str, teacher: dict, student: dict, layer_map: Sequence[int] = ()
) -> tuple[dict, dict]:
  if model_name == 'bert':
    return bert_from_teacher(teacher, student, layer_map)
  if layer_map:
    raise ValueError(f'init_layers applies to bert students only, not {model_name!r}')
  return embedding_from_teacher(teacher, student)
