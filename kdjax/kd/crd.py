"""Contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020).

The student's embedding of an input is pulled towards the teacher's embedding of the same input
(the positive) and pushed away from the teacher's embeddings of other inputs (the negatives),
which transfers the structure of the teacher's representation rather than per-dimension values.
The embedding heads (linear projections followed by L2 normalisation) are applied by the caller:
every function here takes already-normalised embeddings [B, E], so s·t is a cosine similarity.

Two sources of negatives:
  in-batch      `info_nce`: the other real examples of the batch (no state; B − 1 negatives).
  memory bank   `bank_nce` with `init_bank`, `sample_negatives` and `update_bank`: the original
                CRD setting, K negatives drawn from momentum-updated banks over the whole dataset,
                one bank of student and one of teacher embeddings.

`weights` [B] removes padded examples (weight 0): they are neither anchors nor negatives, and
their embeddings may hold any values (they are zeroed before use). Weights > 0 weight the anchors'
losses; a negative is included whenever its weight is > 0. Teacher embeddings are used as given
(the teacher's embedding head is trained with the student in CRD, so no stop_gradient here); the
banks are state, not parameters, and never receive gradients. Everything is pure: the bank
functions return new arrays.
"""

import jax
import jax.numpy as jnp

from kdjax.losses import Metric, weighted

# Added to the logits of excluded negatives: exp() of it underflows to exactly 0 in float32.
MASK_BIAS = -1e9
_EPS = 1e-12


def _normalise(x: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _EPS)


def _valid_rows(emb: jax.Array, valid: jax.Array) -> jax.Array:
  """float32 embeddings with padded rows zeroed, so their values reach neither loss nor gradient."""
  return jnp.where(valid[:, None], emb.astype(jnp.float32), 0.0)


def info_nce(
  student_emb: jax.Array,
  teacher_emb: jax.Array,
  weights: jax.Array,
  temperature: float,
  symmetric: bool = False,
) -> Metric:
  """InfoNCE with in-batch negatives (van den Oord et al. 2018; CRD's critic without a bank).

  For each valid anchor i (weight > 0), with V the set of valid examples:
    loss_i = −log( exp(s_i·t_i/τ) / Σ_{j∈V} exp(s_i·t_j/τ) )              (student-anchored)
  `symmetric=True` averages it with the teacher-anchored direction
    loss'_i = −log( exp(t_i·s_i/τ) / Σ_{j∈V} exp(t_i·s_j/τ) ),
  as CRD contrasts both ways. Returns (Σ_i w_i loss_i, Σ_i w_i).
  """
  valid = weights > 0
  s = _valid_rows(student_emb, valid)
  t = _valid_rows(teacher_emb, valid)
  tau = jnp.asarray(temperature, jnp.float32)
  logits = jnp.einsum('ie,je->ij', s, t) / tau  # [anchor s_i, candidate t_j]
  keep = valid[None, :]  # [1, B]: only valid candidates
  diag = jnp.eye(logits.shape[0], dtype=bool)

  def nll(scores):  # −log softmax at the diagonal, rows are anchors
    log_probs = jax.nn.log_softmax(jnp.where(keep, scores, MASK_BIAS), axis=-1)
    return -jnp.sum(jnp.where(diag, log_probs, 0.0), axis=-1)

  per_item = nll(logits)
  if symmetric:
    per_item = 0.5 * (per_item + nll(logits.T))
  return weighted(jnp.where(valid, per_item, 0.0), weights)


def init_bank(rng: jax.Array, size: int, dim: int) -> jax.Array:
  """[size, dim] float32 random unit vectors (isotropic Gaussian, normalised)."""
  return _normalise(jax.random.normal(rng, (size, dim), jnp.float32))


def sample_negatives(
  rng: jax.Array, batch_indices: jax.Array, bank_size: int, num_negatives: int
) -> jax.Array:
  """int32 [B, K] bank indices drawn uniformly with replacement from {0..bank_size−1} \\ {own}.

  `batch_indices` [B] are the examples' dataset indices (= their bank rows). A draw r from
  {0..bank_size−2} is shifted to r + 1 when r ≥ own, which is uniform over the other rows and
  never equals the own index. (CRD's sampler draws from the whole bank; excluding the own row
  keeps a stale copy of the positive out of the negatives.) Rows of padded examples get valid
  indices too, whatever their batch index; their losses are weighted out. `bank_size` and
  `num_negatives` are static.
  """
  if bank_size < 2:
    raise ValueError(f'bank_size={bank_size}: need at least 2 rows to draw negatives')
  own = batch_indices.astype(jnp.int32)[:, None]
  draws = jax.random.randint(
    rng, (batch_indices.shape[0], num_negatives), 0, bank_size - 1, jnp.int32
  )
  return draws + (draws >= own).astype(jnp.int32)


