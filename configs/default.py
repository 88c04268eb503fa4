"""The complete kdjax run schema: every key a run may set, with its default.

Experiments start from `get_config()` and change values; they never add keys. The config
is locked by the CLI, so an override that names a key not listed here is an error.
"""

import ml_collections

from configs import models


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'default'  # experiment name, copied into results.json and report.md
  c.seed = 0  # seeds parameter init, dropout and data order
  # Stages run in this order; each resumes on its own. Valid: teacher, student_alone,
  # online (teacher and student trained jointly), distill (student from the frozen teacher).
  c.stages = ('teacher', 'student_alone', 'online', 'distill')

  c.data = ml_collections.ConfigDict()
  c.data.name = (
    'sst2_local'  # 'sst2_local' (shipped files) or a prepared tfds name, e.g. 'glue/sst2'
  )
  c.data.raw_dir = ''  # folder of GLUE train/dev/test.tsv[.gz]; '' = the copy shipped in kdjax
  c.data.tfds_data_dir = ''  # where tfds writes/reads array_record files; '' = ~/.cache/kdjax/tfds
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.max_len = 64  # tokens per sentence, [CLS] included; longer ones are truncated
  c.data.buckets = (16, 32, 64)  # padded lengths; a batch is padded to the smallest that fits
  c.data.bucket_window = 50  # sort by length inside windows of this many batches
  # 'word': a word vocabulary built from the training split; 'wordpiece': a BERT
  # tokenizer.json (required with a pretrained BERT, so teacher and student share ids).
  c.data.tokenizer = 'word'
  c.data.tokenizer_path = ''  # wordpiece only: folder or tokenizer.json; '' = packaged MiniLM
  c.data.vocab_size = 20000  # word vocabulary built from the training split
  c.data.vocab_min_count = 1  # words seen fewer times map to [UNK]
  c.data.train_limit = 0  # use only the first N training examples (0 = all)

  # Each role: model (registry name), kwargs (constructor keywords), path (teacher only:
  # workdir or export of an earlier run whose trained teacher is reused), init_from
  # (weights loaded before training: 'minilm' = the packaged all-MiniLM-L6-v2 or a Hugging
  # Face BERT folder with config.json + model.safetensors, for bert; a kdjax export or a
  # run's workdir (its teacher export) to continue training that model; 'teacher' = the
  # trained teacher, for students: layers + pruned FFN + SVD embeddings for a bert student,
  # a PCA of its word embeddings for bilstm/cnn), init_layers (init_from='teacher', bert:
  # the teacher layer each student layer copies; () = evenly spaced).
  c.teacher = models.bert_small()
  c.student = models.bilstm_small()

  c.teacher_optim = optimizer(learning_rate=5e-4)
  c.student_optim = optimizer(learning_rate=2e-3)

  # Distillation loss: hard_weight·CE(labels) + kd_weight·T²·KL(teacher_T ‖ student_T)
  # + logit_mse_weight·MSE(logits). Weights are not renormalised.
  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 2.0
  c.loss.hard_weight = 0.5
  c.loss.kd_weight = 0.5
  c.loss.logit_mse_weight = 0.0
  # Online stage only: weight of the teacher's own T²·KL(student_T ‖ teacher_T) term
  # (0 = the teacher learns from labels alone; >0 = deep-mutual-learning style).
  c.loss.online_teacher_kd_weight = 0.0

  # The distill stage's transfer set and where its teacher outputs come from.
  c.distill = ml_collections.ConfigDict()
  # 'logits': teacher logits for the whole transfer set computed once, stored under cache_dir
  # keyed by a hash of teacher + token ids + tokenizer, and read back by every later run;
  # 'topk': only the cache_topk largest logits (+ log-sum-exp of the rest) are stored;
  # 'off': the teacher runs live in every step.
  c.distill.teacher_cache = 'logits'
  c.distill.cache_topk = 1
  c.distill.cache_dir = ''  # '' = $KDJAX_CACHE/teacher_outputs (default ~/.cache/kdjax/...)
  # Tang et al. (2019) augmented, teacher-labelled copies per training sentence (0 = none).
  c.distill.augment_copies = 0
  c.distill.augment_seed = 0  # fixed apart from config.seed so every seed shares one cache
  c.distill.augment_mask_prob = 0.1
  c.distill.augment_replace_prob = 0.1
  c.distill.augment_ngram_prob = 0.25

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.teacher_steps = 1500  # steps of the teacher stage (and of the teacher in 'online')
  c.train.student_steps = 1500  # steps of student_alone, online and distill
  c.train.log_every = 50  # steps between progress lines / metrics.jsonl records
  c.train.eval_every = 500  # steps between dev evaluations (0 = only at the end)
  c.train.checkpoint_every = 250  # steps between checkpoints; a multiple of log_every
  c.train.keep_checkpoints = 2  # newest checkpoints kept per stage
  c.train.eval_batch_size = 256
  return c


def optimizer(learning_rate: float) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.name = 'adamw'  # adamw | adam | sgd
  o.learning_rate = learning_rate
  o.schedule = 'linear'  # constant | linear | cosine decay after warmup
  o.warmup_steps = 100
  o.weight_decay = 0.01  # applied to matrices only (not biases, norms)
  o.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  return o
