"""One run per workdir: an advisory lock held for the whole run.

`lock(workdir)` takes an exclusive `flock` on `workdir/workdir.lock` and writes the
holder's pid and host into it. The kernel drops the lock when the holder exits for any
reason (kill -9 included), so a lock left by a dead process never blocks a resume; a
second run in the same workdir fails at once with WorkdirInUseError naming the
holder. Only process 0 of a multi-process job takes it (the others write no files).
"""

import contextlib
import fcntl
import json
import os
import socket
from typing import Iterator

import jax

LOCK_FILE = "workdir.lock"


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir's lock."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.load(f)
    return f"process {info['pid']} on host {info['host']}"
  except (OSError, ValueError, KeyError):
    return "another process (its pid is not yet written)"


@contextlib.contextmanager
def lock(workdir: str, enabled: bool | None = None) -> Iterator[None]:
  """Holds `workdir`'s lock for the body; raises WorkdirInUseError if a live process has it."""
  if not (jax.process_index() == 0 if enabled is None else enabled):
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirInUseError(f"workdir {os.path.abspath(workdir)!r} in use by {_holder(path)} "
                              f"(lock file {path}); wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    os.fsync(fd)
    yield
  finally:
    os.close(fd)   # releases the flock
