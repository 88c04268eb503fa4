"""The distillation objective a run's config asks for: a weighted, scheduled sum of terms.

`config.loss.weights` names every term the library offers with its weight (0 = off) and
`config.loss.schedules` may move any weight, and the temperature, during the stage (see
schedules.py). `build()` checks the terms against the two models' outputs once, before
anything is compiled, and `Objective.__call__` is the pure function the train step
differentiates. Every term's (sum, count) is returned whatever its weight, together with
KL at T and at T = 1, top-1 agreement and the scheduled values, so runs can be compared on
the same scale.

Layer-wise terms (hidden_mse, hidden_cosine, pkd, attention_*) are summed over the pairs
of `loss.layer_map`, as TinyBERT and Patient-KD sum over layers. The pooled terms (pooled_mse,
crd) read one sentence vector per model, which the teacher-output cache can store.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.kd import crd, features, heads, output, relations, schedules

# Terms that only need logits (they work with a teacher-output cache).
LOGIT_TERMS = ('ce', 'kl', 'reverse_kl', 'jsd', 'soft_ce', 'logit_mse', 'dkd')
# Terms that need the teacher's features beyond its logits.
FEATURE_TERMS = (
  'hidden_mse',
  'hidden_cosine',
  'pkd',
  'attention_kl',
  'attention_mse',
  'minilm',
  'minilmv2',
  'crd',
  'pooled_mse',
)
# Feature terms that read only the teacher's pooled sentence vector (out['pooled']): the
# teacher-output cache can store it, so these work with the teacher run once, not live.
POOLED_TERMS = ('crd', 'pooled_mse')
TERMS = LOGIT_TERMS + FEATURE_TERMS
LAYER_MAPS = ('uniform', 'last_k', 'explicit')


def metric_name(term: str) -> str:
  """The metrics key of a term: its name, except KL, logged as kl_T next to kl_T1."""
  return 'kl_T' if term == 'kl' else term


CRD_NEGATIVES = ('in_batch',)
# The learned head that maps the student's pooled vector to the teacher's width (pooled_mse).
POOLED_PROJECTION = 'pooled_projection'
Shapes = Mapping[str, tuple[int, ...]]


class ObjectiveError(ValueError):
  """The configured terms cannot be computed for these models; says which and why."""


def active_terms(loss_cfg) -> tuple[str, ...]:
  """Terms with a nonzero weight or a schedule that may make it nonzero."""
  return tuple(
    name
    for name in TERMS
    if loss_cfg['weights'][name] != 0 or loss_cfg['schedules'][name] not in ('', 'constant')
  )


def needs_teacher_features(loss_cfg) -> bool:
  return any(name in FEATURE_TERMS for name in active_terms(loss_cfg))


def needs_teacher_pooled(loss_cfg) -> bool:
  """Whether a term reads the teacher's pooled vector (the cache must then store it)."""
  return any(name in POOLED_TERMS for name in active_terms(loss_cfg))


def needs_live_teacher(loss_cfg) -> bool:
  """Whether a term reads teacher features that the teacher-output cache cannot hold."""
  return any(name in FEATURE_TERMS and name not in POOLED_TERMS for name in active_terms(loss_cfg))


