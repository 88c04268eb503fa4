"""Integer quantization of weights and activations (8 and 4 bits), as pure functions.

  * `quantize` / `dequantize`: a float array to a `QTensor` (int8-stored integer values, a
    float32 scale and an int32 zero point), per tensor or per channel, symmetric or affine.
  * `pack_int4` / `unpack_int4`: two signed 4-bit values per byte, so a 4-bit artifact really
    takes half the bytes of an 8-bit one.
  * `fake_quant`: quantize-dequantize in the forward pass with a straight-through gradient,
    for quantization-aware training.
  * `quantize_params` / `dequantize_params` / `quantization_report`: the same over a parameter
    pytree, targeted with `rules.match`.
  * `calibrate_range`: an activation range (min/max or percentiles) over batches, to pass as
    the fixed `clip` of `fake_quant` / `quantize`.

Integer grids (values = round(x / scale) + zero_point, x ~ (values - zero_point) * scale):
  symmetric: zero_point 0, values in [-(2^(b-1) - 1), 2^(b-1) - 1] ([-127, 127], [-7, 7]).
    The restricted range (no -128 / -8) keeps the grid symmetric about zero, so x and -x
    quantize to opposite values and scale = max|x| / qmax uses both ends; the one extra code
    of the full range could only be reached by clipping +max|x|.
  asymmetric: values in the full signed range [-2^(b-1), 2^(b-1) - 1] ([-128, 127], [-8, 7]),
    both bit widths in one signed convention so int8 storage and `pack_int4` serve both;
    the range [lo, hi] always contains 0, so 0 (padding, ReLU zeros) is exactly
    representable by the integer zero point.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.compress import rules as rules_lib

BITS = (4, 8)
# What is quantized unless told otherwise: Dense kernels, low-rank factors (lowrank.py's
# kernel_a/kernel_b) and embedding tables; biases and norms stay float.
DEFAULT_RULES = ('kernel(_a|_b)?$', 'embedding$')
METHODS = ('minmax', 'percentile')


@flax.struct.dataclass
class QTensor:
  """A quantized array. `scale` and `zero_point` have the rank of `values` with size 1 on every
  axis but the channel axis (so they broadcast without rank promotion), or are 0-d per tensor.
  Metadata fields are static, so a QTensor is a pytree of three arrays that jit can carry."""

  values: Any  # int8, in the grid of `bits` (see the module docstring)
  scale: Any  # float32
  zero_point: Any  # int32
  bits: int = flax.struct.field(pytree_node=False, default=8)
  symmetric: bool = flax.struct.field(pytree_node=False, default=True)
  axis: int | None = flax.struct.field(pytree_node=False, default=None)


def _check_bits(bits) -> int:
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f'bits={bits!r} must be one of {BITS}')
  return int(bits)


def _check_symmetric(symmetric) -> bool:
  # A truthy string such as 'false' would silently pick the symmetric grid.
  if not isinstance(symmetric, (bool, np.bool_)):
    raise ValueError(f'symmetric must be a bool, got {symmetric!r}')
  return bool(symmetric)


def _grid(bits: int, symmetric: bool) -> tuple[int, int]:
  half = 2 ** (bits - 1)
  return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def _check_axis(axis, ndim: int) -> int | None:
  if axis is None:
    return None
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
    raise ValueError(f'axis must be an integer or None, got {axis!r}')
  if not -ndim <= axis < ndim:
    raise ValueError(f'axis={axis} is out of range for an array of rank {ndim}')
  return int(axis) % ndim


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _clip_bounds(clip, symmetric: bool):
  """(lo, hi) as float32 from `clip`: a number c (meaning [-c, c]) or a pair (lo, hi)."""
  if isinstance(clip, (tuple, list)):
    if len(clip) != 2:
      raise ValueError(f'clip must be a number c or a pair (lo, hi), got {clip!r}')
    lo, hi = (jnp.asarray(c, jnp.float32) for c in clip)
  else:
    hi = jnp.asarray(clip, jnp.float32)
    lo = -hi
  if lo.ndim or hi.ndim:
    raise ValueError(f'clip bounds must be scalars, got shapes {lo.shape} and {hi.shape}')
  if _is_concrete(lo) and _is_concrete(hi) and not float(lo) < float(hi):
    raise ValueError(f'clip=({float(lo)}, {float(hi)}) needs lo < hi')
  if symmetric:
    # The symmetric grid is centred on 0: the range becomes [-m, m] for the larger bound.
    hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    lo = -hi
  return lo, hi


def _range(x, symmetric: bool, axis: int | None, clip):
  """The float range [lo, hi] the grid covers, shaped to broadcast against x."""
  if clip is not None:
    if axis is not None:
      raise ValueError('clip is a per-tensor range: use it with axis=None')
    return _clip_bounds(clip, symmetric)
  reduce = None if axis is None else tuple(a for a in range(x.ndim) if a != axis)
  keep = axis is not None
  if symmetric:
    hi = jnp.max(jnp.abs(x), axis=reduce, keepdims=keep)
    return -hi, hi
  # Widen to include 0 so that 0 maps exactly onto the integer zero point.
  lo = jnp.minimum(jnp.min(x, axis=reduce, keepdims=keep), 0.0)
  hi = jnp.maximum(jnp.max(x, axis=reduce, keepdims=keep), 0.0)
  return lo, hi


def _scale_zero_point(lo, hi, bits: int, symmetric: bool):
  qmin, qmax = _grid(bits, symmetric)
  if symmetric:
    scale = hi / qmax
    zero_point = jnp.zeros_like(scale, jnp.int32)
  else:
    scale = (hi - lo) / (qmax - qmin)
  # An all-zero channel (or tensor) has range 0: any positive scale represents it exactly,
  # and 1 keeps the division below finite.
  scale = jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)
  if not symmetric:
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax).astype(jnp.int32)
  return scale, zero_point


def quantize(x, bits: int = 8, symmetric: bool = True, axis: int | None = None, clip=None):
  """`x` quantized to `bits` (4 or 8) as a QTensor.

  axis=None: one scale for the whole tensor; axis=k: one scale per index of axis k (the
  channel axis, e.g. -1, the output axis of a Dense kernel [in, out]). The range is max|x|
  (symmetric) or [min(x, 0), max(x, 0)] (asymmetric) per tensor or channel, unless `clip`
  fixes it (per tensor only): a number c for [-c, c] or a calibrated pair (lo, hi); values
  outside saturate at the ends of the grid. Every value inside the range comes back from
  `dequantize` within scale / 2.
  """
  bits = _check_bits(bits)
  symmetric = _check_symmetric(symmetric)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'x: need a floating-point array, got dtype {x.dtype}')
  axis = _check_axis(axis, x.ndim)
  x = x.astype(jnp.float32)
  lo, hi = _range(x, symmetric, axis, clip)
  scale, zero_point = _scale_zero_point(lo, hi, bits, symmetric)
  qmin, qmax = _grid(bits, symmetric)
  values = jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax).astype(jnp.int8)
  return QTensor(values, scale, zero_point, bits=bits, symmetric=symmetric, axis=axis)


def dequantize(q: QTensor):
  """The float32 array `q` stands for: (values - zero_point) * scale."""
  return (q.values.astype(jnp.int32) - q.zero_point).astype(jnp.float32) * q.scale


def pack_int4(values):
  """Signed 4-bit values (any shape, in [-8, 7]) packed two per uint8 byte, flattened in C
  order: element 2i in the low nibble of byte i, 2i+1 in the high nibble. An odd count is
  padded with one zero nibble, so the result has ceil(n / 2) bytes."""
  v = np.asarray(values)
  if not np.issubdtype(v.dtype, np.integer):
    raise ValueError(f'values: need an integer array, got dtype {v.dtype}')
  v = v.reshape(-1).astype(np.int16)
  if v.size and (v.min() < -8 or v.max() > 7):
    raise ValueError(f'values must be in [-8, 7], got min {v.min()} max {v.max()}')
  if v.size % 2:
    v = np.concatenate([v, np.zeros((1,), np.int16)])
  nibbles = (v & 0xF).astype(np.uint8)  # two's complement low 4 bits
  return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed, shape: Sequence[int]):
  """Inverse of `pack_int4`: int8 values of `shape` (which fixes the count, dropping a padding
  nibble)."""
  p = np.asarray(packed)
  if p.dtype != np.uint8 or p.ndim != 1:
    raise ValueError(f'packed: need a 1-D uint8 array, got {p.dtype} of shape {p.shape}')
  shape = tuple(int(d) for d in shape)
  n = math.prod(shape)
  if p.size != (n + 1) // 2:
    raise ValueError(f'packed has {p.size} bytes; shape {shape} needs {(n + 1) // 2}')
  nibbles = np.stack([p & 0xF, p >> 4], axis=1).reshape(-1)[:n].astype(np.int8)
  # Sign-extend: nibbles 8..15 are the negative values -8..-1.
  return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)


def fake_quant(x, bits: int = 8, symmetric: bool = True, axis: int | None = None, clip=None):
  """dequantize(quantize(x, ...)) in the forward pass; the straight-through estimator in the
  backward pass: d out / d x is exactly 1 where x lies in the quantization range [lo, hi] (ends
  included) and 0 outside, where the forward pass saturates. Without `clip` the range is the
  data's own, so nothing is outside and the gradient is all ones; pass a calibrated `clip`
  (see `calibrate_range`) to clip. No gradient flows into the range itself."""
  x = jnp.asarray(x)
  q = quantize(x, bits, symmetric, axis, clip)
  axis = q.axis
  lo, hi = _range(x.astype(jnp.float32), q.symmetric, axis, clip)
  inside = ((x >= lo) & (x <= hi)).astype(x.dtype)
  out = jax.lax.stop_gradient(dequantize(q).astype(x.dtype))
  # x - stop_gradient(x) is exactly 0 forward and has gradient 1 backward; the mask (rather
  # than jnp.clip, whose gradient is 0.5 at a tie with the bound) makes the boundary exact.
  return out + (x - jax.lax.stop_gradient(x)) * inside


def _is_q(x) -> bool:
  return isinstance(x, QTensor)


def _per_selected_leaf(params, transform, what, bits, symmetric, per_channel, rules, exclude):
  """`params` with `transform(leaf, bits, symmetric, axis)` applied to every floating-point
  leaf `rules` selects (see `rules.match`); the others are the same objects, untouched.
  per_channel: one scale per index of the last axis (a Dense kernel's output units); leaves
  of rank < 2 get one scale per tensor, since a scale per element would store as many floats
  as it saves. A rule matching nothing raises rules.RuleError."""
  bits = _check_bits(bits)
  symmetric = _check_symmetric(symmetric)
  flags = rules_lib.match(params, rules, what, exclude)

  def one(path, leaf, selected):
    if not selected:
      return leaf
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      name = rules_lib.path_string(path)
      raise ValueError(f'{what}: {name} is not floating-point ({leaf.dtype})')
    axis = -1 if per_channel and jnp.ndim(leaf) >= 2 else None
    return transform(leaf, bits, symmetric, axis)

  return jax.tree_util.tree_map_with_path(one, params, flags)


def quantize_params(
  params,
  bits: int = 8,
  symmetric: bool = True,
  per_channel: bool = True,
  rules: Sequence[str] = ('kernel$',),
  exclude: Sequence[str] = (),
):
  """`params` with every leaf that `rules` selects replaced by a QTensor (see
  `_per_selected_leaf` for the scale layout)."""
  return _per_selected_leaf(
    params, quantize, 'quantize_params', bits, symmetric, per_channel, rules, exclude
  )


def fake_quant_params(
  params,
  bits: int = 8,
  symmetric: bool = True,
  per_channel: bool = True,
  rules: Sequence[str] = ('kernel$',),
  exclude: Sequence[str] = (),
):
  """Quantization-aware training: `params` with every leaf `rules` selects replaced by
  `fake_quant` (the values `quantize_params` would store, dequantized; straight-through
  gradients), with the same scale layout, so the model trained through this is the model
  `kdjax.ptq` exports with the same settings."""
  return _per_selected_leaf(
    params, fake_quant, 'fake_quant_params', bits, symmetric, per_channel, rules, exclude
  )


def dequantize_params(qparams, dtype=jnp.float32):
  """`qparams` with every QTensor replaced by its dequantized array (of `dtype`)."""
  return jax.tree_util.tree_map(
    lambda x: dequantize(x).astype(dtype) if _is_q(x) else x, qparams, is_leaf=_is_q
  )


def _nbytes(x) -> int:
  x = jnp.asarray(x)
  return int(x.size) * x.dtype.itemsize


def quantization_report(qparams) -> dict:
  """Storage per parameter and in total. For each path: bits per value, shape, and bytes as
  stored (a QTensor's values at `bits` bits each, i.e. ceil(n / 2) bytes when packed with
  `pack_int4`, plus its float32 scales and int32 zero points; other leaves at their dtype's
  size). Totals: 'bytes', 'float32_bytes' (everything as float32) and their ratio
  'compression'."""
  layers = {}
  total = float32_total = 0
  leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)[0]
  for path, leaf in leaves:
    if _is_q(leaf):
      n = int(leaf.values.size)
      nbytes = (n * leaf.bits + 7) // 8 + _nbytes(leaf.scale) + _nbytes(leaf.zero_point)
      bits, shape = leaf.bits, tuple(leaf.values.shape)
    else:
      arr = jnp.asarray(leaf)
      n, nbytes = int(arr.size), _nbytes(arr)
      bits, shape = arr.dtype.itemsize * 8, tuple(arr.shape)
    layers[rules_lib.path_string(path)] = {
      'bits': bits,
      'shape': shape,
      'params': n,
      'bytes': nbytes,
      'quantized': _is_q(leaf),
    }
    total += nbytes
    float32_total += 4 * n
  return {
    'layers': layers,
    'bytes': total,
    'float32_bytes': float32_total,
    'compression': float32_total / total if total else 1.0,
  }


def calibrate_range(
  batches: Iterable, method: str = 'minmax', percentile: float = 99.99
) -> tuple[float, float]:
  """An activation range (lo, hi) over all values of all `batches` (arrays of any shapes).

  'minmax': the overall min and max (running, constant memory).
  'percentile': numpy.percentile (linear interpolation) at 100 - `percentile` and
    `percentile` over every value, which ignores rare outliers that would otherwise stretch
    the grid; exact, so it keeps all values in memory at once.
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r} must be one of {METHODS}')
  if method == 'percentile':
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.floating)):
      raise ValueError(f'percentile must be a number in (50, 100], got {percentile!r}')
    if not 50 < percentile <= 100:
      raise ValueError(f'percentile={percentile} must be in (50, 100]')
  lo, hi, chunks = math.inf, -math.inf, []
  for batch in batches:
    a = np.asarray(batch, np.float64).reshape(-1)
    if a.size == 0:
      continue
    if not np.all(np.isfinite(a)):
      raise ValueError('batches: hold NaN or inf values')
    if method == 'minmax':
      lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    else:
      chunks.append(a)
  if method == 'percentile' and chunks:
    values = np.concatenate(chunks)
    lo = float(np.percentile(values, 100 - percentile))
    hi = float(np.percentile(values, percentile))
  if lo == math.inf:
    raise ValueError('batches: no values to calibrate on')
  return lo, hi
