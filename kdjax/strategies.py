"""Distillation strategies built from stages: which stages a config runs, where each
distilling stage's teachers come from, and the ensemble figures the strategies report.

  multi-teacher    config.distill.extra_teachers join the configured teacher wherever it
                   is the source; distill.multi_teacher says how they combine (step.py).
  born-again       config.distill.generations = N runs distill, distill_gen2, ...,
                   distill_genN; generation g learns from generation g-1's exported student.
  assistant chain  the 'assistant' stage distills config.assistant from the teacher; a
                   'distill' after it learns from the assistant's export.
  mutual           the 'mutual' stage trains mutual.num_students students jointly (step.py).

Every stage, generations included, lives in its own `workdir/<stage>/` and resumes like the
others, so a chain killed anywhere continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Sequence

import jax
import numpy as np

from kdjax import config as config_lib

GENERATION_PREFIX = 'distill_gen'
# Generation g > 1 and mutual student i > 0 start from their own initial weights (seed
# offsets far from the role seeds); generation 1 and student_0 start from the student's
# usual ones, so they compare directly with student_alone.
GENERATION_SEED_BASE = 100
MUTUAL_SEED_BASE = 200


def generation_stage(g: int) -> str:
  return 'distill' if g == 1 else f'{GENERATION_PREFIX}{g}'


def base_stage(name: str) -> str:
  """The stage kind: 'distill' for every born-again generation, else the name itself."""
  return 'distill' if name.startswith(GENERATION_PREFIX) else name


def generation(name: str) -> int:
  """1 for 'distill', g for 'distill_gen<g>', 0 for stages that are not generations."""
  if name == 'distill':
    return 1
  return int(name[len(GENERATION_PREFIX) :]) if name.startswith(GENERATION_PREFIX) else 0


def stage_names(config) -> tuple[str, ...]:
  """config.stages with 'distill' followed by its later generations."""
  names = []
  for stage in config.stages:
    names.append(stage)
    if stage == 'distill':
      names.extend(generation_stage(g) for g in range(2, config.distill.generations + 1))
  return tuple(names)


def init_key(key: jax.Array, name: str, member: str) -> jax.Array:
  """The key a stage member's initial weights are drawn from (see the seed bases above)."""
  g = generation(name)
  if g > 1:
    return jax.random.fold_in(key, GENERATION_SEED_BASE + g)
  if member.startswith('student_') and member != 'student_0':
    return jax.random.fold_in(key, MUTUAL_SEED_BASE + int(member.split('_')[1]))
  return key


@dataclasses.dataclass(frozen=True)
class TeacherSource:
  export_dir: pathlib.Path
  name: str  # how errors and result.json name it: a config key and value, or a stage
  # The config role whose spec describes the model when this run trains it (its spec is
  # known before it exists); None for an export made elsewhere (read its model.json).
  role: str | None


def teacher_dir(config, workdir: pathlib.Path) -> pathlib.Path:
  if config.teacher.path:
    return config_lib.teacher_export_dir(config.teacher.path)
  return workdir / 'teacher' / 'export' / 'teacher'


def _assistant_feeds_distill(config) -> bool:
  stages = tuple(config.stages)
  return (
    'assistant' in stages
    and 'distill' in stages
    and stages.index('assistant') < stages.index('distill')
  )


def teacher_sources(config, workdir: pathlib.Path, name: str) -> list[TeacherSource]:
  """The frozen teachers of a distilling stage ('assistant', 'distill', 'distill_gen<g>')."""
  g = generation(name)
  if g > 1:
    previous = generation_stage(g - 1)
    return [TeacherSource(workdir / previous / 'export' / 'student', previous, 'student')]
  if name == 'distill' and _assistant_feeds_distill(config):
    return [TeacherSource(workdir / 'assistant' / 'export' / 'assistant', 'assistant', 'assistant')]
  if config.teacher.path:
    primary = TeacherSource(
      teacher_dir(config, workdir), f'config.teacher.path={config.teacher.path!r}', None
    )
  else:
    primary = TeacherSource(teacher_dir(config, workdir), 'teacher', 'teacher')
  extra = [
    TeacherSource(
      config_lib.teacher_export_dir(path), f'config.distill.extra_teachers[{i}]={path!r}', None
    )
    for i, path in enumerate(config.distill.extra_teachers)
  ]
  return [primary, *extra]


def teacher_weights(config, num_teachers: int) -> tuple[float, ...]:
  """Normalised weights of a stage's teachers; teacher_weights only describe the configured
  teacher set, so a stage with one teacher (assistant-fed, later generations) gets (1.0,)."""
  if num_teachers == 1:
    return (1.0,)
  weights = tuple(float(w) for w in config.distill.teacher_weights) or (1.0,) * num_teachers
  total = sum(weights)
  return tuple(w / total for w in weights)


def probabilities(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def ensemble_log_probs(logits: Sequence[np.ndarray], weights: Sequence[float] = ()) -> np.ndarray:
  """log Σ_k w_k softmax(z_k): the averaged-probability ensemble, as logits (equal weights
  by default)."""
  weights = tuple(weights) or (1.0 / len(logits),) * len(logits)
  mixture = sum(w * probabilities(z) for w, z in zip(weights, logits))
  return np.log(np.maximum(mixture, 1e-30))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def mutual_report(logits: dict[str, np.ndarray], labels: np.ndarray) -> dict:
  """Each mutual student's dev accuracy, their mean, and their ensemble's."""
  accuracies = [_accuracy(z, labels) for z in logits.values()]
  return {
    'eval_accuracy': accuracies,
    'mean_eval_accuracy': float(np.mean(accuracies)),
    'ensemble_eval_accuracy': _accuracy(ensemble_log_probs(list(logits.values())), labels),
  }


def generation_report(
  workdir: pathlib.Path,
  name: str,
  current: np.ndarray,
  labels: np.ndarray,
  predict: Callable[[pathlib.Path], np.ndarray],
) -> dict:
  """Accuracy of generations 1..g (the earlier ones re-evaluated from their exports) and of
  their averaged-probability ensemble (Furlanello et al. 2018)."""
  g = generation(name)
  logits = [predict(workdir / generation_stage(i) / 'export' / 'student') for i in range(1, g)]
  logits.append(current)
  return {
    'stages': [generation_stage(i) for i in range(1, g + 1)],
    'eval_accuracy': [_accuracy(z, labels) for z in logits],
    'ensemble_eval_accuracy': _accuracy(ensemble_log_probs(logits), labels),
  }
