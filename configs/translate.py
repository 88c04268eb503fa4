"""The complete schema of a translation distillation run (`python -m kdjax.translate`).

Experiments start from `get_config()` and change values; they never add keys. The CLI locks
the config, so an override naming a key not listed here is an error.
"""

import ml_collections

from configs import default

# The stages a run may list, in the order they run (kdjax/translate.py):
#   teacher        label-smoothed cross-entropy on the references
#   student_alone  the student trained the same way (the baseline)
#   word_kd        word-level KD: (1-a)·CE(reference) + a·T²·KL(teacher ‖ student) per position
#   seq_kd         sequence-level KD: CE on the teacher's beam outputs for the training sources
#   seq_word_kd    both: word-level KD on the teacher's beam outputs
#   on_policy      (1-l)·word-level KD on references + l·generalised JSD on the student's own
#                  samples, scored by the teacher (Agarwal et al. 2024, GKD)
STAGES = ('teacher', 'student_alone', 'word_kd', 'seq_kd', 'seq_word_kd', 'on_policy')


def model(d_model: int, enc_layers: int, dec_layers: int, d_ff: int, num_heads: int = 4):
  """Keywords of kdjax.models.seq2seq.Seq2SeqTransformer (vocab sizes come from the data)."""
  m = ml_collections.ConfigDict()
  m.d_model = d_model
  m.num_heads = num_heads
  m.enc_layers = enc_layers
  m.dec_layers = dec_layers
  m.d_ff = d_ff
  m.dropout_rate = 0.1
  m.attention_dropout_rate = 0.0
  m.max_len = 128  # positions are sinusoidal: this only bounds lengths
  m.share_embeddings = True  # one table for both languages (joint subword vocabulary)
  m.tie_output = True  # output projection = the target embedding table
  return m


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'multi30k'  # copied into results.json
  c.seed = 0  # parameter init, dropout, data order
  c.stages = ('teacher', 'student_alone', 'word_kd', 'seq_kd', 'seq_word_kd')

  c.data = ml_collections.ConfigDict()
  c.data.raw_dir = ''  # Multi30k <split>.<lang>.gz files; '' = the copy shipped in kdjax
  c.data.tfds_data_dir = ''  # where tfds writes/reads array_record files; '' = ~/.cache/kdjax/tfds
  c.data.source_lang = 'en'
  c.data.target_lang = 'de'
  c.data.tokenizer = 'bpe'  # joint subword vocabulary trained on the training split: bpe | unigram
  c.data.vocab_size = 8000
  c.data.max_len = 62  # subword tokens per sentence; longer ones are truncated (BOS/EOS extra)
  # Padded lengths of a batch's source and target sides (the largest must hold max_len + 1).
  c.data.buckets = (8, 16, 24, 32, 48, 64)
  c.data.train_limit = 0  # use only the first N training pairs (0 = all 29,000)
  c.data.eval_limit = 0  # evaluate on the first N validation / test pairs (0 = all)

  c.teacher = model(d_model=256, enc_layers=3, dec_layers=3, d_ff=1024)
  # A finished translate workdir (or its teacher/export/teacher folder) whose teacher is reused
  # instead of training one; its subword tokenizer then becomes this run's.
  c.teacher_path = ''
  c.student = model(d_model=256, enc_layers=3, dec_layers=1, d_ff=1024)

  c.teacher_optim = default.optimizer(learning_rate=1e-3)
  c.teacher_optim.warmup_steps = 400
  c.student_optim = default.optimizer(learning_rate=1e-3)
  c.student_optim.warmup_steps = 400

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # sentence pairs per step
  c.train.teacher_steps = 4000
  c.train.student_steps = 4000
  c.train.label_smoothing = 0.1  # on reference and beam targets alike
  c.train.log_every = 50  # steps between progress lines / metrics.jsonl records
  c.train.eval_every = 1000  # steps between greedy validation BLEU checks (0 = only at the end)
  c.train.eval_sentences = 500  # validation pairs decoded by those checks
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  c.train.nonfinite = 'stop'  # stop | skip: what a NaN/Inf loss or gradient does
  c.train.max_skipped_steps = 0

  c.kd = ml_collections.ConfigDict()
  c.kd.temperature = 1.0  # of the word-level KL and the on-policy JSD
  c.kd.word_weight = 0.5  # a: weight of the word-level KD term (1 = no reference CE)
  c.kd.seq_beam_size = 5  # the teacher's beam for sequence-level KD targets
  c.kd.seq_length_penalty = 0.6
  c.kd.on_policy_weight = 0.5  # l: weight of the on-policy term in the on_policy stage
  c.kd.jsd_beta = 0.5  # generalised JSD mixing weight (0 -> forward KL, 1 -> reverse KL)
  c.kd.sample_temperature = 1.0  # of the student's samples

  c.decode = ml_collections.ConfigDict()
  c.decode.beam_size = 5
  c.decode.length_penalty = 0.6  # GNMT ((5 + len) / 6) ** alpha
  c.decode.max_len = 64  # generated tokens, EOS included
  c.decode.batch_size = 128  # sentences decoded together (evaluation, speed, teacher beams)
  return c
