"""Word-embedding compression of the MiniLM teacher: PCA and SVD to narrower widths.

How much of each probe word's cosine-similarity neighbourhood survives when the teacher's
30,522 x 384 word-embedding table is cut to a student width:
  python experiments/embedding_compression.py [--widths 64,128,192] [--k 10] \
      [--out runs/embedding_compression.json]

  * PCA (`pca_reduce`, centred): the narrow table a BiLSTM/CNN student starts from.
  * SVD (`svd_factorise`, uncentred, split='left'): the factorised [V, r] @ [r, D] form a
    BERT student uses; with split='left' the rows of the [V, r] factor have the cosine
    similarities of the rank-r product, so their neighbours are the product's.
The full width (384) is always added as a reference row: for SVD it must give overlap 1.0;
for PCA it measures what centring alone does to cosine neighbourhoods.
"Before" neighbours are those of the original table. Special tokens ([PAD], [CLS], [SEP],
[MASK], [UNK], [unused*]) are never neighbours; the PCA/SVD themselves use every row, as a
student initialised from them would.
Prints markdown tables and writes everything (neighbour lists included) to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

# A plain script run from the repository root: make `kdjax` importable without installing.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kdjax.compress import embeddings as emb  # noqa: E402
from kdjax.data.wordpiece import WordPieceTokenizer  # noqa: E402
from kdjax.models.hf_bert import minilm_dir  # noqa: E402

TABLE_KEY = 'embeddings.word_embeddings.weight'
# Sentiment words (the SST-2 task) and everyday nouns/adjectives of several kinds, so both
# the polarity structure and plain topical similarity are probed. Each must be one token.
PROBES = (
  'good',
  'bad',
  'great',
  'terrible',
  'excellent',
  'awful',
  'boring',
  'funny',
  'love',
  'happy',
  'sad',
  'movie',
  'film',
  'actor',
  'music',
  'dark',
  'city',
  'dog',
  'red',
  'king',
)
ENERGY_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
FLOAT32_BYTES = 4


def probe_ids(tokenizer: WordPieceTokenizer, words) -> list[int]:
  """The single WordPiece id of each word; raises if any word splits or is unknown."""
  ids, bad = [], []
  for word in words:
    enc = tokenizer.encode(word, 16)
    pieces = tokenizer.tokens(enc[1:-1])
    if len(enc) != 3 or pieces != [word]:
      bad.append(f'{word!r} -> {pieces}')
    else:
      ids.append(int(enc[1]))
  if bad:
    raise SystemExit(f'probe words that are not single WordPiece tokens: {", ".join(bad)}')
  return ids


def special_ids(tokenizer: WordPieceTokenizer) -> np.ndarray:
  tokens = tokenizer.tokens(range(len(tokenizer)))
  return np.array([i for i, t in enumerate(tokens) if t.startswith('[') and t.endswith(']')])


def sizes(vocab: int, dim: int, width: int, centred: bool) -> dict:
  narrow = vocab * width
  factorised = vocab * width + width * dim + (dim if centred else 0)  # + the PCA mean
  return {
    'narrow_table_params': narrow,
    'narrow_table_bytes': narrow * FLOAT32_BYTES,
    'factorised_params': factorised,
    'factorised_bytes': factorised * FLOAT32_BYTES,
    'factorised_vs_full': factorised / (vocab * dim),
  }


def evaluate(method, table, width, probes, before_ids, exclude, k, tokenizer):
  start = time.perf_counter()
  if method == 'pca':
    reduced, info = emb.pca_reduce(table, width)
    retained = info['explained_variance_ratio']
  else:
    reduced, _ = emb.svd_factorise(table, width, split='left')
    retained = None  # filled by the caller from the uncentred singular values
  decompose_s = time.perf_counter() - start
  ids, sims = emb.nearest_neighbours(reduced, probes, k, exclude)
  per_probe = [
    emb.neighbour_overlap(before_ids[i : i + 1], ids[i : i + 1]) for i in range(len(probes))
  ]
  return {
    'method': method,
    'width': width,
    'retained': retained,
    'overlap': emb.neighbour_overlap(before_ids, ids),
    'per_probe_overlap': per_probe,
    'neighbours': [tokenizer.tokens(row) for row in ids],
    'similarities': np.round(sims, 4).tolist(),
    'decompose_s': round(decompose_s, 2),
    **sizes(table.shape[0], table.shape[1], width, centred=method == 'pca'),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--widths', default='64,128,192', help='comma-separated target widths')
  parser.add_argument('--k', type=int, default=10, help='neighbours per probe word')
  parser.add_argument('--out', default='runs/embedding_compression.json')
  parser.add_argument(
    '--show', default='good,bad,movie,king', help='probe words whose lists are printed'
  )
  args = parser.parse_args(argv)

  from safetensors.numpy import load_file

  t0 = time.perf_counter()
  folder = minilm_dir()
  table = load_file(str(folder / 'model.safetensors'))[TABLE_KEY]
  tokenizer = WordPieceTokenizer.load(folder)
  vocab, dim = table.shape
  if len(tokenizer) != vocab:
    raise SystemExit(f'tokenizer has {len(tokenizer)} tokens but the table {vocab} rows')
  try:
    widths = sorted({int(w) for w in args.widths.split(',') if w.strip()} | {dim})
  except ValueError:
    raise SystemExit(f'--widths={args.widths!r}: need comma-separated integers') from None
  if widths[0] < 1 or widths[-1] > dim:
    raise SystemExit(f'--widths must lie in [1, {dim}], got {args.widths}')
  show = [w for w in args.show.split(',') if w]
  if not set(show) <= set(PROBES):
    raise SystemExit(f'--show: {sorted(set(show) - set(PROBES))} are not probe words')

  probes = probe_ids(tokenizer, PROBES)
  exclude = special_ids(tokenizer)
  before_ids, before_sims = emb.nearest_neighbours(table, probes, args.k, exclude)
  uncentred = np.linalg.svd(table.astype(np.float64), compute_uv=False)
  _, pca_full = emb.pca_reduce(table, 1)  # all centred singular values, for the energy ranks
  centred = pca_full['singular_values']

  rows = []
  for method in ('pca', 'svd'):
    for width in widths:
      row = evaluate(method, table, width, probes, before_ids, exclude, args.k, tokenizer)
      if method == 'svd':
        row['retained'] = float(np.sum(uncentred[:width] ** 2) / np.sum(uncentred**2))
      rows.append(row)
      print(f'{method} {width}: overlap@{args.k} {row["overlap"]:.3f}', file=sys.stderr)

  result = {
    'source': str(folder),
    'table': TABLE_KEY,
    'shape': [vocab, dim],
    'full_params': vocab * dim,
    'full_bytes': vocab * dim * FLOAT32_BYTES,
    'k': args.k,
    'excluded_special_tokens': int(exclude.size),
    'probes': list(PROBES),
    'before': {
      'neighbours': [tokenizer.tokens(row) for row in before_ids],
      'similarities': np.round(before_sims, 4).tolist(),
    },
    'ranks_for_energy': {
      'pca_centred_variance': {str(t): emb.rank_for_energy(centred, t) for t in ENERGY_THRESHOLDS},
      'svd_uncentred_energy': {
        str(t): emb.rank_for_energy(uncentred, t) for t in ENERGY_THRESHOLDS
      },
    },
    'rows': rows,
    'wall_s': round(time.perf_counter() - t0, 1),
    'machine': f'{platform.machine()} {platform.processor() or ""}'.strip(),
    'numpy': np.__version__,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + '\n')

  k = args.k
  print(f'# MiniLM word embeddings {vocab} x {dim} ({vocab * dim:,} params), k = {k}\n')
  print(
    f'| method | width | retained | mean overlap@{k} | min / max per probe | '
    'narrow table params | factorised params (vs full) |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    print(
      f'| {r["method"]} | {r["width"]} | {r["retained"]:.4f} | {r["overlap"]:.3f} | '
      f'{min(r["per_probe_overlap"]):.1f} / {max(r["per_probe_overlap"]):.1f} | '
      f'{r["narrow_table_params"]:,} | {r["factorised_params"]:,} '
      f'({r["factorised_vs_full"]:.2f}x) |'
    )
  print('\nretained: PCA = share of the centred variance; SVD = share of sum(s^2), uncentred.')
  print('\n## Width needed to keep a share of the energy\n')
  print('| share | PCA (centred variance) | SVD (uncentred) |')
  print('|---:|---:|---:|')
  energy = result['ranks_for_energy']
  for t in ENERGY_THRESHOLDS:
    print(
      f'| {t} | {energy["pca_centred_variance"][str(t)]} | '
      f'{energy["svd_uncentred_energy"][str(t)]} |'
    )
  print(f'\n## Per-probe overlap@{k}\n')
  header = [f'{r["method"]} {r["width"]}' for r in rows]
  print('| probe | ' + ' | '.join(header) + ' |')
  print('|---|' + '---:|' * len(rows))
  for i, word in enumerate(PROBES):
    print(f'| {word} | ' + ' | '.join(f'{r["per_probe_overlap"][i]:.1f}' for r in rows) + ' |')
  for word in show:
    i = PROBES.index(word)
    print(f'\n## Neighbours of {word!r}\n')
    print(f'- original: {", ".join(result["before"]["neighbours"][i])}')
    for r in rows:
      if r['width'] != dim:
        print(f'- {r["method"]} {r["width"]}: {", ".join(r["neighbours"][i])}')
  print(f'\nwrote {out} ({result["wall_s"]} s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
