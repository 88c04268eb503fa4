"""The complete schema of a sentence-embedding distillation run (`python -m kdjax.embed_distill`).

Experiments start from `get_config()` and change values; they never add keys. The CLI locks
the config, so an override naming a key not listed here is an error.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'embed_distill'  # copied into results.json
  c.seed = 0  # student init (layers not copied from the teacher), dropout, data order

  c.data = ml_collections.ConfigDict()
  # Unlabeled training text, merged in the fixed order sst2, stsb, multi30k, deduplicated and
  # with every STS-B dev sentence removed (see kdjax.data.corpus).
  c.data.sources = ('sst2', 'stsb', 'multi30k')
  c.data.tfds_data_dir = ''  # where SST-2 is prepared; '' = ~/.cache/kdjax/tfds
  c.data.sst2_raw_dir = ''  # '' = the SST-2 TSVs shipped in kdjax
  c.data.stsb_dir = ''  # STS-B train/dev .tsv[.gz]; '' = the copy shipped in kdjax
  c.data.multi30k_path = ''  # Multi30k train.en[.gz]; '' = the copy shipped in kdjax
  c.data.corpus_limit = 0  # keep only the first N corpus sentences (0 = all)
  c.data.eval_limit = 0  # evaluate on the first N STS-B dev pairs (0 = all 1,500)
  c.data.max_len = 64  # WordPiece tokens per sentence, [CLS]/[SEP] included
  c.data.buckets = (16, 32, 64)  # padded lengths; a batch is padded to the smallest that fits
  c.data.bucket_window = 50  # sort by length inside windows of this many batches

  c.teacher = ml_collections.ConfigDict()
  # 'minilm' = the packaged all-MiniLM-L6-v2, or a Hugging Face BERT folder (config.json +
  # model.safetensors + tokenizer.json); its tokenizer is the student's too.
  c.teacher.checkpoint = 'minilm'

  c.student = ml_collections.ConfigDict()
  c.student.num_layers = 2
  c.student.hidden_size = 384  # != the teacher's: a learned projection to its width is added
  c.student.num_heads = 12
  c.student.intermediate_size = 768
  c.student.dropout_rate = 0.1
  c.student.attention_dropout_rate = 0.1
  # 'teacher': word/position embeddings copied, layer i from teacher layer init_layers[i] with
  # the FFN pruned to the intermediate_size neurons of largest weight norms (needs the
  # teacher's hidden_size and num_heads); '': random init.
  c.student.init_from = 'teacher'
  c.student.init_layers = ()  # () = evenly spaced, ending at the teacher's last layer
  # Keep the teacher's word-embedding table as it is (init_from='teacher' only): it is most of
  # the student's parameters, and training it costs an optimizer update of every row per step.
  c.student.freeze_word_embeddings = True

  # loss = mse_weight·MSE(student, teacher) + cosine_weight·(1 − cos(student, teacher)) over
  # mean-pooled sentence embeddings; normalize: L2-normalise both before the MSE.
  c.loss = ml_collections.ConfigDict()
  c.loss.mse_weight = 1.0
  c.loss.cosine_weight = 1.0
  c.loss.normalize = False

  c.optim = default.optimizer(learning_rate=2e-4)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.steps = 2000
  c.train.log_every = 50  # steps between progress lines / metrics.jsonl records
  c.train.eval_every = 500  # steps between STS-B dev evaluations (0 = only at the end)
  c.train.checkpoint_every = 250  # steps between checkpoints
  c.train.keep_checkpoints = 2
  c.train.eval_batch_size = 256  # also the batch size of the teacher's embedding pass
  return c
