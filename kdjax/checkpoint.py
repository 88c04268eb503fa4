"""orbax checkpoints of a training stage (state + data position) and exports of models."""

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class CheckpointError(RuntimeError):
  """A checkpoint or export is missing, unreadable or does not fit the model."""


class StageCheckpointer:
  """Saves `(TrainState, data-iterator position)` every few steps, keeping the newest N.

  orbax writes each step into a temporary folder and renames it when complete, so a kill
  during a save leaves the previous checkpoint intact and the half-written one ignored.
  """

  def __init__(self, directory: str | os.PathLike, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.LatestN(keep), create=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
      ),
    )

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """The newest readable checkpoint, falling back to older ones; None if there is none."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # orbax raises many types for damaged files; we report them all
        failures.append(f'{self.directory / str(step)}: {type(e).__name__}: {e}'.splitlines()[0])
        print(
          f'warning: checkpoint {self.directory / str(step)} is unreadable, trying an older one',
          flush=True,
        )
        continue
      return restored['state'], dict(restored['data'])
    if failures:
      raise CheckpointError(
        'no readable checkpoint in ' + str(self.directory) + ': ' + '; '.join(failures)
      )
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_on_host(state_dir: str | os.PathLike) -> Any:
  """A saved state (`<checkpoint>/<step>/state`) as host numpy arrays, whatever devices or
  processes wrote it: the target is built from the checkpoint's own shapes and dtypes, so
  orbax never tries to rebuild the writer's device mesh."""
  state_dir = pathlib.Path(state_dir).absolute()
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
  if jax.process_index() == 0:
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
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(directory / 'params', abstract_params)
  except Exception as e:  # see StageCheckpointer.restore_latest
    raise CheckpointError(
      f'exported model at {directory} is unreadable: {type(e).__name__}: {str(e).splitlines()[0]}'
    ) from e
