"""One full training step (forward, loss, backward, AdamW update) of kdjax's distillation
set-ups, against the hardware's matmul ceiling and, with --torch, against the same step in
PyTorch.

  python benchmarks/distill_step.py [--steps=5] [--rounds=3] [--batch-sizes=32,128]
      [--seq-lens=32,64,128] [--tasks=distill_bilstm,distill_bert,finetune_teacher,hinton_mnist]
      [--torch] [--compile] [--ragged] [--out=runs/bench_distill_step.json]

Tasks (the models of experiments/sst2_minilm_students.py and experiments/hinton_mnist.py):
  distill_bilstm    MiniLM-sized BERT teacher (6 × 384, 12 heads, FFN 1536, vocab 30522),
                    frozen and run live → the BiLSTM student preset; CE + T²·KL at T = 2
  distill_bert      the same teacher → the 2 × 384 transformer student (4.5 M params)
  finetune_teacher  the MiniLM-sized classifier trained on CE
  hinton_mnist      MLP 784-1200-1200-10 frozen → 784-800-800-10; 0.1·CE + T²·KL at T = 20
Each kdjax row runs kdjax.step.make_train_step with optax.adamw: the step users run. Batches
are on the device before timing. tokens/s counts batch × seq_len positions; every position is
a real token unless --ragged draws row lengths in [L/2, L] (then padding is counted too, as
kdjax computes it). For hinton_mnist a "token" is an image.

Every variant (kdjax, torch eager, torch.compile) of a configuration is compiled and warmed
up first, then timed in turns (`--rounds` rounds of `--steps` steps each, each step timed on
its own after the device finished it); the table shows the median and p90 step time.
compile s = first call − median step. FLOPs: XLA's count of the compiled step
(cost_analysis; it counts a scan's body once, so it undercounts the BiLSTM) and an analytic
count (2 FLOPs per multiply-add: 6·N·tokens for the trained model's matmul weights, 2·N·tokens
for the frozen teacher's forward, + attention 4·B·L²·D per layer forward, ×3 when trained;
embedding tables excluded). MFU = analytic FLOPs / median step time / the float32 matmul peak
measured in this process (2048² jnp.dot for kdjax, torch.mm for torch). Memory: kdjax is
XLA's memory_analysis of the step (arguments + outputs + temporaries − donated aliases);
torch is measured: params + grads + AdamW moments + batch + tensors saved for backward.

Run it on an otherwise idle machine: torch's OpenMP regions wait at a barrier for every
thread, so one thread descheduled by other work stalls each op, while XLA's thread pool
degrades more gracefully; on a shared CPU the kdjax/torch ratio is then mostly noise. For a
one-core comparison that tolerates a busy machine: XLA_FLAGS='--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1' python benchmarks/distill_step.py --torch --torch-threads=1.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


from benchmarks import common  # noqa: E402
from configs import default, models  # noqa: E402
from experiments import hinton_mnist, sst2_minilm_students  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from kdjax.kd import objective as kd_objective  # noqa: E402
from kdjax.models import registry  # noqa: E402
from kdjax.models.mlp import MLPClassifier  # noqa: E402

TASKS = ('distill_bilstm', 'distill_bert', 'finetune_teacher', 'hinton_mnist')
VOCAB = 30522  # the teacher's WordPiece vocabulary, shared by every text student
LEARNING_RATE = 1e-4


def _text_specs(scale: str) -> dict:
  """(registry name, kwargs) of the teacher and the two text students."""
  teacher = models.minilm_l6()
  bilstm = models.bilstm_small()
  bert = sst2_minilm_students.small_bert()
  specs = {'teacher': teacher, 'bilstm': bilstm, 'bert': bert}
  specs = {k: (v.model, v.kwargs.to_dict()) for k, v in specs.items()}
  if scale == 'tiny':  # for the smoke test: the same code paths at a fraction of the cost
    specs['teacher'][1].update(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    specs['bilstm'][1].update(embed_dim=16, hidden_size=16, mlp_dim=16)
    specs['bert'][1].update(
      hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, embedding_size=8
    )
  return specs


def _mlp_specs(scale: str) -> dict:
  config = hinton_mnist.get_config()
  specs = {
    role: dict(
      hidden_sizes=tuple(config[role].hidden_sizes),
      input_dropout=config[role].input_dropout,
      hidden_dropout=config[role].hidden_dropout,
    )
    for role in ('teacher', 'student')
  }
  if scale == 'tiny':
    specs['teacher']['hidden_sizes'], specs['student']['hidden_sizes'] = (32, 32), (16, 16)
  return specs


def _vocab(scale: str) -> int:
  return 1000 if scale == 'tiny' else VOCAB


def loss_config(task: str) -> dict:
  """CE + T²·KL weights: kdjax's defaults for text, Hinton et al.'s for MNIST."""
  cfg = hinton_mnist.get_config().loss if task == 'hinton_mnist' else default.get_config().loss
  return {'temperature': float(cfg.temperature), 'ce': cfg.weights.ce, 'kl': cfg.weights.kl}


def _objective(task: str):
  cfg = hinton_mnist.get_config().loss if task == 'hinton_mnist' else default.get_config().loss
  return kd_objective.logits_only(cfg, 10_000)


def models_for(task: str, scale: str, seq_len: int | None = None):
  """(student or trained model, frozen teacher or None, {'student'/'teacher': (name, kwargs)}).

  The transformer student's preset has max_len 64 (SST-2's); a longer `seq_len` widens only
  its position table (seq_len × 384 more parameters, a gather, no FLOPs).
  """
  if task == 'hinton_mnist':
    specs = _mlp_specs(scale)
    named = {role: ('mlp', kwargs) for role, kwargs in specs.items()}
    return MLPClassifier(**specs['student']), MLPClassifier(**specs['teacher']), named
  specs = _text_specs(scale)
  for _, kwargs in specs.values():
    if 'max_len' in kwargs:
      kwargs['max_len'] = max(kwargs['max_len'], seq_len or 0)
  build = lambda name: registry.build_model(
    specs[name][0], vocab_size=_vocab(scale), num_classes=2, **specs[name][1]
  )
  if task == 'finetune_teacher':
    return build('teacher'), None, {'student': specs['teacher']}
  student = 'bilstm' if task == 'distill_bilstm' else 'bert'
  return build(student), build('teacher'), {'student': specs[student], 'teacher': specs['teacher']}


def _image_distill_loss_fn(student, teacher, objective):
  """kdjax.step.distill_loss_fn for the image models (they take `image`, not token ids)."""

  def loss_fn(params, teacher_params, batch, rng, step):
    t_logits, _ = teacher.apply({'params': teacher_params}, batch['image'], deterministic=True)
    teacher_out = jax.lax.stop_gradient((t_logits, {}))
    student_out = student.apply(
      {'params': params}, batch['image'], deterministic=False, rngs={'dropout': rng}
    )
    return objective(step, student_out, teacher_out, batch)

  return loss_fn


def _init(model, key, task):
  if task == 'hinton_mnist':
    return model.init({'params': key}, jnp.zeros((2, 784)))['params']
  return registry.init_params(model, key)


def flax_param_count(model, task) -> int:
  shapes = jax.eval_shape(lambda: _init(model, jax.random.PRNGKey(0), task))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def make_batch(task: str, batch: int, seq_len: int, scale: str, ragged: bool, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  out = {
    'labels': rng.integers(0, 10 if task == 'hinton_mnist' else 2, batch).astype(np.int32),
    'weights': np.ones(batch, np.float32),
  }
  if task == 'hinton_mnist':
    out['image'] = rng.random((batch, 784), dtype=np.float32)
    return out
  lengths = rng.integers(seq_len // 2, seq_len + 1, batch) if ragged else np.full(batch, seq_len)
  mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
  out['input_ids'] = rng.integers(1000 % _vocab(scale), _vocab(scale), (batch, seq_len))
  out['input_ids'] = (out['input_ids'] * mask).astype(np.int32)
  out['attention_mask'] = mask
  return out


def _split(params) -> dict:
  """Parameter counts by how often each weight is applied: per token, per example, never
  (embedding tables: lookups, no FLOPs)."""
  counts = {'token': 0, 'example': 0, 'table': 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if name.startswith(('pooler', 'classifier', 'mlp', 'dense_')):
      kind = 'example'
    elif name.startswith(('layer_', 'lstm_', 'embeddings/word_projection')):
      kind = 'token'
    else:
      kind = 'table'  # embedding tables and the embedding LayerNorm
    counts[kind] += int(np.prod(leaf.shape))
  return counts


def forward_flops(model, params, batch: int, seq_len: int) -> float:
  """Analytic forward FLOPs: 2 per multiply-add of every matmul weight, + attention."""
  counts = _split(params)
  tokens = batch * seq_len
  flops = 2 * (counts['token'] * tokens + counts['example'] * batch)
  if hasattr(model, 'num_layers') and hasattr(model, 'num_heads'):  # scores and context
    width = model.num_heads * (model.head_dim or model.hidden_size // model.num_heads)
    flops += 4 * model.num_layers * batch * seq_len**2 * width
  return float(flops)


class JaxRow:
  """kdjax's real step for one configuration, compiled ahead of time once."""

  def __init__(self, task, batch_size, seq_len, scale, ragged):
    student, teacher, _ = models_for(task, scale, seq_len)
    self.params = _init(student, jax.random.PRNGKey(0), task)
    self.teacher_params = _init(teacher, jax.random.PRNGKey(1), task) if teacher else None
    length = 1 if task == 'hinton_mnist' else seq_len
    self.analytic_flops = 3 * forward_flops(student, self.params, batch_size, length)
    if teacher is not None:
      self.analytic_flops += forward_flops(teacher, self.teacher_params, batch_size, length)
    if task == 'hinton_mnist':
      loss_fn = _image_distill_loss_fn(student, teacher, _objective(task))
    elif teacher is None:
      loss_fn = step_lib.supervised_loss_fn(student)
    else:
      loss_fn = step_lib.distill_loss_fn(student, teacher, _objective(task))
    tx = optax.adamw(LEARNING_RATE)
    self.state = step_lib.create_state(self.params, tx, jax.random.PRNGKey(2))
    self.batch = jax.device_put(make_batch(task, batch_size, seq_len, scale, ragged))
    self.num_params = registry.count_params(self.params)
    step = step_lib.make_train_step(loss_fn, tx)
    start = time.perf_counter()
    self.step = step.lower(self.state, self.teacher_params, self.batch).compile()
    self.run_once()
    self.first_call_s = time.perf_counter() - start
    self.costs = common.compiled_costs(self.step)
    self.times = []

  def run_once(self):
    self.state, metrics = self.step(self.state, self.teacher_params, self.batch)
    jax.block_until_ready((self.state, metrics))

  def time_steps(self, steps: int):
    for _ in range(steps):
      start = time.perf_counter()
      self.run_once()
      self.times.append(time.perf_counter() - start)


