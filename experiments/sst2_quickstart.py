"""SST-2 quickstart: BERT-style teacher → BiLSTM student, all four stages, on 2 CPU cores.

Command (from the repository root):
  python -m kdjax.main --config=experiments/sst2_quickstart.py --workdir=runs/quickstart

Arguments after the file name, comma separated:
  student=bilstm|cnn   which student family (default bilstm)
  runlocal             a few steps of everything, for a smoke test (about a minute)

Expected result and wall time: see the results table in README.md (measured on a 2-core CPU).
"""

from configs import default, models


def get_config(arg: str = ''):
  args = dict(a.split('=', 1) if '=' in a else (a, True) for a in arg.split(',') if a)
  unknown = set(args) - {'student', 'runlocal'}
  if unknown:
    raise ValueError(
      f'experiments/sst2_quickstart.py: unknown argument(s) {sorted(unknown)}; '
      'valid: student=bilstm|cnn, runlocal'
    )
  config = default.get_config()
  config.name = 'sst2_quickstart'
  student = args.get('student', 'bilstm')
  if student not in ('bilstm', 'cnn'):
    raise ValueError(f'experiments/sst2_quickstart.py: student={student!r}; valid: bilstm, cnn')
  config.student = models.bilstm_small() if student == 'bilstm' else models.cnn_small()
  config.student.path = ''
  if args.get('runlocal'):
    config.teacher = models.bert_tiny()
    config.teacher.path = ''
    config.train.teacher_steps = 20
    config.train.student_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
  return config
