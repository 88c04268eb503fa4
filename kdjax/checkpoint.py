"""orbax checkpoints of a training stage (state + data position) and exports of models."""

import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from kdjax import parallel


class CheckpointError(RuntimeError):
  """A checkpoint or export is missing, unreadable or does not fit the model."""


MANIFEST = 'kdjax_sha256.json'


def write_manifest(directory: pathlib.Path) -> None:
  """sha256 of every file under `directory`, so later damage (a truncated or bit-flipped
  file) is detected before the bytes are used."""
  files = sorted(p for p in directory.rglob('*') if p.is_file() and p.name != MANIFEST)
  digests = {str(p.relative_to(directory)): _sha256(p) for p in files}
  tmp = directory / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps(digests, indent=1, sort_keys=True))
  os.replace(tmp, directory / MANIFEST)


def verify_manifest(directory: pathlib.Path) -> None:
  """Raises CheckpointError naming the first damaged or missing file; a folder without a
  manifest (written before manifests, or killed between orbax's atomic finalize and the
  manifest) is left to orbax's own checks."""
  path = directory / MANIFEST
  if not path.is_file():
    return
  try:
    digests = json.loads(path.read_text())
  except ValueError as e:
    raise CheckpointError(f'{path}: unreadable checksum manifest ({e})') from None
  for name, digest in digests.items():
    file = directory / name
    if not file.is_file():
      raise CheckpointError(f'{file}: missing (listed in {path})')
    if _sha256(file) != digest:
      raise CheckpointError(f'{file}: checksum mismatch (damaged since it was written)')


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


class StageCheckpointer:
  """Saves `(TrainState, data-iterator position)` every few steps, keeping the newest N.

  orbax writes each step into a temporary folder and renames it when complete, so a kill
  during a save leaves the previous checkpoint intact and the half-written one ignored.
  Saves run in the background; once one has finished (at the next save or `wait`), a sha256
  manifest of its files is added, and a restore verifies it. A damaged step is moved aside
  (`<step>.corrupt`, kept for inspection) and the next older one is used.
  """

  def __init__(self, directory: str | os.PathLike, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.LatestN(keep), create=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # a step saved in the background, without manifest yet

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict) -> None:
    self._finish_pending()
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
      ),
    )
    self._pending = step

  def _finish_pending(self) -> None:
    if self._pending is None:
      return
    self._manager.wait_until_finished()
    step_dir = self.directory / str(self._pending)
    if step_dir.is_dir() and parallel.is_lead_process():
      write_manifest(step_dir)
    self._pending = None

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """The newest intact checkpoint, falling back to older ones; None if there is none."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      step_dir = self.directory / str(step)
      try:
        verify_manifest(step_dir)
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # orbax raises many types for damaged files; we report them all
        failures.append(f'{step_dir}: {type(e).__name__}: {e}'.splitlines()[0])
        print(f'warning: checkpoint {step_dir} is damaged ({failures[-1]}); trying an older one')
        self._quarantine(step_dir)
        continue
      return restored['state'], dict(restored['data'])
    if failures:
      raise CheckpointError(
        'no readable checkpoint in ' + str(self.directory) + ': ' + '; '.join(failures)
      )
    return None

  def _quarantine(self, step_dir: pathlib.Path) -> None:
    """Moves a damaged step out of orbax's sight, so the run can save that step again."""
    if parallel.is_lead_process() and step_dir.is_dir():
      target = step_dir.with_name(step_dir.name + '.corrupt')
      suffix = 1
      while target.exists():
        target = step_dir.with_name(f'{step_dir.name}.corrupt{suffix}')
        suffix += 1
      step_dir.rename(target)
    parallel.barrier(f'quarantined {step_dir}')
    self._manager.reload()

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'StageCheckpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    """Finishes pending saves (and their manifests), however the block was left."""
    self.wait()
    self.close()


def restore_on_host(state_dir: str | os.PathLike) -> Any:
  """A saved state (`<checkpoint>/<step>/state`) as host numpy arrays, whatever devices or
  processes wrote it: the target is built from the checkpoint's own shapes and dtypes, so
  orbax never tries to rebuild the writer's device mesh."""
  state_dir = pathlib.Path(state_dir).absolute()
  verify_manifest(state_dir.parent)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      metadata = ckptr.metadata(state_dir).item_metadata
      tree = getattr(metadata, 'tree', metadata)
      target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree)
      return ckptr.restore(state_dir, target)
  except Exception as e:  # see StageCheckpointer.restore_latest
    raise CheckpointError(
      f'checkpoint {state_dir} is unreadable: {type(e).__name__}: {str(e).splitlines()[0]}'
    ) from e


def export_model(directory: str | os.PathLike, params: Any, model_spec: dict) -> None:
  """Writes params (orbax) and the model's name and keywords (JSON) to `directory`."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:  # a collective save in a multi-process job
    ckptr.save(directory / 'params', jax.device_get(params), force=True)
  if parallel.is_lead_process():
    write_manifest(directory / 'params')
    (directory / 'model.json').write_text(json.dumps(model_spec, indent=2, sort_keys=True))


def read_export_spec(directory: str | os.PathLike) -> dict:
  """The model name and keywords of an export written by `export_model`."""
  directory = pathlib.Path(directory).absolute()
  spec_path = directory / 'model.json'
  if not spec_path.is_file() or not (directory / 'params').is_dir():
    raise CheckpointError(f'no exported model at {directory} (expected model.json and params/)')
  return json.loads(spec_path.read_text())


def load_export_params(directory: str | os.PathLike, abstract_params: Any = None) -> Any:
  """The params of an export; `abstract_params` (shapes/dtypes) restores them as jax arrays."""
  directory = pathlib.Path(directory).absolute()
  verify_manifest(directory / 'params')
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(directory / 'params', abstract_params)
  except Exception as e:  # see StageCheckpointer.restore_latest
    raise CheckpointError(
      f'exported model at {directory} is unreadable: {type(e).__name__}: {str(e).splitlines()[0]}'
    ) from e
