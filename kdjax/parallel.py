"""Data parallelism: one train-step body, run on one device or over every device of the job.

`config.parallel.mode` picks how the step runs:

- `single`: `jit` on the default device (a laptop, a Colab CPU/GPU).
- `pmap`: `jax.pmap` over the local devices, the per-device body reducing gradients and
  metrics with `lax.psum` over the `data` axis (the classic TPU recipe).
- `shard_map`: the same per-device body under `jit(shard_map)` over a `Mesh(('data',))`, with
  the collectives written out as in `pmap`.
- `mesh`: `jit` over the mesh with `NamedSharding`: the batch sharded on `data`, the state
  replicated or FSDP-sharded by rule (`parallel.params`), the frozen teacher likewise
  (`parallel.teacher`); XLA's partitioner inserts the collectives.

All four give the numbers of one device at the same global batch. In the per-device bodies
each device's loss is its *share* of the global mean (`losses.data_axis`: local sum divided
by the global count), so psum-ing gradients gives the global gradient exactly, even when
devices hold different numbers of real examples or tokens. Dropout differs: `single` and
`mesh` draw one mask for the global batch (threefry is partitionable), `pmap` and
`shard_map` fold the device index into the key, so with dropout on they match in
distribution, not bit for bit.

Between steps the state is a global `jax.Array` (replicated, or sharded on `data` under
FSDP) in every mode, so orbax saves it as one logical array: a checkpoint written on 8
devices restores on 1 and the reverse, and every process of a multi-host job joins the save.
The global batch size is the config's; each process feeds only its rows
(`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import config as config_lib
from kdjax import losses
from kdjax import step as step_lib
from kdjax.compress import rules as rules_lib

MODES = config_lib.PARALLEL_MODES
AXIS = 'data'


class ParallelError(config_lib.ConfigError):
  """A parallel setting the devices or the batch cannot honour (one line, names the key)."""


# -- multi-host start-up -------------------------------------------------------------------


def initialize_distributed(dist_cfg) -> bool:
  """Joins this process to a multi-process JAX job; True if it did.

  `distributed.initialize`: 'never'; 'auto' (join when a coordinator address is configured
  or in JAX_COORDINATOR_ADDRESS, as on several GPU hosts); 'always' (also lets JAX detect
  the cluster itself: TPU pod slices, SLURM, Open MPI). The process count and index come from
  the config or KDJAX_NUM_PROCESSES / KDJAX_PROCESS_ID. Must run before any JAX computation.
  """
  mode = dist_cfg.initialize
  address = dist_cfg.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  if mode == 'never' or (mode == 'auto' and not address):
    return False
  num = dist_cfg.num_processes or int(os.environ.get('KDJAX_NUM_PROCESSES', 0)) or None
  index = dist_cfg.process_id
  if index < 0:
    index = int(os.environ['KDJAX_PROCESS_ID']) if 'KDJAX_PROCESS_ID' in os.environ else None
  if address and (num is None or index is None):
    raise ParallelError(
      f'parallel.distributed: coordinator {address!r} needs num_processes and process_id '
      '(config keys, or KDJAX_NUM_PROCESSES and KDJAX_PROCESS_ID)'
    )
  if jax.distributed.is_initialized():
    return True
  # CPU devices of different processes talk through gloo (localhost clusters, tests); GPUs
  # and TPUs use their own collectives whatever this says.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=address or None, num_processes=num, process_id=index
  )
  return True


def is_lead_process() -> bool:
  """The one process that writes logs, reports and other single-writer files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits for every process (no-op in a one-process job)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def lead_first(name: str, fn: Callable[[], Any]) -> Any:
  """`fn()` on the lead process, then on the others: what it writes (a prepared dataset, a
  tokenizer, a teacher cache) is written once and read by the rest."""
  if is_lead_process():
    out = fn()
    barrier(name)
    return out
  barrier(name)
  return fn()


