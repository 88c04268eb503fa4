"""Distill → compress → recover → quantize from one config (kdjax/chain.py): the MiniLM
teacher's transformer student (sst2_minilm_students.py:student=bert, 4.5 M parameters, on
SST-2 alone) compressed one way per run, the teacher guiding every recovery stage.

  python -m kdjax.main --config=experiments/sst2_compression_chain.py:method=heads \\
      --workdir=runs/chain_heads

Arguments (comma separated): method (below; default heads), teacher=<teacher workdir>
(default runs/minilm_teacher), runlocal.

  heads    half the attention heads of every layer removed (6 of 12), recovered, int8
  lowrank  every layer's Dense kernels factorised by SVD to rank 128, recovered, int8
  nm       2:4 sparsity on every layer's kernels, made during recovery, int8 + bit mask
  sparse   unstructured magnitude pruning of every layer's kernels, gradually to 70 %
           during recovery, int8 with the zeros stored as a bit mask
  qat4     recovery trains on int4 weights (straight-through), stored as int4
  int8     no compression but post-training int8 (distill → quantize)

Each run writes report.md with one row per stage: parameters, zeros, bytes on disk,
bits/parameter, dev accuracy and CPU latency at batch 1 and 32.
"""

from experiments import choice, parse_args, sst2_minilm_students

METHODS = ('heads', 'lowrank', 'nm', 'sparse', 'qat4', 'int8')
# The transformer layers' Dense kernels (attention, FFN); embeddings, pooler and classifier
# stay as they are, so every method compresses the same weights.
LAYER_KERNELS = (r'layer_\d+/.*kernel$',)


def get_config(arg: str = ''):
  args = parse_args(
    arg,
    {'method': '|'.join(METHODS), 'teacher': '<workdir>', 'runlocal': ''},
    'experiments/sst2_compression_chain.py',
  )
  method = choice(args, 'method', METHODS, 'experiments/sst2_compression_chain.py')
  student_args = [
    'student=bert',
    'augment=0',
    f'teacher={args.get("teacher", "runs/minilm_teacher")}',
  ]
  if args.get('runlocal'):
    student_args.append('runlocal')
  config = sst2_minilm_students.get_config(','.join(student_args))
  config.name = f'sst2_chain_{method}'
  config.stages = ('distill', 'compress', 'recover', 'quantize')
  # Recovery fine-tunes an already trained student: a small step (3e-5 kept more than the
  # students' 1e-4 in the head-pruning measurements of experiments/README.md).
  config.recover_optim.learning_rate = 3e-5
  config.train.recover_steps = 500
  if method in ('heads', 'lowrank'):
    config.compress.method = method
    config.compress.keep = 0.5
    config.compress.rank = 128
    config.compress.rules = LAYER_KERNELS
  else:
    config.stages = ('distill', 'recover', 'quantize')
  if method in ('nm', 'sparse'):
    config.prune.method = 'magnitude' if method == 'sparse' else 'nm'
    config.prune.sparsity = 0.7
    config.prune.rules = LAYER_KERNELS
    config.prune.stages = ('recover',)
    config.recover_optim.learning_rate = 1e-4  # pruning moves further than recovery alone
  if method == 'qat4':
    config.quant.qat_bits = 4
    config.quant.ptq_bits = 4
    config.quant.stages = ('recover',)
  if method == 'int8':
    config.stages = ('distill', 'quantize')
  if args.get('runlocal'):
    config.train.recover_steps = 10
    config.compress.timing_repeats = 2
  return config