def validate(loss_cfg, fail) -> None:
  """Config-level checks (no models needed); `fail(ok, key, value, valid)` reports."""
  weights, scheds = loss_cfg['weights'], loss_cfg['schedules']
  fail(
    sorted(weights) == sorted(TERMS),
    'loss.weights',
    sorted(weights),
    f'exactly the terms {", ".join(TERMS)}',
  )
  for name in TERMS:
    w = weights[name]
    fail(isinstance(w, (int, float)) and w >= 0, f'loss.weights.{name}', w, 'a number >= 0')
  fail(bool(active_terms(loss_cfg)), 'loss.weights', dict(weights), 'at least one term > 0')
  for name in ('temperature', *TERMS):
    try:
      schedules.parse(scheds[name], f'config.loss.schedules.{name}')
    except schedules.ScheduleError as e:
      fail(False, f'loss.schedules.{name}', scheds[name], str(e))
  fail(loss_cfg['temperature'] > 0, 'loss.temperature', loss_cfg['temperature'], 'must be > 0')
  fail(
    0 <= loss_cfg['label_smoothing'] < 1,
    'loss.label_smoothing',
    loss_cfg['label_smoothing'],
    'in [0, 1)',
  )
  fail(
    0 < loss_cfg['jsd_teacher_mix'] < 1,
    'loss.jsd_teacher_mix',
    loss_cfg['jsd_teacher_mix'],
    'in (0, 1): the weight of the teacher distribution in the JSD mixture',
  )
  for name in ('dkd_alpha', 'dkd_beta'):
    fail(loss_cfg[name] >= 0, f'loss.{name}', loss_cfg[name], 'must be >= 0')
  fail(
    loss_cfg['layer_map'] in LAYER_MAPS,
    'loss.layer_map',
    loss_cfg['layer_map'],
    f'one of {", ".join(LAYER_MAPS)}',
  )
  fail(
    loss_cfg['layer_map_last_k'] >= 1, 'loss.layer_map_last_k', loss_cfg['layer_map_last_k'], '>= 1'
  )
  fail(
    loss_cfg['minilm_relation_heads'] >= 0,
    'loss.minilm_relation_heads',
    loss_cfg['minilm_relation_heads'],
    ">= 0 (0 = the teacher's attention heads)",
  )
  fail(
    loss_cfg['crd_negatives'] in CRD_NEGATIVES,
    'loss.crd_negatives',
    loss_cfg['crd_negatives'],
    f'one of {", ".join(CRD_NEGATIVES)}',
  )
  fail(loss_cfg['crd_dim'] >= 1, 'loss.crd_dim', loss_cfg['crd_dim'], '>= 1')
  fail(loss_cfg['crd_temperature'] > 0, 'loss.crd_temperature', loss_cfg['crd_temperature'], '> 0')


def _num_layers(shapes: Shapes) -> int:
  return max((int(k.split('_')[1]) for k in shapes if k.startswith('hidden_')), default=0)


def _hidden_key(index: int) -> str:
  return 'embeddings' if index == 0 else f'hidden_{index}'


def _sum(metrics: list[losses.Metric]) -> losses.Metric:
  """Adds per-layer terms; every part has the same count (same tokens or examples)."""
  return sum(m[0] for m in metrics), metrics[0][1]


