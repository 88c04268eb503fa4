"""Multi30k en→de translation: a Transformer teacher (3+3 layers, d 256, 7.6 M parameters)
and a narrow student with one decoder layer (d 128), trained alone, with word-level KD, with
sequence-level KD and with both, on 2 CPU cores.

Commands (from the repository root):
  # the teacher, once (its workdir is then referenced by path):
  python -m kdjax.translate --config=experiments/multi30k.py:teacher_only \
      --workdir=runs/multi30k_teacher
  # the students, distilled from it:
  python -m kdjax.translate \
      --config=experiments/multi30k.py:teacher=runs/multi30k_teacher,on_policy \
      --workdir=runs/multi30k_students
  # or everything in one run: --config=experiments/multi30k.py

Arguments after the file name, comma separated:
  teacher_only   train only the teacher
  teacher=DIR    reuse the teacher of a finished run (or an export folder); no teacher stage
  on_policy      add the on-policy stage (student samples scored by the teacher, GKD)
  runlocal       a few steps of everything on 2,000 pairs with tiny models (about a minute)

Expected result and wall time: experiments/README.md (measured on a 2-core CPU).
"""

from configs import translate
from experiments import parse_args


def get_config(arg: str = ''):
  args = parse_args(
    arg,
    {'teacher_only': '', 'teacher': 'DIR', 'on_policy': '', 'runlocal': ''},
    'experiments/multi30k.py',
  )
  config = translate.get_config()
  config.name = 'multi30k'
  config.student = translate.model(d_model=128, enc_layers=3, dec_layers=1, d_ff=512)
  config.train.teacher_steps = 2000
  config.train.student_steps = 1500
  config.train.eval_every = 500
  if args.get('teacher_only'):
    config.stages = ('teacher',)
  if args.get('teacher'):
    config.teacher_path = args['teacher']
    config.stages = tuple(s for s in config.stages if s != 'teacher')
  if args.get('on_policy'):
    config.stages = tuple(config.stages) + ('on_policy',)
  if args.get('runlocal'):
    config.data.train_limit = 2000
    config.data.eval_limit = 64
    config.data.vocab_size = 1000
    # One padded length for every batch: each stage then compiles its step once, not once
    # per (source, target) bucket pair, which was most of this smoke run's time.
    config.data.buckets = (48,)
    config.data.max_len = 47
    config.teacher = translate.model(d_model=32, enc_layers=1, dec_layers=1, d_ff=64, num_heads=2)
    config.student = translate.model(d_model=32, enc_layers=1, dec_layers=1, d_ff=32, num_heads=2)
    config.train.batch_size = 32
    config.train.teacher_steps = 20
    config.train.student_steps = 10
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.eval_sentences = 16
    config.train.checkpoint_every = 5
    config.kd.seq_beam_size = 2
    config.decode.beam_size = 2
    config.decode.max_len = 24
    config.decode.batch_size = 32
  return config
