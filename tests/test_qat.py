"""Quantization-aware training: the fake-quantized forward pass is exactly the weights
`kdjax.ptq` stores, with straight-through gradients; a QAT run's reported quantized accuracy is
what post-training quantization of its export measures independently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sst2_from_scratch
from kdjax import config as config_lib
from kdjax import ptq, train
from kdjax.compress import quantize

PARAMS = {
  'dense': {
    'kernel': np.linspace(-1.3, 0.7, 24, dtype=np.float32).reshape(6, 4),
    'bias': np.array([0.1, -0.2, 0.3, 0.05], np.float32),
  },
  'embed': {'embedding': np.linspace(-0.4, 0.9, 15, dtype=np.float32).reshape(5, 3)},
}


@pytest.mark.parametrize('bits', [4, 8])
@pytest.mark.parametrize('symmetric,per_channel', [(True, True), (False, False)])
def test_fake_quant_params_forward_is_what_quantize_params_stores(bits, symmetric, per_channel):
  rules = ('kernel$', 'embedding$')
  fake = quantize.fake_quant_params(PARAMS, bits, symmetric, per_channel, rules)
  stored = quantize.dequantize_params(
    quantize.quantize_params(PARAMS, bits, symmetric, per_channel, rules)
  )
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), fake, stored)
  assert fake['dense']['bias'] is PARAMS['dense']['bias']  # not selected: untouched


def test_fake_quant_params_gradient_is_straight_through():
  def loss(p):
    q = quantize.fake_quant_params(p, 4, True, True, ('kernel$',))
    return jnp.sum(q['dense']['kernel'] * 3.0) + jnp.sum(q['dense']['bias'] ** 2)

  grads = jax.grad(loss)(PARAMS)
  np.testing.assert_array_equal(grads['dense']['kernel'], np.full((6, 4), 3.0, np.float32))
  np.testing.assert_allclose(grads['dense']['bias'], 2 * PARAMS['dense']['bias'])


def _config(tfds_dir):
  config = sst2_from_scratch.get_config('runlocal,student=cnn')
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.train_limit = 1000
  # One padded length: each stage compiles its step and evaluation once, not once per bucket.
  config.data.buckets = (64,)
  config.stages = ('teacher', 'distill')
  config.quant.qat_bits = 4
  return config


@pytest.fixture(scope='module')
def qat_run(tmp_path_factory, tfds_dir):
  workdir = tmp_path_factory.mktemp('qat')
  return workdir, train.run(_config(tfds_dir), workdir)


def test_qat_accuracy_is_the_ptq_artifact_accuracy(qat_run, tmp_path):
  workdir, results = qat_run
  qat = results['stages']['distill']['qat']
  assert qat['bits'] == 4
  assert results['summary']['distill_quantized_accuracy'] == qat['eval_accuracy_quantized']
  report = ptq.run(workdir, tmp_path / 'int4', bits=4, repeats=1)
  assert report['models']['int4']['eval_accuracy'] == pytest.approx(qat['eval_accuracy_quantized'])


def test_qat_loss_sees_the_quantized_weights(tfds_dir):
  """The wrapped loss differs from the float loss by what int4 rounding changes, and is the
  float loss evaluated at the fake-quantized weights."""
  config = _config(tfds_dir)

  def loss_fn(params, teacher_params, batch, rng, step):
    return jnp.sum(params['w']['kernel'] ** 3), {}

  params = {'w': {'kernel': PARAMS['dense']['kernel']}}
  quant = config.quant
  quant.rules = ('kernel$',)
  wrapped = train._quantization_aware(loss_fn, quant, with_heads=False)
  got, _ = wrapped(params, None, None, None, 0)
  want = np.sum(quantize.fake_quant_params(params, 4, True, True, ('kernel$',))['w']['kernel'] ** 3)
  assert float(got) == pytest.approx(float(want))
  assert float(got) != pytest.approx(float(loss_fn(params, None, None, None, 0)[0]))


def test_bad_qat_bits_are_named():
  config = sst2_from_scratch.get_config('runlocal')
  config.quant.qat_bits = 3
  with pytest.raises(
    config_lib.ConfigError, match=r'config.quant.qat_bits=3 is invalid: 0 \(off\), 4 or 8'
  ):
    config_lib.validate(config)
