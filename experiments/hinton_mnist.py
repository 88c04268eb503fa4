"""Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural network", section 3:
MNIST with a 2 × 1200 teacher (dropout, inputs jittered by up to 2 pixels), a 2 × 800
student trained alone without regularisation, and the same student regularised only by
matching the teacher's soft targets at T = 20; then the transfer set without any 3s, with
the 3-class bias raised afterwards. Paper: 67 / 146 / 74 test errors, and 206 / 109.

  python -m kdjax.image_train --config=experiments/hinton_mnist.py --workdir=runs/hinton_mnist

Arguments (comma separated): runlocal (a few hundred images and steps, to check the wiring).
The data are the original MNIST IDX files shipped in kdjax/data/raw/mnist.
"""

import ml_collections

from configs import default
from experiments import parse_args


def _model(hidden_sizes, input_dropout, hidden_dropout):
  return ml_collections.ConfigDict(
    {
      'hidden_sizes': hidden_sizes,
      'input_dropout': input_dropout,
      'hidden_dropout': hidden_dropout,
    }
  )


def _train(epochs, learning_rate, jitter, max_norm):
  t = ml_collections.ConfigDict()
  t.epochs = epochs  # passes over the (transfer) training set; steps = epochs·N / batch
  t.batch_size = 128
  t.jitter = jitter  # random translation of each training image by up to this many pixels
  t.max_norm = max_norm  # cap on each unit's incoming-weight L2 norm (0 = off)
  t.optim = default.optimizer(learning_rate)
  t.optim.name = 'adam'
  t.optim.schedule = 'cosine'
  t.optim.warmup_steps = 200
  t.optim.grad_clip_norm = 0.0
  return t


def get_config(arg: str = ''):
  args = parse_args(arg, {'runlocal': ''}, 'experiments/hinton_mnist.py')
  c = ml_collections.ConfigDict()
  c.name = 'hinton_mnist'
  c.seed = 0
  c.stages = ('teacher', 'student_alone', 'distill', 'distill_omit')
  c.data = ml_collections.ConfigDict({'dir': ''})  # '' = the IDX files shipped in kdjax
  # Dropout 0.2 on pixels and 0.5 on hidden units with a max-norm constraint: the dropout
  # net of Srivastava et al. (2014) that the paper's teacher refers to.
  c.teacher = _model((1200, 1200), 0.2, 0.5)
  c.student = _model((800, 800), 0.0, 0.0)
  # Test errors of the dropout net keep falling for hundreds of epochs (Srivastava et al. ran
  # thousands): 100 epochs gave 85 errors, 300 give 64 (experiments/README.md).
  c.teacher_train = _train(epochs=300.0, learning_rate=1e-3, jitter=2, max_norm=4.0)
  c.student_train = _train(epochs=60.0, learning_rate=1e-3, jitter=0, max_norm=0.0)
  # The soft-target term is T²·KL at T = 20; the hard labels get a much smaller weight, as
  # the paper recommends. The full loss schema is the text trainer's (kdjax/kd).
  c.loss = default.get_config().loss
  c.loss.temperature = 20.0
  c.loss.weights.kl = 1.0
  c.loss.weights.ce = 0.1
  # The paper's transfer set is the training images as they are (jitter 0, scored once by
  # the teacher). With jitter > 0 the teacher scores each shifted batch live; 2 px and 120
  # student epochs give 68 / 77 errors on seeds 0 / 1, against 74 / 84 for the student alone
  # with the same jitter (experiments/README.md).
  c.transfer = ml_collections.ConfigDict()
  c.transfer.jitter = 0  # pixels of random translation of the transfer images
  c.omit = ml_collections.ConfigDict()
  c.omit.classes = (3,)  # digits left out of distill_omit's transfer set
  c.omit.bias_max = 8.0  # bias-correction search: 0, bias_step, ..., bias_max
  c.omit.bias_step = 0.1
  c.train = ml_collections.ConfigDict()
  c.train.log_every = 100
  c.train.eval_every = 23450  # every 50 teacher epochs (test errors, for the log only)
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.eval_batch_size = 1000
  if args.get('runlocal'):
    c.teacher_train.epochs = c.student_train.epochs = 0.05
    c.train.log_every = 5
    c.train.eval_every = 0
    c.train.checkpoint_every = 10
  return c
