"""Output-level (logit) distillation terms: divergences between tempered output distributions.

Conventions shared by every function here:
  * logits have shape [..., C] (C classes last); `weights` has the leading shape [...]
    ([B] for sentence classification, [B, L] for token-level outputs) and a weight of 0
    removes a padded example or position. Each function returns a (sum, count) `Metric`.
  * p = softmax(teacher_logits / T) is the teacher and q = softmax(student_logits / T) the
    student, both at temperature T. The divergences are multiplied by T² (Hinton et al. 2015):
    the gradient of a tempered softmax w.r.t. the logits scales as 1/T, and that of a
    divergence between two of them as 1/T² for large T, so the T² factor keeps the soft
    term's gradient magnitude roughly independent of T.
  * all math is float32 whatever the input dtype, in log space (log-softmax, log-sum-exp), so
    logits of magnitude 1e4 give finite values. `temperature` and the mixing coefficients may
    be traced scalars from per-step schedules: nothing branches on their values.
  * labels outside [0, C) (e.g. -100 on padded positions) never produce NaN; such items must
    have weight 0.
"""

import jax
import jax.numpy as jnp

from kdjax.losses import Metric, weighted

Scalar = float | jax.Array

# Added to the tempered target logit before the non-target softmax, as in the official DKD code.
_DKD_MASK = 1000.0


def _tempered_log_probs(logits: jax.Array, temperature: Scalar) -> jax.Array:
  t = jnp.asarray(temperature, jnp.float32)
  return jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)


def _kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Σ_c p_c (log p_c − log q_c) over the last axis, for finite log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _t_squared(temperature: Scalar) -> jax.Array:
  return jnp.asarray(temperature, jnp.float32) ** 2


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """Boolean one-hot; a label outside [0, C) gives an all-False row (no wrap-around, no NaN)."""
  classes = jnp.arange(num_classes, dtype=labels.dtype).reshape((1,) * labels.ndim + (-1,))
  return labels[..., None] == classes


def forward_kl(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: Scalar, weights: jax.Array
) -> Metric:
  """T² · KL(p_T ‖ q_T) = T² · Σ_c p_c (log p_c − log q_c): forward KL, Hinton et al. 2015.

  "Distilling the Knowledge in a Neural Network". Mean-seeking: the student is pushed to put
  mass wherever the teacher does. The T² factor keeps the gradient magnitude roughly
  independent of T; without it a change of T silently re-weights the soft term against the
  hard-label term.
  """
  log_p = _tempered_log_probs(teacher_logits, temperature)
  log_q = _tempered_log_probs(student_logits, temperature)
  return weighted(_kl_from_log_probs(log_p, log_q) * _t_squared(temperature), weights)


def reverse_kl(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: Scalar, weights: jax.Array
) -> Metric:
  """T² · KL(q_T ‖ p_T) = T² · Σ_c q_c (log q_c − log p_c): reverse KL.

  Mode-seeking: the student may ignore low-probability teacher modes but is penalised for mass
  where the teacher has little (used for generative students, e.g. MiniLLM, Gu et al. 2023).
  """
  return forward_kl(teacher_logits, student_logits, temperature, weights)