class TorchRow:
  """The same step in PyTorch (eager, or with torch.compile around forward + loss)."""

  def __init__(self, task, batch_size, seq_len, scale, ragged, compile):
    import torch

    from benchmarks import torch_reference

    _, _, named = models_for(task, scale, seq_len)
    vocab = {} if task == 'hinton_mnist' else {'vocab_size': _vocab(scale)}
    build = lambda role: torch_reference.build_model(
      named[role][0], num_classes=10 if task == 'hinton_mnist' else 2, **vocab, **named[role][1]
    )
    self.model = build('student')
    teacher = build('teacher') if 'teacher' in named else None
    self.num_params = torch_reference.count_params(self.model)
    raw = make_batch(task, batch_size, seq_len, scale, ragged)
    inputs = (
      (torch.from_numpy(raw['image']),)
      if task == 'hinton_mnist'
      else (
        torch.from_numpy(raw['input_ids']).long(),
        torch.from_numpy(raw['attention_mask']).long(),
      )
    )
    self.batch = {
      'inputs': inputs,
      'labels': torch.from_numpy(raw['labels']).long(),
      'weights': torch.from_numpy(raw['weights']),
    }
    self.step = torch_reference.make_train_step(
      self.model, teacher, loss_config(task), LEARNING_RATE, compile
    )
    start = time.perf_counter()
    self.run_once()
    self.first_call_s = time.perf_counter() - start
    self.peak_bytes = torch_reference.measured_bytes(self.step, self.batch, self.model)
    self.times = []

  def run_once(self):
    self.step(self.batch)

  def time_steps(self, steps: int):
    for _ in range(steps):
      start = time.perf_counter()
      self.run_once()
      self.times.append(time.perf_counter() - start)


