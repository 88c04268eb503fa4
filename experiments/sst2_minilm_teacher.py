"""Fine-tune the pretrained MiniLM-L6-H384 (all-MiniLM-L6-v2) as the SST-2 teacher.

A one-time step: later runs point `teacher.path` at this workdir and reuse the export.
  python -m kdjax.main --config=experiments/sst2_minilm_teacher.py --workdir=runs/minilm_teacher

One epoch of SST-2 (2,100 steps of 32) at learning rate 1e-4. A second epoch continues from
the first run's export at 3e-5, in its own workdir, with another data order:
  python -m kdjax.main --config=experiments/sst2_minilm_teacher.py:continue_from=runs/minilm_teacher \
      --workdir=runs/minilm_teacher2
The standard recipe (Devlin et al. 2019: three epochs at 5e-5, warm-up over the first 10 %)
with mean pooling, the teacher that reaches 90.14 (6,300 steps: 74 min on a shared CPU):
  python -m kdjax.main --config=experiments/sst2_minilm_teacher.py:recipe=standard \
      --workdir=runs/minilm_teacher_standard
See experiments/README.md for accuracy and wall time of each.
Arguments: `recipe=quick|standard` (default quick: the one epoch above),
`continue_from=<workdir>`, `runlocal` (a few steps on 2,000 examples, a smoke test).
"""

from configs import default, models
from experiments import choice, parse_args

EPOCH_STEPS = 2100  # one epoch of the 67,349 training sentences at batch 32
RECIPES = ('quick', 'standard')


def configure_wordpiece(config) -> None:
  """Every run that touches the MiniLM teacher tokenizes with its WordPiece vocabulary."""
  config.data.tokenizer = 'wordpiece'
  config.data.tokenizer_path = 'minilm'


def minilm_teacher(init_from: str = 'minilm'):
  teacher = models.minilm_l6()
  teacher.init_from = init_from
  teacher.kwargs.pooling = 'cls'  # or 'mean': see kdjax/models/bert.py BertClassifier
  return teacher


def get_config(arg: str = ''):
  args = parse_args(
    arg,
    {'recipe': '|'.join(RECIPES), 'continue_from': '<workdir>', 'runlocal': ''},
    'experiments/sst2_minilm_teacher.py',
  )
  recipe = choice(args, 'recipe', RECIPES, 'experiments/sst2_minilm_teacher.py')
  config = default.get_config()
  config.name = 'sst2_minilm_teacher'
  config.stages = ('teacher',)
  configure_wordpiece(config)
  config.teacher = minilm_teacher()
  config.teacher_optim.learning_rate = 1e-4
  config.teacher_optim.warmup_steps = 200
  config.train.batch_size = 32
  config.train.teacher_steps = EPOCH_STEPS
  config.train.eval_every = 500
  config.train.eval_batch_size = 128
  if recipe == 'standard':
    # all-MiniLM-L6-v2 was trained to embed a sentence as the mean of its token states, so
    # the classifier reads that mean, not the [CLS] vector (0.57 points better after epoch 1).
    config.teacher.kwargs.pooling = 'mean'
    config.teacher_optim.learning_rate = 5e-5
    config.train.teacher_steps = 3 * EPOCH_STEPS
    config.teacher_optim.warmup_steps = config.train.teacher_steps // 10
    config.train.eval_every = 700
    config.train.keep_checkpoints = 3
  if args.get('continue_from'):
    config.teacher.init_from = args['continue_from']
    config.teacher_optim.learning_rate = 3e-5
    config.teacher_optim.warmup_steps = 100
    config.seed = 1  # another data order than the first epoch
  if args.get('runlocal'):
    config.data.train_limit = 2000
    config.train.teacher_steps = 10
    config.train.log_every = 5
    config.train.eval_every = 10
    config.train.checkpoint_every = 5
    config.teacher_optim.warmup_steps = 2
  return config
