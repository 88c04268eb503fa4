"""A 2-layer student of all-MiniLM-L6-v2's sentence embeddings, scored on STS-B dev.

  python -m kdjax.embed_distill --config=experiments/stsb_embed_distill.py \\
      --workdir=runs/stsb_embed_distill

Arguments after the file name, comma separated:
  layers=I-J-...   teacher layers the student's layers start from (default 0-5)
  runlocal         a few steps on a few hundred sentences, for a smoke test (under a minute)

The student keeps the teacher's WordPiece embeddings (frozen) and starts from teacher layers
0 and 5 with the FFN pruned from 1536 to the 768 neurons of largest weight norms: 2,367,744
non-embedding parameters, 0.222 of the teacher's 10,646,784. It learns the teacher's
mean-pooled embeddings of 106,001 unlabeled sentences (SST-2 train, STS-B train, Multi30k
English; STS-B dev sentences removed), which the teacher embeds once into the workdir.

Measured on 2 CPU cores shared with other jobs (nice 15, load ~5): STS-B dev Spearman teacher
0.8672, student 0.8553 (0.848 after 250 steps); teacher embedding pass 1,750 s (61 sentences/s),
training 1,000 steps x 128 in 1,273 s (105 sentences/s), evaluations ~40 s each.
"""

from configs import embed_distill
from experiments import parse_args


def get_config(arg: str = ''):
  args = parse_args(arg, {'layers': 'I-J-...', 'runlocal': ''}, 'experiments/stsb_embed_distill.py')
  config = embed_distill.get_config()
  config.name = 'stsb_embed_distill'
  layers = tuple(int(i) for i in str(args.get('layers', '0-5')).split('-'))
  config.student.num_layers = len(layers)
  config.student.init_layers = layers
  config.student.intermediate_size = 768
  # Short training from a good start: noise from dropout only slows the fit to the teacher.
  config.student.dropout_rate = 0.0
  config.student.attention_dropout_rate = 0.0
  config.loss.mse_weight = 1.0
  config.loss.cosine_weight = 1.0
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 100
  config.train.batch_size = 128
  config.train.steps = 1000  # 128k sentences, ~1.2 passes over the corpus
  config.train.eval_every = 250
  config.train.checkpoint_every = 250
  if args.get('runlocal'):
    config.data.sources = ('stsb',)  # no SST-2 preparation: the smoke run stays fast
    # One padded shape and one batch per pass, so the smoke run is mostly compilation.
    config.data.corpus_limit = 192
    config.data.eval_limit = 96
    config.data.max_len = 32
    config.data.buckets = (32,)
    config.train.eval_batch_size = 192
    config.train.batch_size = 32
    config.train.steps = 8
    config.train.log_every = 4
    config.train.eval_every = 4
    config.train.checkpoint_every = 8
    config.optim.warmup_steps = 2
  return config