def check_param_parity(tasks, scale: str) -> dict:
  """Flax and torch parameter counts of every trained and frozen model; raises on a mismatch."""
  from benchmarks import torch_reference

  counts = {}
  for task in tasks:
    student, teacher, named = models_for(task, scale)
    vocab = {} if task == 'hinton_mnist' else {'vocab_size': _vocab(scale)}
    classes = 10 if task == 'hinton_mnist' else 2
    for role, model in (('student', student), ('teacher', teacher)):
      if model is None:
        continue
      ours = flax_param_count(model, task)
      theirs = torch_reference.count_params(
        torch_reference.build_model(named[role][0], num_classes=classes, **vocab, **named[role][1])
      )
      if ours != theirs:
        raise AssertionError(f'{task} {role}: kdjax has {ours} parameters, torch {theirs}')
      counts[f'{task}/{role}'] = ours
  return counts


def check_loss_parity() -> dict:
  """kdjax's objective and torch_reference's loss on the same logits (CE + T²·KL, weighted,
  one example weighted out): their largest absolute difference per loss config."""
  import torch

  from benchmarks import torch_reference

  rng = np.random.default_rng(0)
  diffs = {}
  for task, classes in (('distill_bert', 2), ('hinton_mnist', 10)):
    s = rng.normal(size=(5, classes)).astype(np.float32) * 3
    t = rng.normal(size=(5, classes)).astype(np.float32) * 3
    labels = rng.integers(0, classes, 5).astype(np.int32)
    weights = np.array([1, 1, 0, 1, 1], np.float32)
    batch = {'labels': jnp.asarray(labels), 'weights': jnp.asarray(weights)}
    ours, _ = _objective(task)(0, (jnp.asarray(s), {}), (jnp.asarray(t), {}), batch)
    cfg = loss_config(task)
    as_t = lambda a: torch.from_numpy(a)
    theirs = torch_reference.distill_loss(
      as_t(s), as_t(t), as_t(labels).long(), as_t(weights), cfg['temperature'], cfg['ce'], cfg['kl']
    )
    ce_ours = step_lib.losses.mean(
      step_lib.losses.cross_entropy(jnp.asarray(s), batch['labels'], batch['weights'])
    )
    ce_theirs = torch_reference.cross_entropy(as_t(s), as_t(labels).long(), as_t(weights))
    diffs[task] = max(abs(float(ours) - float(theirs)), abs(float(ce_ours) - float(ce_theirs)))
    if not diffs[task] <= 1e-5 * max(1.0, abs(float(ours))):
      raise AssertionError(f'{task}: kdjax loss {float(ours)} != torch loss {float(theirs)}')
  return diffs


