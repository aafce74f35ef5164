"""One training run per workdir: a lock file taken before anything else is written.

`WORKDIR/run.lock` holds the holder's host, pid, process start time and command. A second
run on the same workdir is refused with a message naming the holder. A lock whose holder is
gone is taken over with a warning: on the same host when its pid is dead (or reused by
another process), on any host when its heartbeat (the holder rewrites the file every
`HEARTBEAT_SECONDS`) is older than `STALE_SECONDS`. `--steal_lock` takes it regardless.
Readers (`sample`, `evaluate`) never take it. In a multi-process run only process 0 holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator

from absl import logging
from etils import epath

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed heartbeats: the holder is gone (a host that was replaced)


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _process_start_time(pid: int) -> str:
    """The kernel's start time of `pid` (Linux), so a reused pid is not mistaken for the
    holder; empty where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start_time: str) -> bool:
    """Whether process `pid` on this host still runs and is the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return not start_time or _process_start_time(pid) in ("", start_time)


def describe(holder: dict) -> str:
    """The holder as a person reads it."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {started}: "
            f"{holder.get('command', '?')}")


class WorkdirLock:
    """The lock of one workdir; `acquire()` then `release()`, or use as a context manager."""

    def __init__(self, workdir: epath.Path, steal: bool = False):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.steal = steal
        self.record = {
            "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start_time": _process_start_time(os.getpid()), "started": time.time(),
            "command": " ".join(sys.argv), "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written by a holder killed while writing
            return {}

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        staged = self.path.parent / f".{LOCK_NAME}.{self.record['token']}"
        staged.write_text(json.dumps(self.record))
        staged.replace(self.path)

    def _create_exclusive(self) -> bool:
        """Creates the lock file if there is none; False if one exists."""
        self.record["heartbeat"] = time.time()
        if "://" in str(self.path):  # object stores: no exclusive create, check then write
            if self.path.exists():
                return False
            self.path.write_text(json.dumps(self.record))
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
        return True

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the lock, or None if it may still run."""
        if not holder:
            return "the lock file is unreadable"
        age = time.time() - float(holder.get("heartbeat", holder.get("started", 0)))
        if holder.get("host") == self.record["host"] and not _alive(
                int(holder.get("pid", -1)), holder.get("pid_start_time", "")):
            return f"its process {holder.get('pid')} is gone"
        if age > STALE_SECONDS:
            return f"its heartbeat stopped {age:.0f} s ago"
        return None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder may release between our create and our read
            if self._create_exclusive():
                break
            holder = self._read()
            if holder is None:
                continue
            reason = "--steal_lock was given" if self.steal else self.stale_reason(holder)
            if reason is None:
                raise WorkdirLockedError(
                    f"workdir {str(self.path.parent)!r} is in use by {describe(holder)}. "
                    "Stop that run, or use another --workdir; if that run is gone (its host "
                    "was replaced), pass --steal_lock")
            logging.warning("taking over the workdir lock of %s: %s", describe(holder), reason)
            self._write()
            break
        else:
            raise WorkdirLockedError(f"could not take the lock {str(self.path)!r}; retry")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if (self._read() or {}).get("token") != self.record["token"]:
                    logging.error("the workdir lock %s was taken by another run", self.path)
                    return
                self._write()
            except OSError as error:  # a full disk: the run's own saves will say so
                logging.warning("could not renew the workdir lock: %s", error)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.record["token"]:
                self.path.unlink()
        except OSError as error:
            logging.warning("could not remove the workdir lock %s: %s", self.path, error)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: epath.Path, steal: bool = False) -> Iterator[None]:
    """Holds the workdir's lock for the body: process 0 takes it and every process learns
    whether it did, so all of them stop together when another run holds it."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    lock, error = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, steal)
        try:
            lock.acquire()
        except WorkdirLockedError as caught:
            lock, error = None, caught
    if jax.process_count() > 1:
        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not taken and error is None:
            error = WorkdirLockedError(f"process 0 could not take the lock of {workdir} "
                                       "(its log says who holds it)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
