"""A compact on-disk artifact of a compressed model, whose size on disk is its real size.

An artifact is a directory with two files:
  * `weights.npz`: every array of the parameters, uncompressed (`np.savez`, no pickled
    objects), each under its '/'-joined parameter path plus a suffix (':values', ':scale',
    ...). 8-bit QTensor values are stored as int8, 4-bit ones packed two per byte with
    `quantize.pack_int4`, and leaves selected by `sparse_rules` as a bit-packed mask
    (`np.packbits`) plus their nonzero entries only, where that is smaller than dense.
  * `artifact.json`: the model spec as given, the SHA-256 of `weights.npz` and a manifest with,
    for each leaf in tree order, its path, kind, shape, storage and QTensor static fields.

`load` rebuilds the nested dicts with QTensor leaves (or float32 arrays), and `materialize`
dequantizes them so a Flax model can run on the loaded parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import zipfile
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.compress import quantize as quantize_lib
from kdjax.compress import rules as rules_lib

WEIGHTS = 'weights.npz'
MANIFEST = 'artifact.json'
FORMAT = 'kdjax-artifact'
VERSION = 1
# Bytes one more array costs in the .npz beyond its data (zip entry + .npy header, about 200);
# sparse storage adds an array (the mask), so it must save at least this much to be chosen.
_ARRAY_OVERHEAD = 256


class ArtifactError(ValueError):
  """An artifact is missing, corrupt or inconsistent; the one-line message names the file."""


def _is_q(x) -> bool:
  return isinstance(x, quantize_lib.QTensor)


# ------------------------------------------------------------------------------------------------
# Tree walking (nested dicts only, so the structure is rebuilt from the paths alone)


def _walk(tree, prefix=()):
  """(key tuple, leaf) for every leaf in insertion order; an empty dict yields (keys, None)."""
  if not isinstance(tree, Mapping):
    raise ValueError(f'artifact.save: need nested dicts of arrays, got {type(tree).__name__}')
  if not tree and prefix:
    yield prefix, None
  for key, child in tree.items():
    if not isinstance(key, str) or not key or '/' in key or ':' in key:
      raise ValueError(
        f'artifact.save: key {key!r} under {"/".join(prefix) or "the root"} must be a '
        "non-empty string without '/' or ':'"
      )
    if isinstance(child, Mapping):
      yield from _walk(child, prefix + (key,))
    else:
      yield prefix + (key,), child


def _sparse_flags(params, sparse_rules: Sequence[str]) -> dict[str, bool]:
  """'/'-joined path -> selected by `sparse_rules` (QTensors count as one leaf)."""
  proxy = jax.tree_util.tree_map(lambda x: x.values if _is_q(x) else x, params, is_leaf=_is_q)
  flags = rules_lib.match(proxy, sparse_rules, 'artifact.save sparse_rules')
  return dict(zip(rules_lib.param_paths(proxy), jax.tree_util.tree_leaves(flags)))


# ------------------------------------------------------------------------------------------------
# Encoding


def _nonzero_mask(values, fill):
  """Entries that differ from `fill` (bitwise for floats, so -0.0 is kept)."""
  mask = values != fill
  if np.issubdtype(values.dtype, np.floating):
    mask = mask | np.signbit(values)
  return mask


def _encode_values(values, bits, fill, sparse_ok: bool):
  """Arrays (suffix -> array) and manifest fields for one value array (dense or sparse)."""
  n = values.size

  def data(v):
    return quantize_lib.pack_int4(v) if bits == 4 else v.reshape(-1)

  def nbytes(count):
    return (count + 1) // 2 if bits == 4 else count * values.dtype.itemsize

  if sparse_ok:
    mask = _nonzero_mask(values, fill).reshape(-1)
    nnz = int(mask.sum())
    if math.ceil(n / 8) + nbytes(nnz) + _ARRAY_OVERHEAD < nbytes(n):
      kept = values.reshape(-1)[mask]
      arrays = {'mask': np.packbits(mask), 'nonzero': data(kept)}
      return arrays, {'storage': 'sparse', 'nnz': nnz}
  return {'values': data(values)}, {'storage': 'dense'}


def _encode(keys, leaf, sparse: bool, float16: bool):
  name = '/'.join(keys)
  entry = {'path': list(keys)}
  if leaf is None:
    entry['kind'] = 'empty'
    return entry, {}
  if _is_q(leaf):
    values = np.asarray(leaf.values)
    scale = np.asarray(leaf.scale, np.float32)
    zero_point = np.asarray(leaf.zero_point, np.int32)
    if values.dtype != np.int8:
      raise ValueError(f'artifact.save: {name}: QTensor values must be int8, got {values.dtype}')
    fill = np.broadcast_to(zero_point, values.shape).astype(np.int8)
    arrays, fields = _encode_values(values, leaf.bits, fill, sparse)
    arrays.update(scale=scale, zero_point=zero_point)
    entry.update(
      kind='qtensor',
      shape=list(values.shape),
      bits=int(leaf.bits),
      symmetric=bool(leaf.symmetric),
      axis=leaf.axis,
      scale_shape=list(scale.shape),
      zero_point_shape=list(zero_point.shape),
      **fields,
    )
  else:
    arr = np.asarray(leaf)
    if arr.dtype == object:
      raise ValueError(f'artifact.save: {name}: not a numeric array ({type(leaf).__name__})')
    is_float = jnp.issubdtype(arr.dtype, jnp.floating)
    if sparse and not is_float:
      raise ValueError(f'artifact.save: {name}: sparse storage needs a float array or QTensor')
    stored = arr.astype(np.float16 if float16 else np.float32) if is_float else arr
    fill = np.zeros((), stored.dtype)
    arrays, fields = _encode_values(stored, 8, fill, sparse)
    entry.update(
      kind='array',
      shape=list(arr.shape),
      dtype=str(arr.dtype),
      stored_dtype=str(stored.dtype),
      **fields,
    )
  return entry, {f'{name}:{suffix}': a for suffix, a in arrays.items()}


def save(
  directory: str | os.PathLike,
  params: Any,
  spec: dict,
  sparse_rules: Sequence[str] = (),
  float16: bool = False,
) -> None:
  """Writes `params` (nested dicts of float arrays and QTensors) and `spec` to `directory`.

  Leaves whose path matches `sparse_rules` (regexes, see `rules.match`; a rule matching nothing
  raises rules.RuleError) are stored as a mask and their nonzero entries (for a QTensor, the
  values that differ from the zero point) when that is smaller than dense. `float16` stores
  plain float leaves in half precision (lossy); they load as float32 either way."""
  if not isinstance(spec, dict):
    raise ValueError(f'artifact.save: spec must be a dict, got {type(spec).__name__}')
  directory = pathlib.Path(directory)
  flags = _sparse_flags(params, sparse_rules) if sparse_rules else {}
  manifest, arrays = [], {}
  for keys, leaf in _walk(params):
    entry, leaf_arrays = _encode(keys, leaf, flags.get('/'.join(keys), False), float16)
    manifest.append(entry)
    arrays.update(leaf_arrays)
  document = {'format': FORMAT, 'version': VERSION, 'spec': spec, 'manifest': manifest}
  json.dumps(document)  # fails early, before writing anything, on a spec that is not JSON

  directory.mkdir(parents=True, exist_ok=True)
  weights, meta = directory / WEIGHTS, directory / MANIFEST
  # The manifest goes last (after the weights it hashes), each file through a rename, so an
  # interrupted save never leaves a manifest that describes other weights.
  meta.unlink(missing_ok=True)
  tmp = directory / (WEIGHTS + '.tmp')
  with open(tmp, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, weights)
  document['weights_sha256'] = _sha256(weights)
  text = json.dumps(document, indent=1, sort_keys=True)
  tmp = directory / (MANIFEST + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, meta)


# ------------------------------------------------------------------------------------------------
# Decoding


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


class _Reader:
  """The arrays of weights.npz, checked against what the manifest says they must be."""

  def __init__(self, path: pathlib.Path, arrays: dict):
    self.path, self.arrays, self.used = path, arrays, set()

  def get(self, name: str, dtype, shape) -> np.ndarray:
    if name not in self.arrays:
      raise ArtifactError(f'{self.path}: no array {name!r}, which the manifest names')
    a = self.arrays[name]
    self.used.add(name)
    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
      raise ArtifactError(
        f'{self.path}: array {name!r} is {a.dtype}{list(a.shape)}, '
        f'the manifest needs {np.dtype(dtype)}{list(shape)}'
      )
    return a


def _decode_values(reader: _Reader, name, entry, dtype, bits, fill):
  shape = tuple(entry['shape'])
  n = math.prod(shape)

  def data(suffix, count):
    if bits == 4:
      packed = reader.get(f'{name}:{suffix}', np.uint8, ((count + 1) // 2,))
      return quantize_lib.unpack_int4(packed, (count,))
    return reader.get(f'{name}:{suffix}', dtype, (count,))

  if entry['storage'] == 'dense':
    return data('values', n).reshape(shape)
  if entry['storage'] != 'sparse':
    raise ArtifactError(f'{reader.path}: {name}: unknown storage {entry["storage"]!r}')
  packed = reader.get(f'{name}:mask', np.uint8, (math.ceil(n / 8),))
  mask = np.unpackbits(packed, count=n).astype(bool)
  nnz = int(entry['nnz'])
  if int(mask.sum()) != nnz:
    raise ArtifactError(f'{reader.path}: {name}: mask has {int(mask.sum())} entries, not {nnz}')
  flat = np.array(np.broadcast_to(fill, shape), dtype).reshape(-1)
  flat[mask] = data('nonzero', nnz)
  return flat.reshape(shape)


def _decode(reader: _Reader, entry: dict):
  name = '/'.join(entry['path'])
  kind = entry['kind']
  if kind == 'qtensor':
    scale = reader.get(f'{name}:scale', np.float32, entry['scale_shape'])
    zero_point = reader.get(f'{name}:zero_point', np.int32, entry['zero_point_shape'])
    bits = int(entry['bits'])
    if bits not in quantize_lib.BITS:
      raise ArtifactError(f'{reader.path}: {name}: bits={bits} is not one of {quantize_lib.BITS}')
    values = _decode_values(reader, name, entry, np.int8, bits, zero_point.astype(np.int8))
    return quantize_lib.QTensor(
      jnp.asarray(values),
      jnp.asarray(scale),
      jnp.asarray(zero_point),
      bits=bits,
      symmetric=bool(entry['symmetric']),
      axis=entry['axis'],
    )
  if kind == 'array':
    stored = np.dtype(entry['stored_dtype'])
    arr = _decode_values(reader, name, entry, stored, 8, np.zeros((), stored))
    if np.issubdtype(stored, np.floating):
      arr = arr.astype(np.float32)
    return jnp.asarray(arr)
  raise ArtifactError(f'{reader.path}: {name}: unknown leaf kind {kind!r}')


def _read_manifest(directory: pathlib.Path) -> dict:
  path = directory / MANIFEST
  if not path.is_file():
    raise ArtifactError(f'{path}: missing (not a kdjax artifact directory)')
  try:
    document = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ArtifactError(f'{path}: unreadable: {type(e).__name__}: {e}'.splitlines()[0]) from e
  if not isinstance(document, dict) or document.get('format') != FORMAT:
    raise ArtifactError(f'{path}: not a {FORMAT} manifest')
  if document.get('version') != VERSION:
    raise ArtifactError(f'{path}: version {document.get("version")!r}, expected {VERSION}')
  for key in ('spec', 'manifest', 'weights_sha256'):
    if key not in document:
      raise ArtifactError(f'{path}: no {key!r} field')
  return document


def load(directory: str | os.PathLike) -> tuple[Any, dict]:
  """(params, spec) of an artifact written by `save`: the same nested dicts, with QTensor leaves
  (jax arrays, the same static fields) and plain arrays (floats as float32)."""
  directory = pathlib.Path(directory)
  document = _read_manifest(directory)
  weights = directory / WEIGHTS
  if not weights.is_file():
    raise ArtifactError(f'{weights}: missing')
  if _sha256(weights) != document['weights_sha256']:
    raise ArtifactError(f'{weights}: corrupt (its SHA-256 differs from the one in {MANIFEST})')
  try:
    with np.load(weights, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ArtifactError(f'{weights}: unreadable: {type(e).__name__}: {e}'.splitlines()[0]) from e

  reader = _Reader(weights, arrays)
  params: dict = {}
  try:
    for entry in document['manifest']:
      node = params
      *parents, last = entry['path']
      for key in parents:
        node = node.setdefault(key, {})
      node[last] = {} if entry['kind'] == 'empty' else _decode(reader, entry)
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ArtifactError):
      raise
    raise ArtifactError(
      f'{directory / MANIFEST}: malformed manifest entry: {type(e).__name__}: {e}'.splitlines()[0]
    ) from e
  extra = sorted(set(arrays) - reader.used)
  if extra:
    raise ArtifactError(f'{weights}: arrays not in the manifest: {", ".join(extra[:5])}')
  return params, document['spec']


# ------------------------------------------------------------------------------------------------
# Sizes and use


def size_bytes(directory: str | os.PathLike) -> int:
  """Bytes on disk of every file in the artifact directory."""
  directory = pathlib.Path(directory)
  if not (directory / MANIFEST).is_file():
    raise ArtifactError(f'{directory / MANIFEST}: missing (not a kdjax artifact directory)')
  return sum(p.stat().st_size for p in directory.rglob('*') if p.is_file())


def dense_float32_bytes(params) -> int:
  """Bytes of every parameter as float32 (a QTensor counts its values only)."""
  leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_q)
  return sum(4 * int(np.size(x.values if _is_q(x) else x)) for x in leaves)


def materialize(params):
  """`params` with every QTensor dequantized to float32 (see `quantize.dequantize`)."""
  return jax.tree_util.tree_map(
    lambda x: quantize_lib.dequantize(x) if _is_q(x) else jnp.asarray(x), params, is_leaf=_is_q
  )