def _row_figures(times, first_call_s, batch, tokens, flops, peak):
  median = statistics.median(times)
  return {
    **common.summary_ms(times),
    'examples_per_sec': batch / median,
    'tokens_per_sec': tokens / median,
    'compile_s': max(first_call_s - median, 0.0),
    'achieved_flops_per_sec': flops / median,
    'mfu': flops / median / peak,
    'timed_steps': len(times),
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batch-sizes', default='32,128')
  parser.add_argument('--seq-lens', default='32,64,128')
  parser.add_argument('--tasks', default=','.join(TASKS))
  parser.add_argument('--torch', action='store_true', help='time the PyTorch twin too')
  parser.add_argument('--compile', action='store_true', help='and torch.compile (with --torch)')
  parser.add_argument(
    '--torch-threads',
    type=int,
    default=0,
    help='torch intra-op threads (0: os.cpu_count()); 1 pairs with XLA_FLAGS='
    '"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for a one-core run',
  )
  parser.add_argument('--ragged', action='store_true', help='rows of length L/2..L, right-padded')
  parser.add_argument('--scale', default='full', choices=('full', 'tiny'), help='tiny: tests')
  parser.add_argument('--out', default='runs/bench_distill_step.json')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  tasks = args.tasks.split(',')
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise SystemExit(f'distill_step.py: unknown task(s) {unknown}; valid: {TASKS}')
  if args.compile and not args.torch:
    raise SystemExit('distill_step.py: --compile needs --torch')
  env = common.environment()
  if args.torch:
    # torch's OpenMP threads otherwise spin for a while after each op (libgomp's active wait),
    # taking the cores from the kdjax step timed next in this process: 2,279 against 1,867 ms
    # for fine-tuning at L = 128 on the 2-core CPU. Passive waiting left torch's own time
    # unchanged (1,851 → 1,809 ms). Read when OpenMP starts, so set before importing torch.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    env['omp_wait_policy'] = os.environ['OMP_WAIT_POLICY']
    try:
      import torch
    except ImportError:
      raise SystemExit(
        'distill_step.py: --torch needs PyTorch, which is not a kdjax dependency: '
        'pip install torch==2.13.0'
      ) from None
    torch.set_num_threads(args.torch_threads or os.cpu_count())
    from benchmarks import torch_reference

    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  seq_lens = [int(s) for s in args.seq_lens.split(',')]

  result = {'args': vars(args), 'environment': env, 'loss': {t: loss_config(t) for t in tasks}}
  result['jax_matmul_peak_flops'] = jax_peak = common.jax_matmul_peak()
  if args.torch:
    result['torch_matmul_peak_flops'] = torch_peak = torch_reference.matmul_peak()
    result['param_parity'] = check_param_parity(tasks, args.scale)
    result['loss_parity_max_abs_diff'] = check_loss_parity()

  configs = [
    (task, b, s)
    for task in tasks
    for b in batch_sizes
    for s in ([None] if task == 'hinton_mnist' else seq_lens)
  ]
  rows = []
  for task, batch_size, seq_len in configs:
    name = f'{task} b={batch_size}' + (f' L={seq_len}' if seq_len else '')
    tokens = batch_size * (seq_len or 1)
    variants = {'kdjax': JaxRow(task, batch_size, seq_len, args.scale, args.ragged)}
    failures = {}
    if args.torch:
      for label, compiled in (('torch', False), ('torch.compile', True))[: 1 + args.compile]:
        try:
          variants[label] = TorchRow(task, batch_size, seq_len, args.scale, args.ragged, compiled)
        except Exception as e:  # a failed torch.compile is a row saying why, not a crash
          failures[label] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
      for label, row in variants.items():
        if label != 'kdjax' and row.num_params != variants['kdjax'].num_params:
          raise AssertionError(
            f'{name}: {label} trains {row.num_params} params, kdjax {variants["kdjax"].num_params}'
          )
    for _ in range(args.rounds):  # alternate, so drifting load hits every variant alike
      for row in variants.values():
        row.time_steps(args.steps)
    jrow = variants['kdjax']
    flops = jrow.analytic_flops
    entry = {'config': name, 'task': task, 'batch_size': batch_size, 'seq_len': seq_len}
    entry['tokens_per_step'] = tokens
    entry['trained_params'] = jrow.num_params
    entry['analytic_flops'] = flops
    entry['xla_flops'] = jrow.costs['xla_flops']
    entry['kdjax'] = _row_figures(
      jrow.times, jrow.first_call_s, batch_size, tokens, flops, jax_peak
    )
    entry['kdjax'].update(
      peak_mb=jrow.costs['peak_bytes'] / 2**20,
      mfu_xla_flops=jrow.costs['xla_flops'] / statistics.median(jrow.times) / jax_peak,
      memory_analysis=jrow.costs,
    )
    for label, row in variants.items():
      if label == 'kdjax':
        continue
      entry[label] = _row_figures(
        row.times, row.first_call_s, batch_size, tokens, flops, torch_peak
      )
      entry[label]['peak_mb'] = row.peak_bytes / 2**20
      entry[label]['kdjax_over_torch'] = (
        entry['kdjax']['examples_per_sec'] / entry[label]['examples_per_sec']
      )
    for label, why in failures.items():
      entry[label] = {'failed': why}
    rows.append(entry)
    print(f'done {name}', flush=True)
    del variants

  # Other work on the machine skews the sides unequally (see the module docstring).
  return common.finish(result, rows, _print_table, args.out)


def _print_table(result):
  env = result['environment']
  versions = f'jax {env["jax"]}' + (f', torch {env["torch"]}' if 'torch' in env else '')
  peaks = f'matmul peak: jax {result["jax_matmul_peak_flops"] / 1e9:.0f} GFLOP/s'
  if 'torch_matmul_peak_flops' in result:
    peaks += f', torch {result["torch_matmul_peak_flops"] / 1e9:.0f} GFLOP/s'
  print(
    f'{env["device_kind"]} ({env["platform"]}), {env["cpu_count"]} CPUs; {versions}; {peaks}; '
    'tokens = batch × seq_len'
  )
  print(
    '| config | side | ms/step (median, p90) | examples/s | tokens/s | compile s | '
    'GFLOP/step (analytic, XLA) | MFU | peak MB | kdjax/torch |'
  )
  print('|---|---|---|---:|---:|---:|---|---:|---:|---:|')
  for entry in result['rows']:
    for side in ('kdjax', 'torch', 'torch.compile'):
      if side not in entry:
        continue
      r = entry[side]
      if 'failed' in r:
        print(f'| {entry["config"]} | {side} | failed: {r["failed"]} |  |  |  |  |  |  |  |')
        continue
      flops = f'{entry["analytic_flops"] / 1e9:.2f}, {entry["xla_flops"] / 1e9:.2f}'
      ratio = f'{r["kdjax_over_torch"]:.2f}' if 'kdjax_over_torch' in r else ''
      print(
        f'| {entry["config"]} | {side} | {r["median_ms"]:.1f}, {r["p90_ms"]:.1f} | '
        f'{r["examples_per_sec"]:.0f} | {r["tokens_per_sec"]:.0f} | {r["compile_s"]:.1f} | '
        f'{flops} | {100 * r["mfu"]:.1f} % | {r["peak_mb"]:.0f} | {ratio} |'
      )


if __name__ == '__main__':
  main()
