"""The method ablation on SST-2: the main distillation methods on one teacher and one student,
3 seeds each, every other setting equal.

  python -m kdjax.sweep --config=experiments/sst2_method_ablation.py \\
      --workdir=runs/method_ablation

Teacher: the 1-epoch fine-tuned MiniLM (runs/minilm_teacher, 88.99 dev); the
multi-teacher method adds a second, different teacher, the transformer distilled with
augmented data (runs/bert_student_aug6k_seed1, 87.04), and distills their averaged
probabilities. Student: the 4.5 M-parameter transformer of
sst2_minilm_students.py (2 of the teacher's layers, FFN pruned to 768, rank-64
embeddings), so hidden states, attention maps and Q/K/V relations exist on both sides at
the same width. Every method trains on SST-2 alone (no augmentation) with the teacher run
live (feature terms need it), for the same number of steps, and keeps 0.5·CE on the gold
labels; each feature method is added to 0.5·KL, as in the papers' task-distillation
recipes. Mutual learning trains two such students together, without the teacher.

Arguments (comma separated): teacher=<workdir>, runlocal. The second teacher is
SECOND_TEACHER below.
"""

from experiments import parse_args, sst2_minilm_students

# The multi-teacher method's second teacher: the 6,000-step augmented transformer student of
# sst2_minilm_students.py, seed 1 (87.04), an export folder.
SECOND_TEACHER = 'runs/bert_student_aug6k_seed1/distill/export/student'
# Each method: the config overrides that define it on top of get_config().
METHODS = {
  'kl': {},
  'kl+hidden': {'loss.weights.hidden_mse': 1.0},
  'kl+attention': {'loss.weights.attention_kl': 1.0},
  'minilm': {'loss.weights.minilm': 1.0},
  'dkd': {'loss.weights.kl': 0.0, 'loss.weights.dkd': 1.0},
  'crd': {'loss.weights.crd': 0.1},
  'multi_teacher': {'distill.extra_teachers': (SECOND_TEACHER,)},
  'mutual': {'stages': ('mutual',)},
}
SEEDS = (0, 1, 2)


def get_config(arg: str = ''):
  args = parse_args(
    arg,
    {'teacher': '<workdir>', 'runlocal': ''},
    'experiments/sst2_method_ablation.py',
  )
  teacher = args.get('teacher', 'runs/minilm_teacher')
  config = sst2_minilm_students.get_config(
    f'student=bert,teacher={teacher}' + (',runlocal' if args.get('runlocal') else '')
  )
  config.name = 'sst2_method_ablation'
  config.stages = ('distill',)
  config.distill.augment_copies = 0
  config.distill.teacher_cache = 'off'  # feature terms read the teacher's hidden states
  config.loss.weights.logit_mse = 0.0
  config.loss.weights.ce = 0.5
  config.loss.weights.kl = 0.5
  config.loss.temperature = 2.0
  config.mutual.num_students = 2
  config.train.batch_size = 32
  config.train.student_steps = 500 if not args.get('runlocal') else 10
  config.train.eval_every = 0  # dev accuracy at the end only
  config.train.checkpoint_every = 100 if not args.get('runlocal') else 5
  config.student_optim.warmup_steps = 50 if not args.get('runlocal') else 2
  return config


def get_sweep():
  """Seed-major order: every method's seed 0 first, so a partly finished sweep already
  compares all methods (the sweep resumes where it stopped). config.name labels the method
  in the sweep's table and in each point's results.json."""
  return [
    {'name': method, **overrides, 'seed': seed}
    for seed in SEEDS
    for method, overrides in METHODS.items()
  ]