def generalized_jsd(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  temperature: Scalar,
  weights: jax.Array,
  teacher_mix: Scalar,
) -> Metric:
  """Generalized Jensen-Shannon divergence, Agarwal et al. 2023 (GKD), times T².

  "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes".
  With β = teacher_mix, the weight of the TEACHER in the mixture M = β·p + (1 − β)·q:

      JSD_β = T² · [β · KL(p ‖ M) + (1 − β) · KL(q ‖ M)]

  Computed in log space from the ratios log(M / p) = log(β + (1 − β)·q/p) and
  log(M / q) = log(β·p/q + 1 − β) (log-sum-exp, or log1p/expm1 where p ≈ q so that small
  divergences keep their relative precision and p = q gives exactly 0): both KL terms stay
  finite and accurate for arbitrarily peaked distributions, no log(0).
  JSD_β ≤ T²·h(β) where h is the binary entropy (≤ T²·log 2), and JSD_β(q, p) = JSD_{1−β}(p, q)
  (swap the two models together with β ↔ 1 − β).

  Limits: the term vanishes at β = 0 and β = 1 (M becomes q, resp. p). Near the ends it is
  a scaled KL: JSD_β ≈ β · T²·KL(p ‖ q) (forward KL) as β → 0 and
  JSD_β ≈ (1 − β) · T²·KL(q ‖ p) (reverse KL) as β → 1, so β interpolates between the two
  directions but also shrinks the loss scale near the ends. For the unscaled KL at the ends use
  `forward_kl` / `reverse_kl` (the switch TRL's GKD trainer makes at β = 0 / 1; here β may be
  traced, so this function does not branch on it).
  """
  beta = jnp.asarray(teacher_mix, jnp.float32)
  log_p = _tempered_log_probs(teacher_logits, temperature)
  log_q = _tempered_log_probs(student_logits, temperature)
  # With d = log q − log p: log(M / p) = log(β + (1 − β)·e^d) and log(M / q) =
  # log(β·e^(−d) + 1 − β), so KL(p ‖ M) = −Σ p·log(M / p) and KL(q ‖ M) = −Σ q·log(M / q).
  # Near d = 0 (p ≈ q, where the terms nearly cancel) they are log1p((1 − β)·expm1(d)) and
  # log1p(β·expm1(−d)): relative precision, and exactly 0 at p = q. Elsewhere logaddexp keeps
  # them finite for any d (p or q may underflow to 0); each ratio is computed directly rather
  # than as a difference of large log-probabilities. log β and log(1 − β) are -inf at the ends
  # of [0, 1]; the inner wheres keep jnp.log and expm1 off inputs with infinite gradients, so
  # gradients (also w.r.t. a traced β) stay finite.
  d = log_q - log_p
  near = jnp.abs(d) < 1.0
  d_near = jnp.where(near, d, 0.0)
  d_far = jnp.where(near, 1.0, d)
  log_beta = jnp.where(beta > 0, jnp.log(jnp.where(beta > 0, beta, 1.0)), -jnp.inf)
  log_one_minus = jnp.where(beta < 1, jnp.log(jnp.where(beta < 1, 1.0 - beta, 1.0)), -jnp.inf)
  log_m_over_p = jnp.where(
    near,
    jnp.log1p((1.0 - beta) * jnp.expm1(d_near)),
    jnp.logaddexp(log_beta, log_one_minus + d_far),
  )
  log_m_over_q = jnp.where(
    near, jnp.log1p(beta * jnp.expm1(-d_near)), jnp.logaddexp(log_beta - d_far, log_one_minus)
  )
  kl_p_m = -jnp.sum(jnp.exp(log_p) * log_m_over_p, axis=-1)
  kl_q_m = -jnp.sum(jnp.exp(log_q) * log_m_over_q, axis=-1)
  per_item = beta * kl_p_m + (1.0 - beta) * kl_q_m
  return weighted(per_item * _t_squared(temperature), weights)


def jsd(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: Scalar, weights: jax.Array
) -> Metric:
  """T² · JSD(p ‖ q) = T² · [½ KL(p ‖ M) + ½ KL(q ‖ M)], M = ½ (p + q); bounded by T²·log 2.

  The symmetric Jensen-Shannon divergence (Lin 1991), `generalized_jsd` with teacher_mix ½.
  """
  return generalized_jsd(student_logits, teacher_logits, temperature, weights, 0.5)


def soft_cross_entropy(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: Scalar, weights: jax.Array
) -> Metric:
  """T² · H(p_T, q_T) = −T² · Σ_c p_c log q_c: soft-target cross-entropy, Hinton et al. 2015.

  Equals `forward_kl` plus T² times the teacher's entropy, which is constant for a frozen
  teacher: same gradient w.r.t. the student, but the value does not reach 0.
  """
  log_p = _tempered_log_probs(teacher_logits, temperature)
  log_q = _tempered_log_probs(student_logits, temperature)
  per_item = -jnp.sum(jnp.exp(log_p) * log_q, axis=-1) * _t_squared(temperature)
  return weighted(per_item, weights)


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array) -> Metric:
  """(1/C) · Σ_c (z^s_c − z^t_c)²: logit matching, Ba & Caruana 2014 ("Do Deep Nets Really
  Need to be Deep?"). No temperature: the high-T limit of the soft-target loss."""
  diff = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
  return weighted(jnp.mean(diff**2, axis=-1), weights)


