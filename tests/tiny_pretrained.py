"""A tiny Hugging Face-format BERT checkpoint (random weights, MiniLM's WordPiece tokenizer)
and a short pretrained-teacher run config over it, shared by the pipeline test and the
teacher-cache benchmark's smoke test."""

import json
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

from configs import default
from kdjax.models import hf_bert

HIDDEN, LAYERS, FFN, VOCAB = 32, 2, 64, 30522


def hf_checkpoint(folder: pathlib.Path) -> pathlib.Path:
  """A random 2-layer BERT in HF layout, with MiniLM's WordPiece tokenizer."""
  rng = np.random.default_rng(0)
  folder.mkdir()
  cfg = {
    'model_type': 'bert',
    'vocab_size': VOCAB,
    'hidden_size': HIDDEN,
    'num_hidden_layers': LAYERS,
    'num_attention_heads': 2,
    'intermediate_size': FFN,
    'max_position_embeddings': 64,
    'type_vocab_size': 2,
    'hidden_act': 'gelu',
  }
  (folder / 'config.json').write_text(json.dumps(cfg))
  w = lambda *shape: (rng.normal(size=shape) * 0.05).astype(np.float32)
  tensors = {
    'embeddings.word_embeddings.weight': w(VOCAB, HIDDEN),
    'embeddings.position_embeddings.weight': w(64, HIDDEN),
    'embeddings.token_type_embeddings.weight': w(2, HIDDEN),
    'embeddings.LayerNorm.weight': np.ones(HIDDEN, np.float32),
    'embeddings.LayerNorm.bias': np.zeros(HIDDEN, np.float32),
    'pooler.dense.weight': w(HIDDEN, HIDDEN),
    'pooler.dense.bias': w(HIDDEN),
  }
  for i in range(LAYERS):
    p = f'encoder.layer.{i}.'
    for name in ('query', 'key', 'value'):
      tensors[p + f'attention.self.{name}.weight'] = w(HIDDEN, HIDDEN)
      tensors[p + f'attention.self.{name}.bias'] = w(HIDDEN)
    tensors[p + 'attention.output.dense.weight'] = w(HIDDEN, HIDDEN)
    tensors[p + 'attention.output.dense.bias'] = w(HIDDEN)
    tensors[p + 'intermediate.dense.weight'] = w(FFN, HIDDEN)
    tensors[p + 'intermediate.dense.bias'] = w(FFN)
    tensors[p + 'output.dense.weight'] = w(HIDDEN, FFN)
    tensors[p + 'output.dense.bias'] = w(HIDDEN)
    for norm in ('attention.output.LayerNorm', 'output.LayerNorm'):
      tensors[p + f'{norm}.weight'] = np.ones(HIDDEN, np.float32)
      tensors[p + f'{norm}.bias'] = np.zeros(HIDDEN, np.float32)
  save_file(tensors, str(folder / 'model.safetensors'))
  shutil.copy(hf_bert.minilm_dir() / 'tokenizer.json', folder / 'tokenizer.json')
  return folder


def pipeline_config(checkpoint, tfds_dir, cache_dir):
  """Teacher fine-tuned from `checkpoint`, then student alone and distilled, 6 steps each,
  on 300 WordPiece sentences with one augmented copy; teacher outputs cached in cache_dir."""
  c = default.get_config()
  c.data.tfds_data_dir = tfds_dir
  c.data.train_limit = 300
  c.data.tokenizer = 'wordpiece'
  c.data.tokenizer_path = str(checkpoint)
  c.teacher.model = 'bert'
  c.teacher.kwargs = dict(
    hidden_size=HIDDEN,
    num_layers=LAYERS,
    num_heads=2,
    intermediate_size=FFN,
    max_len=64,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
  )
  c.teacher.init_from = str(checkpoint)
  c.student.init_from = 'teacher'
  c.student.kwargs.embed_dim = 16  # a PCA of the 32-wide teacher embeddings
  c.stages = ('teacher', 'student_alone', 'distill')
  c.distill.augment_copies = 1
  c.distill.cache_dir = str(cache_dir)
  c.train.batch_size = 16
  c.train.teacher_steps = c.train.student_steps = 6
  c.train.log_every = c.train.checkpoint_every = 3
  c.train.eval_every = 0
  c.train.eval_batch_size = 64
  return c