def bank_nce(
  student_emb: jax.Array,
  teacher_emb: jax.Array,
  bank_teacher: jax.Array,
  bank_student: jax.Array,
  batch_indices: jax.Array,
  negative_indices: jax.Array,
  weights: jax.Array,
  temperature: float,
  fresh_positives: bool = False,
) -> Metric:
  """CRD with both memory banks, in the InfoNCE (softmax over 1 + K) form.

  For a valid example i with dataset index y_i and negatives n_i1..n_iK (`negative_indices`):
    student-anchored:  ℓ_s = −log( e^{s_i·p^T_i/τ} / (e^{s_i·p^T_i/τ} + Σ_k e^{s_i·M^T[n_ik]/τ}) )
    teacher-anchored:  ℓ_t = −log( e^{t_i·p^S_i/τ} / (e^{t_i·p^S_i/τ} + Σ_k e^{t_i·M^S[n_ik]/τ}) )
    loss_i = (ℓ_s + ℓ_t) / 2
  with M^T = `bank_teacher`, M^S = `bank_student`. The positives are, as in CRD's code, the bank
  rows of the example itself, p^T_i = M^T[y_i] and p^S_i = M^S[y_i]; `fresh_positives=True`
  uses the current batch instead, p^T_i = t_i and p^S_i = s_i (no staleness, useful while the
  banks are still close to their random initialisation, and then the teacher-anchored term also
  trains the student). Banks get no gradient.

  Choice of form: CRD optimises a binary NCE objective (positive vs. K noise samples, noise
  distribution 1/N over the dataset) on exp(s·t/τ)/Z, with the normaliser Z estimated once from
  the first batch. The softmax form above (InfoNCE, van den Oord et al. 2018) needs no Z
  estimate, is well defined from the first step and is what later contrastive distillation work
  uses; with fresh positives and the other batch rows as negatives it equals `info_nce`. The two directions are averaged (CRD sums them), so the
  scale matches `info_nce(symmetric=True)`. Returns (Σ_i w_i loss_i, Σ_i w_i).
  """
  valid = weights > 0
  s = _valid_rows(student_emb, valid)
  t = _valid_rows(teacher_emb, valid)
  bank_teacher = jax.lax.stop_gradient(bank_teacher.astype(jnp.float32))
  bank_student = jax.lax.stop_gradient(bank_student.astype(jnp.float32))
  tau = jnp.asarray(temperature, jnp.float32)
  if fresh_positives:
    pos_teacher, pos_student = t, s
  else:
    pos_teacher, pos_student = bank_teacher[batch_indices], bank_student[batch_indices]

  def nll(anchor, positive, bank):
    negatives = bank[negative_indices]  # [B, K, E]
    logits = jnp.concatenate(
      [
        jnp.sum(anchor * positive, axis=-1, keepdims=True),
        jnp.einsum('be,bke->bk', anchor, negatives),
      ],
      axis=-1,
    )
    return -jax.nn.log_softmax(logits / tau, axis=-1)[:, 0]

  per_item = 0.5 * (nll(s, pos_teacher, bank_teacher) + nll(t, pos_student, bank_student))
  return weighted(jnp.where(valid, per_item, 0.0), weights)


def update_bank(
  bank: jax.Array,
  batch_indices: jax.Array,
  embeddings: jax.Array,
  weights: jax.Array,
  momentum: float,
) -> jax.Array:
  """bank[y_i] ← normalise(momentum · bank[y_i] + (1 − momentum) · emb_i) for valid rows.

  Rows of padded examples (weight 0) leave the bank unchanged whatever their batch index (even
  one shared with a valid row, or −1); so do rows not in the batch. A dataset index that occurs
  twice among the valid rows gets one of the two updates. The embeddings are not differentiated
  through (CRD updates its memory under no_grad). Returns the new bank.
  """
  valid = weights > 0
  emb = jax.lax.stop_gradient(embeddings.astype(jnp.float32))
  bank = bank.astype(jnp.float32)
  m = jnp.asarray(momentum, jnp.float32)
  rows = _normalise(m * bank[batch_indices] + (1.0 - m) * emb)
  # Padded rows are sent out of range and dropped, so they can never overwrite a valid update.
  target = jnp.where(valid, batch_indices.astype(jnp.int32), bank.shape[0])
  return bank.at[target].set(rows, mode='drop')
