"""SST-2 with a teacher trained from scratch: BERT 2×128 → BiLSTM student, all four stages
(teacher, student alone, online, distill), on 2 CPU cores. The first quickstart, kept as the
no-pretraining baseline and as the fast end-to-end check of every stage.

Command (from the repository root):
  python -m kdjax.main --config=experiments/sst2_from_scratch.py --workdir=runs/from_scratch

Arguments after the file name, comma separated:
  student=bilstm|cnn   which student family (default bilstm)
  runlocal             a few steps of everything, for a smoke test (about a minute)

Expected result and wall time: experiments/README.md (measured on a 2-core CPU).
"""

from configs import default, models
from experiments import parse_args


def get_config(arg: str = ''):
  args = parse_args(
    arg, {'student': 'bilstm|cnn', 'runlocal': ''}, 'experiments/sst2_from_scratch.py'
  )
  config = default.get_config()
  config.name = 'sst2_from_scratch'
  student = args.get('student', 'bilstm')
  if student not in ('bilstm', 'cnn'):
    raise ValueError(f'experiments/sst2_from_scratch.py: student={student!r}; valid: bilstm, cnn')
  config.student = models.bilstm_small() if student == 'bilstm' else models.cnn_small()
  if args.get('runlocal'):
    config.teacher = models.bert_tiny()
    config.train.teacher_steps = 20
    config.train.student_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
  return config