def dkd_terms(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  temperature: Scalar,
  weights: jax.Array,
) -> dict[str, Metric]:
  """The two parts of Decoupled KD (Zhao et al., CVPR 2022), each times T².

  "Decoupled Knowledge Distillation". With y the gold label and p, q at temperature T:
    tckd = T² · KL(b^p ‖ b^q), target-class KD over the binary distributions
           b = (prob of y, 1 − prob of y);
    nckd = T² · KL(p̂ ‖ q̂), non-target-class KD, where p̂ = softmax(z^t/T − 1000·[c = y])
           (likewise q̂): the distribution over the non-target classes, renormalised, exactly
           as the official mdistiller code masks the target logit (so, as there, the target
           keeps a share of mass only when tempered logits differ by hundreds).
  With T² dropped, forward KL(p ‖ q) = tckd + (1 − p_y) · nckd (the paper's Eq. 1); DKD
  replaces the teacher-confidence coupling (1 − p_y) with a free weight β.
  The binary log-probabilities are log-sum-exps of log-softmax values, so they stay finite
  even where mdistiller's log(softmax) would underflow.
  """
  num_classes = student_logits.shape[-1]
  gt = _one_hot(labels, num_classes)
  t2 = _t_squared(temperature)
  log_p = _tempered_log_probs(teacher_logits, temperature)
  log_q = _tempered_log_probs(student_logits, temperature)

  def binary(log_probs):
    # A label outside [0, C) has no target class; treat the target mass as 0 there (the
    # items must carry weight 0) rather than produce -inf − -inf = NaN.
    has_target = jnp.any(gt, axis=-1)
    log_target = jnp.where(has_target, jnp.sum(jnp.where(gt, log_probs, 0.0), axis=-1), -1e30)
    log_other = jax.nn.logsumexp(jnp.where(gt, -jnp.inf, log_probs), axis=-1)
    return jnp.stack([log_target, log_other], axis=-1)

  tckd = _kl_from_log_probs(binary(log_p), binary(log_q)) * t2

  t = jnp.asarray(temperature, jnp.float32)
  mask = _DKD_MASK * gt.astype(jnp.float32)
  log_p_hat = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t - mask, axis=-1)
  log_q_hat = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t - mask, axis=-1)
  nckd = _kl_from_log_probs(log_p_hat, log_q_hat) * t2
  return {'tckd': weighted(tckd, weights), 'nckd': weighted(nckd, weights)}


def dkd(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  temperature: Scalar,
  weights: jax.Array,
  alpha: Scalar,
  beta: Scalar,
) -> Metric:
  """Decoupled KD, Zhao et al. CVPR 2022: (alpha · TCKD + beta · NCKD) · T².

  See `dkd_terms` for the two parts (returned there with T² already applied). The paper's
  defaults are alpha = 1 and beta of 1 to 8 depending on the teacher; alpha = beta = 1 is not
  KD, whose NCKD weight is (1 − p_y) instead.
  """
  terms = dkd_terms(student_logits, teacher_logits, labels, temperature, weights)
  return combine_dkd(terms, alpha, beta)


def combine_dkd(terms: dict[str, Metric], alpha: Scalar, beta: Scalar) -> Metric:
  """alpha · TCKD + beta · NCKD from `dkd_terms` (for callers that also log the parts)."""
  (tckd, count), (nckd, _) = terms['tckd'], terms['nckd']
  alpha = jnp.asarray(alpha, jnp.float32)
  beta = jnp.asarray(beta, jnp.float32)
  return alpha * tckd + beta * nckd, count


def label_smoothed_cross_entropy(
  logits: jax.Array, labels: jax.Array, weights: jax.Array, smoothing: Scalar
) -> Metric:
  """(1 − ε) · (−log q_y) + ε · (1/C) Σ_c (−log q_c): uniform label smoothing.

  Szegedy et al. 2016 ("Rethinking the Inception Architecture"); the cross-entropy against
  targets (1 − ε)·onehot(y) + ε/C, i.e. optax.smooth_labels + optax.softmax_cross_entropy.
  Müller et al. 2019 ("When Does Label Smoothing Help?") relate it to KD from a uniform
  teacher. ε = smoothing; ε = 0 is the plain cross-entropy.
  """
  eps = jnp.asarray(smoothing, jnp.float32)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  gt = _one_hot(labels, logits.shape[-1])
  nll = -jnp.sum(jnp.where(gt, log_q, 0.0), axis=-1)
  smooth = -jnp.mean(log_q, axis=-1)
  return weighted((1.0 - eps) * nll + eps * smooth, weights)
