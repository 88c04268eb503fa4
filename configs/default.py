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
  # online (teacher and student trained jointly), distill (student from the frozen teacher),
  # assistant (the assistant distilled from the teacher; a later distill learns from it),
  # mutual (mutual.num_students students trained jointly by deep mutual learning).
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
  # Training-data shards, each read by one process only (kdjax.data.shards); 0 = one per
  # process. Global batches depend on the shard count, not on the process count.
  c.data.shards = 0

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
  # Teacher-assistant chains (Mirzadeh et al. 2020): the 'assistant' stage distills this
  # model from the teacher; when it precedes 'distill', the student learns from it instead.
  # init_from='teacher' / init_layers work as for the student.
  c.assistant = models.bert_tiny()

  c.teacher_optim = optimizer(learning_rate=5e-4)
  c.student_optim = optimizer(learning_rate=2e-3)
  c.assistant_optim = optimizer(learning_rate=5e-4)  # the assistant stage (a BERT by default)
  # The 'recover' stage distills an already trained (and compressed) student again: a
  # smaller step than training from scratch, or it unlearns what compression kept.
  c.recover_optim = optimizer(learning_rate=1e-4)
  c.recover_optim.warmup_steps = 20

  # Distillation objective (kdjax/kd): a weighted sum of terms; weight 0 turns a term off.
  # Weights are not renormalised. Terms that read hidden states or attention (hidden_mse to
  # minilmv2) need the teacher live: distill.teacher_cache='off'. The pooled-vector terms (crd,
  # pooled_mse) also work from the teacher-output cache, which then stores the pooled vectors.
  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 2.0
  c.loss.weights = ml_collections.ConfigDict(
    {
      'ce': 0.5,  # cross-entropy on gold labels (label_smoothing applies)
      'kl': 0.5,  # T²·KL(teacher_T ‖ student_T), Hinton et al. 2015
      'reverse_kl': 0.0,  # T²·KL(student_T ‖ teacher_T)
      'jsd': 0.0,  # T²·generalised Jensen–Shannon, mixture weight jsd_teacher_mix
      'soft_ce': 0.0,  # T²·H(teacher_T, student_T)
      'logit_mse': 0.0,  # mean squared logit difference (Ba & Caruana 2014)
      'dkd': 0.0,  # decoupled KD (Zhao et al. 2022): dkd_alpha·TCKD + dkd_beta·NCKD
      'hidden_mse': 0.0,  # FitNets/TinyBERT hidden-state MSE over layer_map pairs
      'hidden_cosine': 0.0,  # DistilBERT cosine loss over layer_map pairs
      'pkd': 0.0,  # Patient KD: normalised [CLS] distance over layer_map pairs
      'attention_kl': 0.0,  # KL of attention probabilities over layer_map pairs
      'attention_mse': 0.0,  # TinyBERT MSE of attention probabilities
      'minilm': 0.0,  # MiniLM: last-layer attention + value-relation KL
      'minilmv2': 0.0,  # MiniLMv2: query/key/value relation KL, minilm_relation_heads
      'crd': 0.0,  # contrastive representation distillation on pooled vectors
      'pooled_mse': 0.0,  # FitNets hint on the pooled sentence vectors (projected)
    }
  )
  # Any weight, and the temperature, may follow a schedule from its configured value:
  # '' (constant), 'linear:END[:FROM:TO]', 'cosine:END[:FROM:TO]', 'step:S=V[,S=V...]'.
  c.loss.schedules = ml_collections.ConfigDict(
    {name: '' for name in ('temperature', *c.loss.weights.keys())}
  )
  c.loss.label_smoothing = 0.0  # of the gold-label CE
  c.loss.jsd_teacher_mix = 0.5  # weight of the teacher's distribution in the JSD mixture
  c.loss.dkd_alpha = 1.0  # DKD target-class term
  c.loss.dkd_beta = 8.0  # DKD non-target-class term (the paper's default for CIFAR)
  # Student/teacher hidden-state pairs for layer-wise terms; index 0 = embedding output.
  # 'uniform' (student layer m <-> teacher layer m·N/M), 'last_k', 'explicit' (layer_pairs).
  c.loss.layer_map = 'uniform'
  c.loss.layer_map_last_k = 1
  c.loss.layer_pairs = ()  # explicit: ((student_index, teacher_index), ...)
  c.loss.minilm_teacher_layer = 0  # teacher layer for minilm/minilmv2 (0 = the last)
  c.loss.minilm_relation_heads = 0  # minilmv2 relation heads (0 = teacher attention heads)
  c.loss.crd_dim = 128  # shared embedding width of the CRD heads
  c.loss.crd_temperature = 0.1
  c.loss.crd_negatives = 'in_batch'
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
  # Where a replaced word comes from: 'unigram' (the training set's word frequencies) or
  # 'neighbours' (one of its augment_neighbours nearest words in the first teacher's input
  # embedding table, TinyBERT-style; needs data.tokenizer='wordpiece' and a BERT teacher).
  c.distill.augment_replace = 'unigram'
  c.distill.augment_neighbours = 15
  # Multi-teacher distillation: exports or run workdirs of more trained teachers (same rules
  # as teacher.path, same tokenizer), joining the configured teacher wherever it teaches:
  # the assistant stage, and distill unless an assistant runs before it (generations >= 2
  # learn from the previous generation alone).
  c.distill.extra_teachers = ()
  # How several teachers combine: 'average_probs' (the soft target is the weighted mean of
  # the teachers' softmax(z/T); logit terms except logit_mse) or 'sum_losses' (the weighted
  # mean of the objective against each teacher; any terms).
  c.distill.multi_teacher = 'average_probs'
  # One weight >= 0 per teacher, the configured one first; () = equal. Normalised to sum 1.
  c.distill.teacher_weights = ()
  # Born-again networks (Furlanello et al. 2018): N > 1 repeats the distill stage N times in
  # distill, distill_gen2, ..., each generation learning from the previous one's student.
  c.distill.generations = 1

  # Deep mutual learning (Zhang et al. 2018), the 'mutual' stage: num_students copies of
  # config.student from different initial weights (student.init_from, if set, still loads
  # into every copy), each trained on CE + kd_weight · the mean over its peers of
  # T²·KL(peer_T ‖ self_T) at T = temperature (the paper uses 1).
  c.mutual = ml_collections.ConfigDict()
  c.mutual.num_students = 2
  c.mutual.kd_weight = 1.0
  c.mutual.temperature = 1.0

  # Gradual pruning of the student while it trains (kdjax/compress/pruning.py): the selected
  # weights follow a cubic schedule (Zhu & Gupta 2017) from 0 to `sparsity` between
  # begin_fraction and end_fraction of the stage's steps, then stay fixed while training
  # recovers; pruned weights are exactly zero and receive no updates. Masks live in the
  # optimizer state, so checkpoints and resume need nothing special.
  c.prune = ml_collections.ConfigDict()
  # none | magnitude (|w|) | movement (Sanh et al. 2020) | nm (N:M groups along the input
  # axis, e.g. 2:4, from begin_fraction on, re-chosen by magnitude every update)
  c.prune.method = 'none'
  c.prune.sparsity = 0.0  # final fraction of zeros among the selected weights (not for nm)
  c.prune.nm = (2, 4)  # nm: keep N of every M consecutive input weights
  c.prune.rules = ('kernel$',)  # regexes over parameter paths ('embedding$' for the table)
  c.prune.exclude = ('classifier',)  # paths left dense even if a rule matches
  c.prune.scope = 'layer'  # layer: each tensor to `sparsity`; global: one threshold
  c.prune.begin_fraction = 0.1
  c.prune.end_fraction = 0.7
  c.prune.update_every = 50  # steps between mask updates
  c.prune.stages = ('distill',)  # which student stages prune: student_alone, distill, recover

  # Quantization-aware training: the student's forward pass sees its weights fake-quantized
  # (straight-through gradients) as `kdjax.ptq` with the same settings will store them.
  c.quant = ml_collections.ConfigDict()
  c.quant.qat_bits = 0  # 0 (off) | 8 | 4
  c.quant.symmetric = True
  c.quant.per_channel = True  # one scale per output unit of a matrix
  # The weights kdjax.ptq quantizes by default (compress/quantize.py DEFAULT_RULES): Dense
  # kernels, low-rank factors, embedding tables.
  c.quant.rules = ('kernel(_a|_b)?$', 'embedding$')
  c.quant.exclude = ()
  c.quant.stages = ('distill',)  # student_alone, distill and/or recover
  c.quant.ptq_bits = 8  # 8 | 4: what the 'quantize' stage stores (= qat_bits after QAT)

  # Compression chained with distillation (kdjax/chain.py), one stage each:
  #   'compress'  transforms the student of the stage before it, without training;
  #   'recover'   distills that student from the teacher again (train.recover_steps steps
  #               under recover_optim; prune.stages / quant.stages may include it);
  #   'quantize'  post-training quantization (quant.ptq_bits) into the compact artifact.
  # e.g. stages=('teacher', 'distill', 'compress', 'recover', 'quantize').
  c.compress = ml_collections.ConfigDict()
  # units (BiLSTM hidden units, CNN filters, BERT FFN neurons) | heads (BERT attention
  # heads) | lowrank (SVD of Dense kernels into two smaller layers); none without 'compress'
  c.compress.method = 'none'
  c.compress.keep = 0.5  # units, heads: fraction kept in every pruned layer
  c.compress.rank = 0  # lowrank: one rank for every selected kernel (or set energy)
  c.compress.energy = 0.0  # lowrank: per kernel, keep this share of the squared singular values
  c.compress.rules = ('kernel$',)  # lowrank: kernels to factorise
  c.compress.exclude = ('classifier',)
  c.compress.timing_repeats = 20  # forward passes timed per latency figure of a chain stage

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.teacher_steps = 1500  # steps of the teacher stage (and of the teacher in 'online')
  c.train.student_steps = 1500  # steps of student_alone, online, distill, assistant and mutual
  c.train.recover_steps = 500  # steps of the 'recover' stage
  c.train.log_every = 50  # steps between progress lines / metrics.jsonl records
  c.train.eval_every = 500  # steps between dev evaluations (0 = only at the end)
  c.train.checkpoint_every = 250  # steps between checkpoints; a multiple of log_every
  c.train.keep_checkpoints = 2  # newest checkpoints kept per stage
  c.train.eval_batch_size = 256
  # True: every BERT the run builds, trained or a frozen teacher read from an export, applies
  # its layers as one lax.scan (kdjax.models.bert scan_layers): one compiled layer body, so
  # deep models compile faster. Results, checkpoints and exports are unchanged;
  # benchmarks/scan_layers.py measures what it saves in compile time and costs per step.
  c.train.scan_layers = False
  # A NaN/Inf loss, gradient or metric: 'stop' (error naming step and term, last good
  # checkpoint kept) or 'skip' (the step changes nothing; counted; at most max_skipped_steps).
  c.train.nonfinite = 'stop'
  c.train.max_skipped_steps = 10
  # > 0: every trained stage also keeps an exponential moving average of its weights with
  # this decay (kdjax.optim.with_param_ema), and evaluates, exports and reports that average
  # instead of the last step's weights. 0 = off; e.g. 0.999 averages over ~1,000 steps.
  c.train.ema_decay = 0.0

  c.parallel = parallel()
  return c


