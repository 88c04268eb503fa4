"""The training loop under failure: NaN injected into a step (stop, or skip and count),
damaged checkpoints and exports detected by checksum with fallback to the previous one."""

import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from kdjax import checkpoint, loop, losses, report
from kdjax import step as step_lib
from kdjax.models import registry
from tests import tiny_stage


def _train_cfg(**overrides):
  cfg = dict(log_every=1, eval_every=0, checkpoint_every=5, keep_checkpoints=3)
  cfg.update(nonfinite='stop', max_skipped_steps=10)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def model():
  return tiny_stage.cnn()


def _loss_fn(model, nan_steps=()):
  """Supervised CE whose logits turn NaN at `nan_steps` (an injected blow-up)."""

  def loss_fn(params, teacher_params, batch, rng, step):
    del teacher_params
    logits, _ = model.apply(
      {'params': params}, batch['input_ids'], batch['attention_mask'], deterministic=True
    )
    # `step` counts finished steps: the loop's step k sees k - 1.
    poisoned = jnp.isin(step + 1, jnp.asarray(nan_steps or (-1,), jnp.int32))
    logits = jnp.where(poisoned, jnp.nan, logits)
    return losses.supervised_loss(logits, batch['labels'], batch['weights'])

  return loss_fn


def _spec(model, steps, nan_steps=()):
  return loop.StageSpec(
    name='distill',
    loss_fn=_loss_fn(model, nan_steps),
    tx=optax.adam(1e-2),
    schedule=optax.constant_schedule(1e-2),
    params=registry.init_params(model, jax.random.PRNGKey(0)),
    rng=jax.random.PRNGKey(1),
    steps=steps,
  )


def _run(model, tmp_path, steps, nan_steps=(), **cfg):
  writer = report.MetricsWriter(tmp_path / 'metrics.jsonl')
  return loop.train_stage(
    _spec(model, steps, nan_steps), tiny_stage.batches(), tmp_path, _train_cfg(**cfg), writer
  )


def test_nan_stops_the_run_naming_step_and_terms_and_keeps_the_last_good_checkpoint(
  model, tmp_path
):
  with pytest.raises(loop.TrainingDiverged) as e:
    _run(model, tmp_path, 10, nan_steps=(7,))
  message = str(e.value)
  assert '[distill] non-finite ce, loss at step 7' in message
  assert f'last good checkpoint (step 5) is kept in {tmp_path / "checkpoints"}' in message
  assert "train.nonfinite='skip'" in message and '\n' not in message
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['5']


def test_skip_policy_leaves_the_state_as_it_was_and_counts(model, tmp_path):
  clean, _ = _run(model, tmp_path / 'clean', 6)
  # Step 7 is poisoned: after it, the params are those after step 6 of a clean run.
  skipped, info = _run(model, tmp_path / 'skip', 7, nan_steps=(7,), nonfinite='skip')
  chex.assert_trees_all_equal(skipped, clean)
  assert info['skipped_steps'] == 1
  records = [json.loads(r) for r in (tmp_path / 'skip' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]  # no NaN record written
  assert records[-1]['skipped_steps'] == 0
  # A run that goes on counts the skipped step in its later records and checkpoints.
  _, info = _run(model, tmp_path / 'later', 12, nan_steps=(7,), nonfinite='skip')
  assert info['skipped_steps'] == 1
  last = [json.loads(r) for r in (tmp_path / 'later' / 'metrics.jsonl').read_text().splitlines()]
  assert last[-1]['step'] == 12 and last[-1]['skipped_steps'] == 1


def test_skipped_count_survives_resume(model, tmp_path):
  _run(model, tmp_path, 10, nan_steps=(3, 4), nonfinite='skip')
  # Same workdir, more steps: resumes at 10 with the 2 skipped steps remembered.
  _, info = _run(model, tmp_path, 12, nan_steps=(3, 4, 11), nonfinite='skip')
  assert info['skipped_steps'] == 3


def test_too_many_skipped_steps_stop_the_run(model, tmp_path):
  with pytest.raises(loop.TrainingDiverged, match=r'3 non-finite steps skipped .*step 4'):
    _run(model, tmp_path, 10, nan_steps=(2, 3, 4), nonfinite='skip', max_skipped_steps=2)


def _damage(step_dir, how):
  files = sorted(
    p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.stat().st_size > 64
  )
  target = max(files, key=lambda p: p.stat().st_size)  # the array data
  data = bytearray(target.read_bytes())
  if how == 'truncate':
    target.write_bytes(bytes(data[: len(data) // 2]))
  else:  # one flipped bit in the middle
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
  return target


@pytest.mark.parametrize('how', ['truncate', 'bitflip'])
def test_damaged_checkpoint_falls_back_to_the_previous_one(model, tmp_path, how, capsys):
  _run(model, tmp_path, 10)
  ckpt_dir = tmp_path / 'checkpoints'
  assert (ckpt_dir / '10' / checkpoint.MANIFEST).is_file()
  damaged = _damage(ckpt_dir / '10', how)

  state = step_lib.create_state(
    registry.init_params(model, jax.random.PRNGKey(5)), optax.adam(1e-2), jax.random.PRNGKey(1)
  )
  reader = checkpoint.StageCheckpointer(ckpt_dir, keep=3)
  restored, position = reader.restore_latest(state)
  assert int(restored.step) == 5
  out = capsys.readouterr().out
  assert f'checkpoint {ckpt_dir / "10"} is damaged' in out
  if how == 'bitflip':  # only the checksum can tell: the file still parses
    assert f'{damaged}: checksum mismatch' in out
  # Set aside, not deleted; the step can be written again by the resumed run.
  assert (ckpt_dir / '10.corrupt').is_dir() and not (ckpt_dir / '10').exists()
  reader.save(10, restored, position)
  reader.wait()
  reader.close()
  assert (ckpt_dir / '10' / checkpoint.MANIFEST).is_file()


def test_every_checkpoint_damaged_is_one_error_naming_each(model, tmp_path):
  _run(model, tmp_path, 5)
  _damage(tmp_path / 'checkpoints' / '5', 'bitflip')
  state = step_lib.create_state(
    registry.init_params(model, jax.random.PRNGKey(5)), optax.adam(1e-2), jax.random.PRNGKey(1)
  )
  reader = checkpoint.StageCheckpointer(tmp_path / 'checkpoints', keep=3)
  with pytest.raises(checkpoint.CheckpointError, match='no readable checkpoint in .*checksum'):
    reader.restore_latest(state)


def test_damaged_export_is_refused_by_path(model, tmp_path):
  params = registry.init_params(model, jax.random.PRNGKey(0))
  export = tmp_path / 'export'
  checkpoint.export_model(export, params, {'model': 'cnn'})
  chex.assert_trees_all_equal(checkpoint.load_export_params(export), jax.device_get(params))
  files = [p for p in (export / 'params').rglob('*') if p.is_file() and p.stat().st_size > 64]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 3] ^= 0x01
  target.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match=f'{target}: checksum mismatch'):
    checkpoint.load_export_params(export)