@dataclasses.dataclass(frozen=True)
class Objective:
  cfg: Mapping[str, Any]  # plain values copied out of config.loss
  terms: tuple[str, ...]
  total_steps: int
  layer_pairs: tuple[tuple[int, int], ...] = ()
  attention_pairs: tuple[tuple[int, int], ...] = ()
  minilm_layers: tuple[int, int] = (0, 0)  # (student layer, teacher layer)
  minilm_heads: int = 0  # MiniLM v1: attention heads; v2: relation heads
  head_shapes: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

  @property
  def needs_teacher_features(self) -> bool:
    return any(t in FEATURE_TERMS for t in self.terms)

  def init_heads(self, key: jax.Array) -> dict:
    return heads.init_heads(key, dict(self.head_shapes))

  def _schedule(self, name: str, base: float):
    spec = schedules.parse(self.cfg['schedules'][name], f'config.loss.schedules.{name}')
    return schedules.make(spec, base, self.total_steps)

  def temperature(self, step):
    """The scheduled temperature at `step`, for targets built outside the objective (a
    mixture of teachers is only valid at the temperature the objective then uses)."""
    return self._schedule('temperature', self.cfg['temperature'])(step)

  def _project(self, head_params, s: int, t: int, x):
    name = heads.hidden_projection_name(s, t)
    return heads.linear(head_params[name], x) if name in self.head_shapes else x

  def __call__(self, step, student, teacher, batch, head_params=None):
    """student/teacher: (logits, out) pairs (the teacher already stop-gradiented; its `out`
    may be empty when only logit terms are active). Returns (loss, metrics)."""
    cfg = self.cfg
    s_logits, s_out = student
    t_logits, t_out = teacher
    head_params = head_params or {}
    temperature = self.temperature(step)
    weights = batch['weights'].astype(jnp.float32)
    # Augmented, teacher-labelled examples carry label -1: teacher terms only.
    label_weights = weights * (batch['labels'] >= 0)
    labels = jnp.maximum(batch['labels'], 0)
    # Token weights exist only for sequence models; logit terms never read them.
    mask = (
      features.token_weights(batch['attention_mask'], weights)
      if self.needs_teacher_features
      else None
    )

    m: dict[str, losses.Metric] = {}
    if cfg['label_smoothing']:
      m['ce'] = output.label_smoothed_cross_entropy(
        s_logits, labels, label_weights, cfg['label_smoothing']
      )
    else:
      m['ce'] = losses.cross_entropy(s_logits, labels, label_weights)
    m['kl_T'] = output.forward_kl(s_logits, t_logits, temperature, weights)
    m['kl_T1'] = output.forward_kl(s_logits, t_logits, 1.0, weights)
    m['logit_mse'] = output.logit_mse(s_logits, t_logits, weights)
    m['accuracy'] = losses.accuracy(s_logits, labels, label_weights)
    m['agreement'] = losses.agreement(s_logits, t_logits, weights)
    term = {'ce': m['ce'], 'kl': m['kl_T'], 'logit_mse': m['logit_mse']}
    active = set(self.terms)
    if 'reverse_kl' in active:
      term['reverse_kl'] = m['reverse_kl'] = output.reverse_kl(
        s_logits, t_logits, temperature, weights
      )
    if 'jsd' in active:
      term['jsd'] = m['jsd'] = output.generalized_jsd(
        s_logits, t_logits, temperature, weights, cfg['jsd_teacher_mix']
      )
    if 'soft_ce' in active:
      term['soft_ce'] = m['soft_ce'] = output.soft_cross_entropy(
        s_logits, t_logits, temperature, weights
      )
    if 'dkd' in active:
      parts = output.dkd_terms(s_logits, t_logits, labels, temperature, label_weights)
      m['dkd_tckd'], m['dkd_nckd'] = parts['tckd'], parts['nckd']
      term['dkd'] = m['dkd'] = output.combine_dkd(parts, cfg['dkd_alpha'], cfg['dkd_beta'])
    hidden = lambda out, i: out[_hidden_key(i)]
    if 'hidden_mse' in active:
      term['hidden_mse'] = m['hidden_mse'] = _sum(
        [
          features.hidden_mse(
            self._project(head_params, s, t, hidden(s_out, s)), hidden(t_out, t), mask
          )
          for s, t in self.layer_pairs
        ]
      )
    if 'hidden_cosine' in active:
      term['hidden_cosine'] = m['hidden_cosine'] = _sum(
        [
          features.cosine_embedding(
            self._project(head_params, s, t, hidden(s_out, s)), hidden(t_out, t), mask
          )
          for s, t in self.layer_pairs
        ]
      )
    if 'pkd' in active:
      term['pkd'] = m['pkd'] = _sum(
        [
          features.pkd_cls(
            self._project(head_params, s, t, hidden(s_out, s)[:, 0]),
            hidden(t_out, t)[:, 0],
            weights,
          )
          for s, t in self.layer_pairs
        ]
      )
    for name, fn in (
      ('attention_kl', features.attention_kl),
      ('attention_mse', features.attention_mse),
    ):
      if name in active:
        term[name] = m[name] = _sum(
          [
            fn(_attention(s_out, s, 'student'), _attention(t_out, t, 'teacher'), mask)
            for s, t in self.attention_pairs
          ]
        )
    s_layer, t_layer = self.minilm_layers
    if 'minilm' in active:
      m['minilm_attention'] = features.attention_kl(
        _attention(s_out, s_layer, 'student'), _attention(t_out, t_layer, 'teacher'), mask
      )
      m['minilm_value'] = relations.minilm_value_relation(
        s_out, t_out, s_layer, t_layer, self.minilm_heads, mask
      )
      term['minilm'] = m['minilm'] = _sum([m['minilm_attention'], m['minilm_value']])
    if 'minilmv2' in active:
      parts = relations.minilmv2_relations(s_out, t_out, s_layer, t_layer, self.minilm_heads, mask)
      for kind, metric in parts.items():
        m[f'minilmv2_{kind}'] = metric
      term['minilmv2'] = m['minilmv2'] = _sum(list(parts.values()))
    if 'pooled_mse' in active:
      s_pooled = s_out['pooled']
      if POOLED_PROJECTION in self.head_shapes:
        s_pooled = heads.linear(head_params[POOLED_PROJECTION], s_pooled)
      term['pooled_mse'] = m['pooled_mse'] = features.hidden_mse(s_pooled, t_out['pooled'], weights)
    if 'crd' in active:
      s_emb = heads.l2_normalize(heads.linear(head_params['crd_student'], s_out['pooled']))
      t_emb = heads.l2_normalize(heads.linear(head_params['crd_teacher'], t_out['pooled']))
      term['crd'] = m['crd'] = crd.info_nce(
        s_emb, t_emb, weights, cfg['crd_temperature'], symmetric=True
      )

    loss = jnp.zeros((), jnp.float32)
    one = jnp.ones((), jnp.float32)
    m['schedule/temperature'] = (temperature, one)
    for name in self.terms:
      weight = self._schedule(name, cfg['weights'][name])(step)
      m[f'schedule/{name}'] = (weight, one)
      loss = loss + weight * losses.mean(term[name])
    count = jnp.sum(weights)
    m['loss'] = (loss * count, count)
    return loss, m


