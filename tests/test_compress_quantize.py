"""quantize / dequantize / int4 packing / fake_quant / parameter trees / calibration, checked
against NumPy references written here, independently of the implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.compress import quantize as qz
from kdjax.compress.rules import RuleError

X = np.array(
  [
    [0.5, -1.2, 0.0, 3.0],
    [-0.25, 0.8, 0.0, -2.0],
    [1.1, 0.3, 0.0, 0.7],
  ],
  np.float32,
)  # column 2 is all zero: a per-channel scale there must not divide by zero


def _np_grid(bits, symmetric):
  half = 2 ** (bits - 1)
  return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


CASES = [(b, s, a) for b in (8, 4) for s in (True, False) for a in (None, -1)]


@pytest.mark.parametrize('bits,symmetric,axis', CASES)
def test_round_trip_error_within_half_step(bits, symmetric, axis):
  q = qz.quantize(X, bits, symmetric, axis)
  back = np.asarray(qz.dequantize(q))
  scale = np.broadcast_to(np.asarray(q.scale), X.shape)
  # Tiny slack for float32 rounding in x / scale and (v - z) * scale.
  assert np.all(np.abs(back - X) <= scale / 2 * (1 + 1e-5) + 1e-7)
  values = np.asarray(q.values)
  assert values.dtype == np.int8
  qmin, qmax = _np_grid(bits, symmetric)
  assert values.min() >= qmin and values.max() <= qmax
  if symmetric:
    assert np.all(np.asarray(q.zero_point) == 0)
  assert np.all(back[:, 2] == 0.0)  # zeros are exact, also in the all-zero channel


def test_per_channel_scales_match_numpy():
  for bits, qmax in ((8, 127), (4, 7)):
    q = qz.quantize(X, bits, True, axis=-1)
    expected = np.abs(X).max(axis=0) / qmax
    expected[2] = 1.0  # the all-zero column keeps a finite scale
    assert q.scale.shape == (1, 4)
    np.testing.assert_allclose(np.asarray(q.scale)[0], expected, rtol=1e-6)
  # Per tensor: one scale from the global max|x|.
  q = qz.quantize(X, 8, True)
  assert q.scale.shape == ()
  np.testing.assert_allclose(float(q.scale), 3.0 / 127, rtol=1e-6)


def test_axis_zero_scales_rows():
  q = qz.quantize(X, 8, True, axis=0)
  assert q.scale.shape == (3, 1)
  np.testing.assert_allclose(np.asarray(q.scale)[:, 0], np.abs(X).max(axis=1) / 127, rtol=1e-6)


@pytest.mark.parametrize('bits', [8, 4])
def test_asymmetric_zero_point_maps_min(bits):
  x = np.array([-0.3, 0.1, 0.9, 2.2, 1.7], np.float32)
  q = qz.quantize(x, bits, symmetric=False)
  qmin, qmax = _np_grid(bits, False)
  scale = (2.2 - (-0.3)) / (qmax - qmin)
  np.testing.assert_allclose(float(q.scale), scale, rtol=1e-6)
  assert int(q.zero_point) == round(qmin + 0.3 / scale)
  # The minimum gets the lowest code and comes back within half a step.
  assert int(q.values[0]) == qmin
  assert abs(float(qz.dequantize(q)[0]) - (-0.3)) <= scale / 2 + 1e-7
  # 0 is exactly representable: appended to x it quantizes to the zero point itself.
  q0 = qz.quantize(np.append(x, np.float32(0.0)), bits, symmetric=False)
  assert float(qz.dequantize(q0)[-1]) == 0.0


def test_all_zero_tensor_and_all_positive():
  for symmetric in (True, False):
    q = qz.quantize(np.zeros((2, 3), np.float32), 4, symmetric, axis=-1)
    assert np.all(np.isfinite(np.asarray(q.scale)))
    assert np.all(np.asarray(qz.dequantize(q)) == 0.0)
  # All-positive input: the range is widened to include 0, so 0 maps to the zero point.
  q = qz.quantize(np.array([1.0, 2.0, 4.0], np.float32), 8, False)
  assert int(q.zero_point) == -128
  np.testing.assert_allclose(np.asarray(qz.dequantize(q)), [1.0, 2.0, 4.0], atol=4 / 255 / 2)


def test_clip_saturates():
  x = np.array([-3.0, -0.5, 0.0, 0.4, 2.0], np.float32)
  q = qz.quantize(x, 8, True, clip=1.0)
  np.testing.assert_allclose(float(q.scale), 1 / 127, rtol=1e-6)
  assert list(np.asarray(q.values)[[0, -1]]) == [-127, 127]


@pytest.mark.parametrize('n', [1, 6, 7])
def test_int4_pack_round_trip(n):
  rng = np.random.default_rng(n)
  values = rng.integers(-8, 8, size=n).astype(np.int8)
  values[0] = -8
  packed = qz.pack_int4(values)
  assert packed.dtype == np.uint8 and packed.size == -(-n // 2)
  np.testing.assert_array_equal(qz.unpack_int4(packed, (n,)), values)


def test_int4_pack_layout_and_quantized_tensor():
  # -1 -> 0xF in the low nibble, 7 -> 0x7 in the high nibble.
  assert qz.pack_int4(np.array([-1, 7], np.int8)).tolist() == [0x7F]
  q = qz.quantize(X, 4, False, axis=-1)
  packed = qz.pack_int4(q.values)
  assert packed.size == 6  # 12 values in 6 bytes, half of the int8 storage
  np.testing.assert_array_equal(qz.unpack_int4(packed, X.shape), np.asarray(q.values))


def test_int4_pack_rejects_out_of_range():
  with pytest.raises(ValueError, match=r'values must be in \[-8, 7\]'):
    qz.pack_int4(np.array([8], np.int8))
  with pytest.raises(ValueError, match='packed has'):
    qz.unpack_int4(np.zeros(2, np.uint8), (5,))


def test_ste_gradient_inside_and_outside_clip():
  x = jnp.array([-2.0, -1.0, -0.3, 0.0, 0.6, 1.0, 1.5], jnp.float32)
  for symmetric in (True, False):
    grad = jax.grad(lambda v: jnp.sum(qz.fake_quant(v, 8, symmetric, clip=(-1.0, 1.0))))(x)
    np.testing.assert_array_equal(np.asarray(grad), [0, 1, 1, 1, 1, 1, 0])
  # Forward: quantize-dequantize, saturating outside the range.
  out = np.asarray(qz.fake_quant(x, 8, True, clip=1.0))
  np.testing.assert_allclose(out, np.clip(np.round(np.asarray(x) * 127) / 127, -1, 1), atol=1e-7)


def test_ste_gradient_data_range_and_jit():
  # Without clip the range is the data's own: nothing is clipped, the gradient is all ones.
  f = jax.jit(lambda v: jnp.sum(qz.fake_quant(v, 4, True, axis=-1)))
  np.testing.assert_array_equal(np.asarray(jax.grad(f)(jnp.asarray(X))), np.ones_like(X))
  q = qz.quantize(X, 4, True, axis=-1)
  np.testing.assert_allclose(
    np.asarray(qz.fake_quant(X, 4, True, axis=-1)), np.asarray(qz.dequantize(q)), atol=0
  )


PARAMS = {
  'dense_0': {'kernel': X, 'bias': np.array([0.1, -0.2, 0.3, 0.0], np.float32)},
  'dense_1': {'kernel': X.T.copy(), 'bias': np.zeros(3, np.float32)},
}


def test_quantize_params_touches_only_selected():
  qp = qz.quantize_params(PARAMS, 4, True, True, rules=[r'dense_0/kernel'])
  assert isinstance(qp['dense_0']['kernel'], qz.QTensor)
  assert qp['dense_0']['kernel'].scale.shape == (1, 4)  # per output channel
  for path in (('dense_0', 'bias'), ('dense_1', 'kernel'), ('dense_1', 'bias')):
    assert qp[path[0]][path[1]] is PARAMS[path[0]][path[1]]
  back = qz.dequantize_params(qp)
  q = qz.quantize(X, 4, True, axis=-1)
  np.testing.assert_array_equal(np.asarray(back['dense_0']['kernel']), qz.dequantize(q))
  assert back['dense_1']['kernel'] is PARAMS['dense_1']['kernel']


def test_quantize_params_rule_matching_nothing_raises():
  with pytest.raises(RuleError, match='matches no parameter'):
    qz.quantize_params(PARAMS, 8, True, True, rules=['kernal'])


def test_quantization_report_bytes():
  qp = qz.quantize_params(PARAMS, 4, False, True, rules=['kernel$'])
  report = qz.quantization_report(qp)
  k0 = report['layers']['dense_0/kernel']
  # 12 values at 4 bits = 6 bytes, plus 4 float32 scales and 4 int32 zero points.
  assert (k0['bits'], k0['bytes'], k0['quantized']) == (4, 6 + 16 + 16, True)
  k1 = report['layers']['dense_1/kernel']  # [4, 3]: 3 channels
  assert k1['bytes'] == 6 + 12 + 12
  assert report['layers']['dense_0/bias'] == {
    'bits': 32,
    'shape': (4,),
    'params': 4,
    'bytes': 16,
    'quantized': False,
  }
  assert report['bytes'] == 38 + 30 + 16 + 12
  assert report['float32_bytes'] == 4 * (12 + 12 + 4 + 3)
  # 8 bits, per tensor: 12 bytes of values + one scale + one zero point.
  report8 = qz.quantization_report(qz.quantize_params(PARAMS, 8, True, False, rules=['kernel']))
  assert report8['layers']['dense_0/kernel']['bytes'] == 12 + 4 + 4


def test_calibrate_range():
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(4, 5)), rng.normal(size=(3,)), rng.normal(size=(2, 2, 2)) * 5]
  flat = np.concatenate([b.reshape(-1) for b in batches])
  assert qz.calibrate_range(batches) == (flat.min(), flat.max())
  lo, hi = qz.calibrate_range(iter(batches), 'percentile', 99.0)
  np.testing.assert_allclose([lo, hi], np.percentile(flat, [1.0, 99.0]), rtol=1e-12)
  lo, hi = qz.calibrate_range(batches, 'percentile')
  np.testing.assert_allclose([lo, hi], np.percentile(flat, [100 - 99.99, 99.99]), rtol=1e-12)


@pytest.mark.parametrize(
  'call,pattern',
  [
    (lambda: qz.quantize(X, 3), r'bits=3 must be one of \(4, 8\)'),
    (lambda: qz.quantize(X, 16, True), 'bits=16'),
    (lambda: qz.fake_quant(X, 2), 'bits=2'),
    (lambda: qz.quantize_params(PARAMS, 6, rules=['kernel']), 'bits=6'),
    (lambda: qz.quantize(X, 8, 'yes'), 'symmetric must be a bool'),
    (lambda: qz.quantize(X, 8, True, axis=2), 'axis=2'),
    (lambda: qz.quantize(X, 8, True, axis=-1, clip=1.0), 'clip is a per-tensor range'),
    (lambda: qz.quantize(X, 8, False, clip=(1.0, -1.0)), 'needs lo < hi'),
    (lambda: qz.quantize(np.arange(3), 8), 'floating-point'),
    (lambda: qz.calibrate_range([X], 'mean'), 'method='),
    (lambda: qz.calibrate_range([X], 'percentile', 120), 'percentile=120'),
    (lambda: qz.calibrate_range([]), 'no values'),
  ],
)
def test_bad_arguments(call, pattern):
  with pytest.raises(ValueError, match=pattern) as info:
    call()
  assert '\n' not in str(info.value)


def test_fake_quant_traced_clip_under_jit():
  # A calibrated range can be a traced argument (e.g. a learned or scheduled clip).
  grad = jax.jit(jax.grad(lambda v, c: jnp.sum(qz.fake_quant(v, 8, False, clip=(-c, c)))))
  np.testing.assert_array_equal(
    np.asarray(grad(jnp.array([-2.0, 0.5, 1.0, 3.0]), 1.0)), [0.0, 1.0, 1.0, 0.0]
  )
