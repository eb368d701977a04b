"""Multi-host runs: JAX's multi-controller runtime, one process per host (or per GPU).

Every process runs the same program on its own devices; `jax.devices()` then lists
the devices of all processes and a jitted step over a mesh of them is one SPMD
program. What differs per process is only what a process touches on its host:
its shard of the data (the pipeline reads `jax.process_index()::jax.process_count()`),
the data iterator's position, and files (only process 0 writes metrics).

  initialize(...)            jax.distributed.initialize from flags, or auto-detected
  process_zero_first(fn)     fn() on process 0, then on the others (dataset preparation)
  allgather_json(obj)        every process's JSON-serialisable obj, in process order
  global_sum(x)              a host number summed over processes
  preemption_watch()         -> stop(step): True at the same step on every process after SIGTERM
"""

import contextlib
import json
import logging
import os
import signal
from typing import Any, Callable, Iterator, Sequence, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")

# What a cluster sets for a multi-process job, checked when JAX's own (private)
# auto-detection cannot be asked.
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")


def _cluster_detected() -> bool:
  """Whether jax.distributed.initialize() with no arguments would find its settings."""
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    return True
  try:
    from jax._src import clusters
    return any(not env.opt_in_only_method and env.is_env_present()
               for env in clusters.ClusterEnv._cluster_types)
  except Exception:  # pylint: disable=broad-except
    return any(k in os.environ for k in _CLUSTER_ENV)


def _parse_device_ids(ids: str | Sequence[int] | None) -> list[int] | None:
  if ids is None or ids == "":
    return None
  if isinstance(ids, str):
    try:
      return [int(i) for i in ids.split(",")]
    except ValueError:
      raise ValueError(f"--local_device_ids: expected comma-separated ints, got {ids!r}") from None
  return [int(i) for i in ids]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: str | Sequence[int] | None = None, *,
               auto: bool = True, initialization_timeout: int = 300) -> bool:
  """Starts JAX's multi-controller runtime; returns whether it runs (more than not).

  Must run before anything touches a device. Empty values ("", 0, -1 or None) are
  unset. With all of coordinator_address, num_processes and process_id set, they
  are used as given (the flags of experiments/train.py). With none set, JAX's own
  auto-detection runs when the environment describes a cluster (Slurm, Open MPI,
  Cloud TPU, Kubernetes, JAX_COORDINATOR_ADDRESS) and `auto`; otherwise this is a
  single-process run and nothing happens. A partial set outside a cluster is an error.
  """
  address = coordinator_address or None
  count = num_processes if num_processes not in (None, 0, -1) else None
  pid = process_id if process_id not in (None, -1) else None
  device_ids = _parse_device_ids(local_device_ids)
  if jax.distributed.is_initialized():
    return True
  given = {"--coordinator_address": address, "--num_processes": count, "--process_id": pid}
  if all(v is None for v in given.values()):
    if not (auto and _cluster_detected()):
      return False
  elif any(v is None for v in given.values()) and not _cluster_detected():
    missing = [k for k, v in given.items() if v is None]
    raise ValueError(f"distributed: {', '.join(missing)} not set and no cluster environment "
                     "to detect them from; set all of --coordinator_address, "
                     "--num_processes and --process_id")
  if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
    raise ValueError(f"--coordinator_address: expected host:port, got {address!r}")
  if count is not None and count < 1:
    raise ValueError(f"--num_processes: expected >= 1, got {count}")
  if pid is not None and count is not None and not 0 <= pid < count:
    raise ValueError(f"--process_id: expected in [0, {count}), got {pid}")
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=pid, local_device_ids=device_ids,
                             initialization_timeout=initialization_timeout)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def sync(name: str) -> None:
  """Barrier: returns once every process has reached `sync(name)`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_zero_first(fn: Callable[[], T], name: str = "process_zero_first") -> T:
  """fn() on process 0, then (after a barrier) on every other process.

  For idempotent work on shared files, such as preparing a dataset: process 0
  writes it, the others then find it prepared. Without a shared file system each
  process prepares its own copy, deterministically, one after the other.
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if jax.process_index() == 0 else None
  sync(f"rlhf_jax:{name}")
  return fn() if jax.process_index() != 0 else out


def allgather_json(obj: Any) -> list:
  """[obj of process 0, obj of process 1, ...] on every process (obj: JSON-serialisable)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray(len(data), np.int32)).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = multihost_utils.process_allgather(padded)             # [processes, max length]
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def global_sum(x: float) -> float:
  """A host-side number summed over processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return x
  return float(np.sum(multihost_utils.process_allgather(np.asarray(x, np.float64))))


@contextlib.contextmanager
def preemption_watch() -> Iterator[Callable[[int], bool]]:
  """Yields stop(step) -> bool, True once a SIGTERM has arrived.

  Multi-process, SIGTERM may reach one process only, while saving a checkpoint is
  collective: stop(step) is JAX's preemption sync point (the coordination service
  catches SIGTERM and picks one step at which every process returns True). Call it
  once per step with increasing steps on every process. Single-process, a Python
  handler records the signal (and the previous handler is restored on exit).
  """
  if jax.process_count() > 1:
    from jax._src import distributed as jax_distributed
    if jax_distributed.global_state.preemption_sync_manager is not None:
      yield multihost_utils.reached_preemption_sync_point
      return
    logging.warning("preemption_watch: no preemption sync manager (jax_enable_preemption_service "
                    "is off); a SIGTERM that reaches only some processes will hang a checkpoint")
  received: list[int] = []
  previous = signal.getsignal(signal.SIGTERM)
  try:
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  except ValueError:  # not the main thread: pre-emption is the caller's business
    previous = None
  try:
    yield lambda step: bool(received)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
