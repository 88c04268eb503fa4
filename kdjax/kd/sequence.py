"""Distillation losses for sequence generation (encoder-decoder translation).

Every loss here is a `loss_fn(params, teacher_params, batch, rng, step)` for kdjax.step's
train step, over batches of kdjax.data.translation_batches: `src_ids`/`src_mask` [B, S],
`tgt_in` (BOS + target), `tgt_out` (target + EOS) and `tgt_mask` [B, T], `weights` [B].
Per-position terms are weighted by tgt_mask × weights, so padding and filler rows count for
nothing, and each metric is a (sum, count) pair over real target tokens.

  supervised     label-smoothed cross-entropy on `tgt_out` (references, or a teacher's beam
                 outputs placed in the batch: sequence-level KD, Kim & Rush 2016)
  word-level KD  (1 − a)·CE + a·T²·KL(p_T ‖ q_T) at every target position, with the teacher
                 run teacher-forced on the same prefix (Kim & Rush 2016, eq. 4)
  on-policy      the student samples y ~ q(·|x); teacher and student are scored on the sampled
                 prefixes and the student minimises the generalised JSD_β(p ‖ q) per position
                 (Agarwal et al. 2024, GKD), mixed with word-level KD on the references.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import decode, losses
from kdjax.data.subword import BOS_ID, EOS_ID, PAD_ID
from kdjax.kd import output

LossFn = Callable[..., tuple[jax.Array, dict]]


def _token_weights(batch, mask_key: str = 'tgt_mask') -> jax.Array:
  return batch[mask_key].astype(jnp.float32) * batch['weights'][:, None]


def _forward(model: nn.Module, params, batch, tgt_in, tgt_mask, rng=None):
  """Teacher-forced logits [B, T, V]; dropout on when `rng` is given."""
  return model.apply(
    {'params': params},
    batch['src_ids'],
    batch['src_mask'],
    tgt_in,
    tgt_mask,
    deterministic=rng is None,
    rngs={} if rng is None else {'dropout': rng},
  )[0]


def word_kd_terms(
  student_logits: jax.Array,
  teacher_logits: jax.Array | None,
  targets: jax.Array,
  weights: jax.Array,
  kd_weight: float,
  temperature: float,
  label_smoothing: float,
) -> tuple[jax.Array, dict]:
  """(1 − a)·CE(targets) + a·T²·KL(teacher ‖ student) over weighted positions.

  `teacher_logits=None` (or a = 0) gives the supervised loss alone. Returns the loss (a
  global-mean scalar) and (sum, count) metrics: ce, kd, loss, accuracy (token accuracy).
  """
  ce = output.label_smoothed_cross_entropy(student_logits, targets, weights, label_smoothing)
  metrics = {'ce': ce, 'accuracy': losses.accuracy(student_logits, targets, weights)}
  if teacher_logits is None or kd_weight == 0:
    metrics['loss'] = ce
    return losses.mean(ce), metrics
  kd = output.forward_kl(student_logits, teacher_logits, temperature, weights)
  metrics['kd'] = kd
  metrics['agreement'] = losses.agreement(student_logits, teacher_logits, weights)
  # Both terms count the same positions, so their (sum, count) pairs mix term by term.
  metrics['loss'] = ((1.0 - kd_weight) * ce[0] + kd_weight * kd[0], ce[1])
  return (1.0 - kd_weight) * losses.mean(ce) + kd_weight * losses.mean(kd), metrics


def supervised_loss_fn(model: nn.Module, label_smoothing: float) -> LossFn:
  """Label-smoothed CE on `batch['tgt_out']` (references or a teacher's beam outputs)."""

  def loss_fn(params, teacher_params, batch, rng, step):
    del teacher_params, step
    logits = _forward(model, params, batch, batch['tgt_in'], batch['tgt_mask'], rng)
    return word_kd_terms(
      logits, None, batch['tgt_out'], _token_weights(batch), 0.0, 1.0, label_smoothing
    )

  return loss_fn


def word_kd_loss_fn(
  student: nn.Module,
  teacher: nn.Module,
  kd_weight: float,
  temperature: float,
  label_smoothing: float,
) -> LossFn:
  """Word-level KD against a frozen teacher run in inference mode on the same prefixes."""

  def loss_fn(params, teacher_params, batch, rng, step):
    del step
    teacher_logits = jax.lax.stop_gradient(
      _forward(teacher, teacher_params, batch, batch['tgt_in'], batch['tgt_mask'])
    )
    student_logits = _forward(student, params, batch, batch['tgt_in'], batch['tgt_mask'], rng)
    return word_kd_terms(
      student_logits,
      teacher_logits,
      batch['tgt_out'],
      _token_weights(batch),
      kd_weight,
      temperature,
      label_smoothing,
    )

  return loss_fn


def sampled_targets(tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Decoder inputs (BOS + the sample shifted right) and the mask of the sampled positions,
  EOS included, from a decoder's [B, L] tokens and lengths."""
  tgt_in = jnp.concatenate([jnp.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], axis=1)
  positions = jnp.arange(tokens.shape[1])[None, :]
  return tgt_in, (positions < lengths[:, None]).astype(jnp.int32)


def on_policy_loss_fn(
  student: nn.Module,
  teacher: nn.Module,
  policy_weight: float,
  beta: float,
  kd_weight: float,
  temperature: float,
  sample_temperature: float,
  label_smoothing: float,
) -> LossFn:
  """(1 − l)·word-level KD on the references + l·JSD_β on the student's own samples.

  Samples are drawn from the current student (no gradient flows through the sampling) with
  as many positions as the batch's target bucket, then both models score the sampled
  prefixes teacher-forced and the divergence runs over every sampled position, EOS included.
  """
  reference_loss = word_kd_loss_fn(student, teacher, kd_weight, temperature, label_smoothing)

  def loss_fn(params, teacher_params, batch, rng, step):
    sample_rng, dropout_rng = jax.random.split(rng)
    loss, metrics = reference_loss(params, teacher_params, batch, dropout_rng, step)
    tokens, lengths, _ = decode.sample(
      student,
      jax.lax.stop_gradient(params),
      batch['src_ids'],
      batch['src_mask'],
      sample_rng,
      temperature=sample_temperature,
      max_len=batch['tgt_in'].shape[1],
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      pad_id=PAD_ID,
    )
    tgt_in, tgt_mask = sampled_targets(tokens, lengths)
    weights = tgt_mask.astype(jnp.float32) * batch['weights'][:, None]
    teacher_logits = jax.lax.stop_gradient(
      _forward(teacher, teacher_params, batch, tgt_in, tgt_mask)
    )
    student_logits = _forward(student, params, batch, tgt_in, tgt_mask, dropout_rng)
    jsd = output.generalized_jsd(student_logits, teacher_logits, temperature, weights, beta)
    metrics['on_policy_jsd'] = jsd
    metrics['sample_length'] = losses.weighted(lengths.astype(jnp.float32), batch['weights'])
    # The logged loss is the objective over the reference positions' count: the JSD's mean
    # rescaled to that count (exact on one device, the devices' mean otherwise).
    ref_sum, ref_count = metrics['loss']
    jsd_as_ref = jsd[0] * ref_count / jnp.maximum(jsd[1], 1.0)
    metrics['loss'] = ((1.0 - policy_weight) * ref_sum + policy_weight * jsd_as_ref, ref_count)
    loss = (1.0 - policy_weight) * loss + policy_weight * losses.mean(jsd)
    return loss, metrics

  return loss_fn
