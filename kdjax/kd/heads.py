"""Learned projections that some distillation terms need, trained alongside the student.

When a student's hidden width differs from the teacher's, FitNets/TinyBERT-style hidden
losses compare `student_hidden @ W` with the teacher's hidden state; CRD maps both models'
sentence vectors into one contrastive space. These weights belong to the objective, not to
either model: they are optimised with the student and dropped from its export.
Parameters are a plain dict {head name: {'kernel': [in, out], 'bias': [out]}}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hidden_projection_name(student_index: int, teacher_index: int) -> str:
  return f'hidden_{student_index}_to_{teacher_index}'


def init_linear(key: jax.Array, d_in: int, d_out: int) -> dict:
  """LeCun-normal kernel (unit-variance outputs for unit-variance inputs), zero bias."""
  kernel = jax.random.normal(key, (d_in, d_out), jnp.float32) / jnp.sqrt(jnp.float32(d_in))
  return {'kernel': kernel, 'bias': jnp.zeros((d_out,), jnp.float32)}


def init_heads(key: jax.Array, shapes: dict[str, tuple[int, int]]) -> dict:
  """One linear head per name in `shapes` ({name: (d_in, d_out)}), each with its own key."""
  return {
    name: init_linear(jax.random.fold_in(key, i), d_in, d_out)
    for i, (name, (d_in, d_out)) in enumerate(sorted(shapes.items()))
  }


def linear(head: dict, x: jax.Array) -> jax.Array:
  bias = head['bias'].reshape((1,) * (x.ndim - 1) + (-1,))  # explicit rank, no promotion
  return x.astype(jnp.float32) @ head['kernel'] + bias


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