def parallel() -> ml_collections.ConfigDict:
  """Data parallelism over every device of the job (kdjax/parallel.py; README 'Scaling out').

  The global batch is train.batch_size whatever the device count (it must divide evenly over
  the devices); each process feeds only its rows."""
  p = ml_collections.ConfigDict()
  p.mode = 'single'  # single (one device) | pmap | shard_map | mesh (jit + NamedSharding)
  p.params = 'replicated'  # replicated | fsdp: trained state sharded over devices (mesh)
  p.teacher = 'replicated'  # replicated | fsdp: the frozen teacher sharded (mesh)
  p.fsdp_rules = ('.*',)  # regexes over state paths that fsdp may shard
  p.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated
  p.distributed = ml_collections.ConfigDict()
  # never | auto (join when a coordinator address is set here or in JAX_COORDINATOR_ADDRESS)
  # | always (also let JAX detect TPU pod slices, SLURM, Open MPI)
  p.distributed.initialize = 'auto'
  p.distributed.coordinator_address = ''  # host:port of process 0
  p.distributed.num_processes = 0  # 0: from KDJAX_NUM_PROCESSES or the detected cluster
  p.distributed.process_id = -1  # -1: from KDJAX_PROCESS_ID or the detected cluster
  return p


def optimizer(learning_rate: float) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.name = 'adamw'  # adamw | adam | sgd
  o.learning_rate = learning_rate
  o.schedule = 'linear'  # constant | linear | cosine decay after warmup
  o.warmup_steps = 100
  o.weight_decay = 0.01  # applied to matrices only (not biases, norms)
  o.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  return o
