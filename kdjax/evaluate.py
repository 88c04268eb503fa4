"""Evaluators: logits over a split, accuracy, agreement, model size, throughput."""

import time
from typing import Callable

import jax
import numpy as np

from kdjax.models import registry


def predict_logits(logits_fn: Callable, params, batches) -> np.ndarray:
  """Logits for every real example of `batches`, in order; filler rows are dropped."""
  chunks = []
  for batch in batches:
    logits = np.asarray(jax.device_get(logits_fn(params, batch)))
    chunks.append(logits[batch['weights'] > 0])
  return np.concatenate(chunks, axis=0)


def timed_logits(logits_fn: Callable, params, make_batches: Callable) -> tuple[np.ndarray, float]:
  """(logits, examples/s) where the rate comes from a second pass, after compilation."""
  logits = predict_logits(logits_fn, params, make_batches())
  start = time.perf_counter()
  predict_logits(logits_fn, params, make_batches())
  return logits, len(logits) / (time.perf_counter() - start)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits_a, axis=-1) == np.argmax(logits_b, axis=-1)))


def model_stats(params) -> dict:
  return {'params': registry.count_params(params), 'bytes': registry.param_bytes(params)}
