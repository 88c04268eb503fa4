"""Transfer-set augmentation for distillation (Tang et al. 2019, "Distilling Task-Specific
Knowledge from BERT into Simple Neural Networks", section 3.3).

Distillation only needs the teacher's outputs, not gold labels, so a student can learn from
many more inputs than the labelled set holds. Per word of a training sentence, with
probability `mask_prob` it becomes [MASK], else with `replace_prob` it is swapped for a word
drawn from the training set's unigram distribution; then, with probability `ngram_prob`,
the sentence is cut to a random n-gram (n uniform in 1..5). Tang et al. swap a word for
another of the same part of speech; kdjax ships no tagger, so the swap here is by unigram
frequency, a weaker but label-free substitute. Copies equal to their source or to an earlier
copy are dropped.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

MASK_TOKEN = '[MASK]'
MAX_NGRAM = 5


def augment(
  sentences: Sequence[str],
  copies: int,
  seed: int,
  mask_prob: float = 0.1,
  replace_prob: float = 0.1,
  ngram_prob: float = 0.25,
) -> list[str]:
  """Up to `copies` distinct augmented versions of each sentence, in sentence order.

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
      replacements = rng.choice(len(vocab), size=len(words), p=freqs)
      new = [
        MASK_TOKEN if u < mask_prob else vocab[r] if u < mask_prob + replace_prob else w
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