def all_reduce_max(x: np.ndarray) -> np.ndarray:
  """Elementwise maximum of a host array over every process (the array itself in one)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  gathered = multihost_utils.process_allgather(np.asarray(x))  # [processes, *x.shape]
  return np.asarray(gathered).max(axis=0)


# -- placement -----------------------------------------------------------------------------


def fsdp_spec(shape: Sequence[int], size: int, num_shards: int) -> P:
  """Shards the largest axis divisible by the device count; small leaves stay replicated."""
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < size:
    return P()
  candidates = [(d, i) for i, d in enumerate(shape) if d % num_shards == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*([None] * axis), AXIS)


@dataclasses.dataclass
class DataParallel:
  """Where the state, the teacher and each batch live, and the step compiled for that."""

  mode: str = 'single'
  params: str = 'replicated'
  teacher: str = 'replicated'
  fsdp_rules: tuple[str, ...] = ('.*',)
  fsdp_min_size: int = 2**14

  def __post_init__(self):
    if self.mode not in MODES:
      raise ParallelError(f'parallel.mode={self.mode!r}: valid modes are {", ".join(MODES)}')
    devices = jax.devices()
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self.num_devices = len(devices)
    self.num_local = jax.local_device_count()
    if self.mode == 'single' and jax.process_count() > 1:
      raise ParallelError(
        f'parallel.mode=single in a job of {jax.process_count()} processes: '
        'use pmap, shard_map or mesh'
      )

  @classmethod
  def from_config(cls, cfg) -> 'DataParallel':
    return cls(
      mode=cfg.mode,
      params=cfg.params,
      teacher=cfg.teacher,
      fsdp_rules=tuple(cfg.fsdp_rules),
      fsdp_min_size=int(cfg.fsdp_min_size),
    )

  # -- batch ---------------------------------------------------------------------------

  def local_batch_size(self, global_batch_size: int) -> int:
    """Rows this process feeds per step; the global batch must split evenly over devices."""
    if self.mode != 'single' and global_batch_size % self.num_devices:
      raise ParallelError(
        f'train.batch_size={global_batch_size} does not split over {self.num_devices} '
        f'devices (parallel.mode={self.mode}): use a multiple of {self.num_devices}'
      )
    return global_batch_size // jax.process_count()

  def put_batch(self, batch: dict) -> Any:
    """This process's rows of a global batch, placed for the step."""
    if self.mode == 'single':
      return batch
    if self.mode == 'pmap':  # [local devices, rows per device, ...]
      return jax.tree.map(lambda x: x.reshape(self.num_local, -1, *x.shape[1:]), batch)
    sharding = NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  # -- state and teacher ---------------------------------------------------------------

  def _shardings(self, tree, placement: str):
    if placement == 'replicated' or self.mode != 'mesh':
      return jax.tree.map(lambda _: NamedSharding(self.mesh, P()), tree)
    selected = rules_lib.match(tree, self.fsdp_rules, 'parallel.fsdp_rules')
    return jax.tree.map(
      lambda x, chosen: NamedSharding(
        self.mesh,
        fsdp_spec(np.shape(x), self.fsdp_min_size, self.num_devices) if chosen else P(),
      ),
      tree,
      selected,
    )

  def _put(self, tree, placement: str):
    if self.mode == 'single' or tree is None:
      return tree
    host = to_host(tree)
    return jax.tree.map(
      # From a callback, so each process builds only its own shards (multi-host safe).
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x[index])),
      host,
      self._shardings(host, placement),
    )

  def put_state(self, state: step_lib.TrainState) -> step_lib.TrainState:
    return self._put(state, self.params)

  def put_teacher(self, teacher_params):
    return self._put(teacher_params, self.teacher)

  # -- the step ------------------------------------------------------------------------

  def train_step(
    self, loss_fn: step_lib.LossFn, tx: optax.GradientTransformation, skip_nonfinite=False
  ):
    """`step(state, teacher_params, placed_batch) -> (state, metrics)` for this mode;
    `skip_nonfinite`: see step_lib.apply_gradients."""
    if self.mode == 'single':
      return step_lib.make_train_step(loss_fn, tx, skip_nonfinite)
    if self.mode == 'mesh':
      # The global step body as on one device; the partitioner splits it over the mesh.
      return jax.jit(step_lib.train_step_fn(loss_fn, tx, skip_nonfinite), donate_argnums=0)
    body = per_device_step(loss_fn, tx, AXIS, skip_nonfinite)
    if self.mode == 'pmap':
      return jax.pmap(
        body, axis_name=AXIS, in_axes=(None, None, 0), out_axes=(None, None), donate_argnums=0
      )
    # check_vma=False: with it, JAX would psum the gradients of the replicated state itself
    # (the transpose of its implicit broadcast); the body already reduces, as under pmap.
    mapped = jax.shard_map(
      body,
      mesh=self.mesh,
      in_specs=(P(), P(), P(AXIS)),
      out_specs=(P(), P()),
      check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=0)


def per_device_step(
  loss_fn: step_lib.LossFn, tx: optax.GradientTransformation, axis: str, skip_nonfinite=False
):
  """The step one device runs inside pmap/shard_map: local forward and backward on its rows,
  gradients and (sum, count) metrics summed over `axis`, the same update on every device."""

  def step(state: step_lib.TrainState, teacher_params, batch):
    # Dropout: one key per step as on one device, then per device so masks differ by row.
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(axis))
    with losses.data_axis(axis):
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, teacher_params, batch, rng, state.step
      )
    grads = jax.lax.psum(grads, axis)
    metrics = jax.lax.psum(metrics, axis)
    # `loss` is this device's share of the global mean; the objectives' own 'loss' metric
    # was built from the local count, so it is rebuilt from the global pieces.
    count = jax.lax.psum(jnp.sum(batch['weights'].astype(jnp.float32)), axis)
    loss = jax.lax.psum(loss, axis)
    metrics['loss'] = (loss * count, count)
    return step_lib.apply_gradients(state, tx, grads, metrics, loss if skip_nonfinite else None)

  return step


# -- back to the host ----------------------------------------------------------------------


def to_host(tree):
  """numpy copies of a pytree of (possibly multi-host, possibly sharded) arrays."""

  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)
