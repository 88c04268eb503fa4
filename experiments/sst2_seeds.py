"""Student alone vs distilled student over 3 seeds, with a fixed, already trained teacher.

First run experiments/sst2_from_scratch.py (its teacher is reused), then:
  python -m kdjax.sweep --config=experiments/sst2_seeds.py:teacher=runs/from_scratch \\
      --workdir=runs/sst2_seeds
Each seed changes the student's initialisation, dropout and data order. The table of
mean ± std lands in runs/sst2_seeds/results.md (recorded in experiments/README.md).
"""

from experiments import sst2_from_scratch


def get_config(arg: str = ''):
  args = dict(a.split('=', 1) for a in arg.split(',') if a)
  if set(args) - {'teacher', 'student'}:
    raise ValueError(
      f'experiments/sst2_seeds.py: unknown argument(s) {sorted(set(args) - {"teacher", "student"})}'
      '; valid: teacher=<workdir of a run with a teacher stage>, student=bilstm|cnn'
    )
  config = sst2_from_scratch.get_config(f'student={args.get("student", "bilstm")}')
  config.name = 'sst2_seeds'
  config.stages = ('student_alone', 'distill')
  config.teacher.path = args.get('teacher', 'runs/from_scratch')
  return config


def get_sweep():
  return [{'seed': seed} for seed in (0, 1, 2)]
