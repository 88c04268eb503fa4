"""Corpus BLEU with sacrebleu, so scores are comparable with published Multi30k numbers.

Hypotheses and references are detokenised text (what `SubwordTokenizer.decode_batch` gives
and what the raw Multi30k files hold); sacrebleu's default 13a tokenisation is applied
inside, and its signature string records exactly how the score was computed.
"""

from __future__ import annotations

from typing import Sequence


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
  """BLEU (0-100) of `hypotheses` against one reference each, plus sacrebleu's details:
  `signature`, n-gram `precisions` (%), brevity penalty `bp`, `sys_len`, `ref_len`."""
  from sacrebleu.metrics import BLEU

  if len(hypotheses) != len(references):
    raise ValueError(
      f'corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references; '
      'need exactly one reference per hypothesis'
    )
  if not hypotheses:
    raise ValueError('corpus_bleu: no hypotheses; need at least one sentence pair')
  metric = BLEU()
  score = metric.corpus_score(list(hypotheses), [list(references)])
  return {
    'bleu': float(score.score),
    'signature': str(metric.get_signature()),
    'precisions': [float(p) for p in score.precisions],
    'bp': float(score.bp),
    'sys_len': int(score.sys_len),
    'ref_len': int(score.ref_len),
  }
