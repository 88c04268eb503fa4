"""Transfer-set augmentation for distillation (Tang et al. 2019, "Distilling Task-Specific
Knowledge from BERT into Simple Neural Networks", section 3.3).

Distillation only needs the teacher's outputs, not gold labels, so a student can learn from
many more inputs than the labelled set holds. Per word of a training sentence, with
probability `mask_prob` it becomes [MASK], else with `replace_prob` it is swapped for a word
drawn from the training set's unigram distribution; then, with probability `ngram_prob`,
the sentence is cut to a random n-gram (n uniform in 1..5). Tang et al. swap a word for
another of the same part of speech; kdjax ships no tagger, so the default swap is by unigram
frequency, a weaker but label-free substitute. The alternative (`neighbours`, built by
`embedding_neighbours`) swaps a word for one of its nearest words in the teacher's own input
embedding table, as TinyBERT (Jiao et al. 2020) does with GloVe neighbours: the copy stays
close to a real sentence while the teacher relabels whatever the swap changed. Copies equal
to their source or to an earlier copy are dropped.
"""

from __future__ import annotations

import collections
from typing import Mapping, Sequence

import numpy as np

from kdjax.compress import embeddings as emb_compress

MASK_TOKEN = '[MASK]'
MAX_NGRAM = 5


def augment(
  sentences: Sequence[str],
  copies: int,
  seed: int,
  mask_prob: float = 0.1,
  replace_prob: float = 0.1,
  ngram_prob: float = 0.25,
  neighbours: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
  """Up to `copies` distinct augmented versions of each sentence, in sentence order.

  `neighbours` (word -> candidate words, e.g. from `embedding_neighbours`): a replaced word
  becomes one of its candidates, drawn uniformly, and a word with none stays as it is; None
  draws the replacement from the unigram distribution.
  A pure function of its arguments, so a teacher-output cache keyed on the resulting token
  ids is shared by every run that uses the same settings.
  """
  for name, p in (
    ('mask_prob', mask_prob),
    ('replace_prob', replace_prob),
    ('ngram_prob', ngram_prob),
  ):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f'augment: {name}={p} is not a probability in [0, 1]')
  if mask_prob + replace_prob > 1.0:
    raise ValueError(f'augment: mask_prob + replace_prob = {mask_prob + replace_prob} exceeds 1')
  if copies < 0:
    raise ValueError(f'augment: copies={copies} must be >= 0')
  rng = np.random.default_rng(seed)
  counts = collections.Counter(w for s in sentences for w in s.split())
  vocab = sorted(counts)  # sorted: the draw must not depend on dict order
  freqs = np.asarray([counts[w] for w in vocab], np.float64)
  freqs /= freqs.sum()
  seen = set(sentences)
  out = []
  for sentence in sentences:
    words = sentence.split()
    if not words:
      continue
    for _ in range(copies):
      draws = rng.random(len(words))
      if neighbours is None:
        replacements = [vocab[r] for r in rng.choice(len(vocab), size=len(words), p=freqs)]
      else:
        picks = rng.random(len(words))
        replacements = [_pick(neighbours.get(w, ()), u, w) for w, u in zip(words, picks)]
      new = [
        MASK_TOKEN if u < mask_prob else r if u < mask_prob + replace_prob else w
        for w, u, r in zip(words, draws, replacements)
      ]
      if rng.random() < ngram_prob and len(new) > 1:
        n = int(rng.integers(1, min(MAX_NGRAM, len(new)) + 1))
        start = int(rng.integers(0, len(new) - n + 1))
        new = new[start : start + n]
      text = ' '.join(new)
      if text not in seen:
        seen.add(text)
        out.append(text)
  return out


def _pick(candidates: Sequence[str], u: float, word: str) -> str:
  """The candidate at uniform draw `u` in [0, 1), or `word` itself when there is none."""
  return candidates[int(u * len(candidates))] if candidates else word


def embedding_neighbours(
  words: Sequence[str], vocab: Mapping[str, int], table: np.ndarray, k: int
) -> dict[str, tuple[str, ...]]:
  """{word: its k most cosine-similar whole words} under the embedding `table` [V, D] of
  `vocab` (token -> row), for every one of `words` that is itself a whole-word token.

  Word pieces ('##ing') and bracketed specials ([PAD], [MASK], [unused0]) are never
  candidates, and a piece or special is never a query: a sentence word that splits into
  several pieces has no single row to compare. Ties are broken by id, so the map is a pure
  function of its arguments.
  """
  if table.ndim != 2 or table.shape[0] < len(vocab):
    raise ValueError(
      f'embedding_neighbours: table of shape {table.shape} does not hold a row for each of '
      f'the {len(vocab)} vocabulary tokens'
    )
  excluded = {i for t, i in vocab.items() if t.startswith('##') or _is_special(t)}
  queries = sorted({w for w in words if w in vocab and vocab[w] not in excluded})
  if not queries:
    return {}
  token = {i: t for t, i in vocab.items()}
  ids, _ = emb_compress.nearest_neighbours(
    table, [vocab[w] for w in queries], k, exclude_ids=sorted(excluded)
  )
  return {w: tuple(token[int(i)] for i in row) for w, row in zip(queries, ids)}


def _is_special(token: str) -> bool:
  return len(token) > 2 and token.startswith('[') and token.endswith(']')