def _attention(out: dict, layer: int, side: str):
  """out['attn_{layer}'], or one clear error where `build` was given other shapes than the
  model returns (e.g. a BERT switched to attention_impl='fused' after the objective was built)."""
  key = f'attn_{layer}'
  if key not in out:
    raise ObjectiveError(
      f'the attention terms read {key!r}, but the {side} model returned no attention maps; '
      "use a bert with attention_impl='explicit' or set the attention weights to 0"
    )
  return out[key]


def build(loss_cfg, total_steps: int, student_shapes: Shapes, teacher_shapes: Shapes) -> Objective:
  """The objective for two models whose outputs have these shapes ({'logits': ..., out keys})."""
  cfg = _plain(loss_cfg)
  terms = active_terms(cfg)
  s_layers, t_layers = _num_layers(student_shapes), _num_layers(teacher_shapes)
  layer_terms = {'hidden_mse', 'hidden_cosine', 'pkd', 'attention_kl', 'attention_mse'}
  pairs, attention_pairs, head_shapes = (), (), {}
  if layer_terms & set(terms):
    try:
      pairs = features.layer_map(
        cfg['layer_map'],
        s_layers,
        t_layers,
        last_k=cfg['layer_map_last_k'],
        pairs=tuple(tuple(p) for p in cfg['layer_pairs']),
      )
    except ValueError as e:
      raise ObjectiveError(f'config.loss.layer_map={cfg["layer_map"]!r}: {e}') from None
  if {'hidden_mse', 'hidden_cosine', 'pkd'} & set(terms):
    for s, t in pairs:
      d_s = student_shapes[_hidden_key(s)][-1]
      d_t = teacher_shapes[_hidden_key(t)][-1]
      if d_s != d_t:
        head_shapes[heads.hidden_projection_name(s, t)] = (d_s, d_t)
  attention_terms = {'attention_kl', 'attention_mse', 'minilm', 'minilmv2'} & set(terms)
  for name in sorted(attention_terms):
    for side, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
      if 'attn_1' not in shapes:
        raise ObjectiveError(
          f'config.loss.weights.{name} needs self-attention, but the {side} model returns no '
          "attention maps (only 'bert' with attention_impl='explicit' does); set the weight to "
          f"0 or use a bert {side} with attention_impl='explicit'"
        )
  if {'attention_kl', 'attention_mse'} & set(terms):
    attention_pairs = tuple((s, t) for s, t in pairs if s > 0 and t > 0)
    s_heads, t_heads = student_shapes['attn_1'][1], teacher_shapes['attn_1'][1]
    if s_heads != t_heads:
      raise ObjectiveError(
        f'attention terms compare head by head, but the student has {s_heads} heads and the '
        f'teacher {t_heads}; use loss.weights.minilmv2 (relation heads) instead'
      )
    if not attention_pairs:
      raise ObjectiveError(f'config.loss.layer_map gives no layer pairs with attention: {pairs}')
  minilm_layers, minilm_heads = (0, 0), 0
  if {'minilm', 'minilmv2'} & set(terms):
    t_layer = cfg['minilm_teacher_layer'] or t_layers
    if not 1 <= t_layer <= t_layers:
      raise ObjectiveError(
        f'config.loss.minilm_teacher_layer={cfg["minilm_teacher_layer"]}: the teacher has '
        f'layers 1..{t_layers} (0 = the last)'
      )
    minilm_layers = (s_layers, t_layer)
    t_heads = teacher_shapes['attn_1'][1]
    if 'minilm' in terms and student_shapes['attn_1'][1] != t_heads:
      raise ObjectiveError(
        f'loss.weights.minilm (MiniLM v1) needs equal head counts, got student '
        f'{student_shapes["attn_1"][1]} and teacher {t_heads}; use loss.weights.minilmv2'
      )
    minilm_heads = cfg['minilm_relation_heads'] or t_heads
    if 'minilmv2' in terms:
      for side, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
        width = shapes['hidden_1'][-1]
        if width % minilm_heads:
          raise ObjectiveError(
            f'config.loss.minilm_relation_heads={minilm_heads} does not divide the {side} '
            f'width {width}'
          )
  for name in sorted(set(POOLED_TERMS) & set(terms)):
    for side, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
      if 'pooled' not in shapes:
        raise ObjectiveError(
          f'config.loss.weights.{name} compares pooled sentence vectors, but the {side} model '
          "returns none (out['pooled']: bert, bilstm, cnn and mlp do); set the weight to 0"
        )
  if 'pooled_mse' in terms and student_shapes['pooled'][-1] != teacher_shapes['pooled'][-1]:
    head_shapes[POOLED_PROJECTION] = (student_shapes['pooled'][-1], teacher_shapes['pooled'][-1])
  if 'crd' in terms:
    head_shapes['crd_student'] = (student_shapes['pooled'][-1], cfg['crd_dim'])
    head_shapes['crd_teacher'] = (teacher_shapes['pooled'][-1], cfg['crd_dim'])
  return Objective(
    cfg=cfg,
    terms=terms,
    total_steps=total_steps,
    layer_pairs=tuple(pairs),
    attention_pairs=attention_pairs,
    minilm_layers=minilm_layers,
    minilm_heads=minilm_heads,
    head_shapes=head_shapes,
  )


def logits_only(loss_cfg, total_steps: int) -> Objective:
  """An objective over logits alone (teacher-output cache, online stage); refuses feature
  terms, which need model outputs `build` would check."""
  cfg = _plain(loss_cfg)
  terms = active_terms(cfg)
  feature = [t for t in terms if t in FEATURE_TERMS]
  if feature:
    raise ObjectiveError(
      f"loss.weights.{feature[0]} needs the models' features; only the distill stage has "
      "them (hidden states and attention with distill.teacher_cache='off')"
    )
  return Objective(cfg=cfg, terms=terms, total_steps=total_steps)


def _plain(loss_cfg) -> dict:
  """A hashable-free plain copy: ConfigDicts are not valid static data inside jit."""
  to_dict = getattr(loss_cfg, 'to_dict', None)
  return to_dict() if to_dict else dict(loss_cfg)
