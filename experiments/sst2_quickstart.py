"""SST-2 quickstart: the fine-tuned MiniLM teacher → BiLSTM student, trained alone and
distilled (teacher-output cache, one augmented copy per sentence), on 2 CPU cores.

The teacher is a one-time step whose export every later run reuses by path:
  python -m kdjax.main --config=experiments/sst2_minilm_teacher.py --workdir=runs/minilm_teacher
  python -m kdjax.main --config=experiments/sst2_quickstart.py --workdir=runs/quickstart

Arguments after the file name, comma separated:
  teacher=<workdir>    the teacher run (default runs/minilm_teacher)
  student=bilstm|cnn   which student family (default bilstm)
  runlocal             a few steps on 500 sentences, for a smoke test

The same config as seed 0 of experiments/sst2_minilm_students.py; expected results and wall
times are in README.md and experiments/README.md.
"""

from experiments import parse_args, sst2_minilm_students


def get_config(arg: str = ''):
  args = parse_args(
    arg,
    {'teacher': '<workdir>', 'student': 'bilstm|cnn', 'runlocal': ''},
    'experiments/sst2_quickstart.py',
  )
  student = args.get('student', 'bilstm')
  if student not in ('bilstm', 'cnn'):
    raise ValueError(f'experiments/sst2_quickstart.py: student={student!r}; valid: bilstm, cnn')
  parts = [f'student={student}', f'teacher={args.get("teacher", "runs/minilm_teacher")}']
  config = sst2_minilm_students.get_config(
    ','.join(parts + (['runlocal'] if 'runlocal' in args else []))
  )
  config.name = 'sst2_quickstart'
  return config
