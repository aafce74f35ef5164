"""One training run per workdir: a lock file taken before anything else is written.

`WORKDIR/run.lock` holds the holder's host, pid, process start time, command and a random
token. A second run on the same workdir is refused with a message naming the holder. A lock
whose holder is gone is taken over with a warning: on the same host when its pid is dead (or
reused by another process), on any host when its heartbeat (the holder rewrites the file
every `HEARTBEAT_SECONDS`) is older than `STALE_SECONDS`. `--steal_lock` takes it regardless.
Readers (`sample`, `evaluate`) never take it. In a multi-process run only process 0 holds it.

Atomicity: the lock file only ever appears whole (written under a unique name, then linked
into place, which fails if a lock exists, or renamed over a stale one), and every
read-decide-write (taking, renewing, releasing) runs under an exclusive `flock` of the
workdir itself, so of several runs started at once exactly one holds the lock. A run whose
lock was taken from it (`--steal_lock`) learns it at its next check (`check`) and stops before
writing another checkpoint. On object stores (gs://) there is no exclusive create or flock:
the lock is checked then written, which only guards against runs started seconds apart.
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

from ddpm_jax.core.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed heartbeats: the holder is gone (a host that was replaced)
GUARD_WAIT_SECONDS = 30.0  # another run's read-decide-write of the lock takes milliseconds

# The fields of a lock record and their types; a record that lacks one is unreadable.
_FIELDS = {"host": str, "pid": int, "pid_start_time": str, "started": (int, float),
           "heartbeat": (int, float), "command": str, "token": str}


class WorkdirLockedError(UserError, RuntimeError):
    """Another live run holds the workdir, or the lock cannot be taken."""


class WorkdirLockLostError(UserError, RuntimeError):
    """Another run took this run's workdir lock (`--steal_lock`) or removed it."""


def _process_start_time(pid: int) -> str:
    """The kernel's start time of `pid` (Linux), so a reused pid is not mistaken for the
    holder; empty where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int, start_time: str = "") -> bool:
    """Whether process `pid` on this host still runs (and, given its start time, is the same
    process)."""
    if pid <= 0:
        return False
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


def _is_record(value: object) -> bool:
    """Whether `value` is a whole lock record (every field, each of its type)."""
    return isinstance(value, dict) and all(
        isinstance(value.get(name), kind) and not isinstance(value.get(name), bool)
        for name, kind in _FIELDS.items())


class WorkdirLock:
    """The lock of one workdir; `acquire()` then `release()`, or use as a context manager."""

    def __init__(self, workdir: epath.Path, steal: bool = False):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.steal = steal
        self.local = "://" not in str(self.path)
        self.record = {
            "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start_time": _process_start_time(os.getpid()), "started": time.time(),
            "heartbeat": time.time(), "command": " ".join(sys.argv), "token": uuid.uuid4().hex,
        }
        self.lost: str | None = None  # why the lock is no longer ours, once the heartbeat saw it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Holds an exclusive flock of the workdir for one read-decide-write of the lock, so
        two runs never decide on the same lock file at once (no-op on object stores, and
        where the file system has no flock)."""
        if not self.local:
            yield
            return
        import fcntl  # POSIX only: imported where the workdir is a local folder

        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            deadline = time.monotonic() + GUARD_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WorkdirLockedError(
                            f"another process kept {str(self.path.parent)!r} flock-ed for "
                            f"{GUARD_WAIT_SECONDS:.0f} s while taking its lock; retry") from None
                    time.sleep(0.001)
                except OSError:  # no flock on this file system
                    break
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read(self) -> dict | None:
        """The lock record; None when there is no lock file, {} when it is not a whole
        record (damaged by hand or by a disk error: it was never written half)."""
        if self.path.is_dir():
            raise WorkdirLockedError(
                f"{str(self.path)!r} is a folder, not a lock file; remove it (no run can hold "
                "the workdir through it) and rerun")
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}
        return record if _is_record(record) else {}

    def _publish(self, replace: bool) -> bool:
        """Puts this run's record in place, whole: written under a unique name, then renamed
        over the lock (`replace`) or linked to the lock name, which fails (False) if a lock
        file exists."""
        self.record["heartbeat"] = time.time()
        text = json.dumps(self.record)
        if not self.local:  # object stores: no exclusive create; the caller checked first
            self.path.write_text(text)
            return True
        staged = self.path.parent / f".{LOCK_NAME}.{self.record['token']}.{time.monotonic_ns()}"
        try:
            staged.write_text(text)
            if replace:
                os.replace(staged, self.path)
                return True
            try:
                os.link(staged, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the lock, or None if it may still run."""
        if not _is_record(holder):
            return "the lock file is damaged (not a whole lock record)"
        if holder["host"] == self.record["host"] and not alive(holder["pid"],
                                                               holder["pid_start_time"]):
            return f"its process {holder['pid']} is gone"
        age = time.time() - holder["heartbeat"]
        if age > STALE_SECONDS:
            return f"its heartbeat stopped {age:.0f} s ago"
        return None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard():
            for _ in range(3):  # without flock, a holder may release between our tries
                if self._read() is None and self._publish(replace=False):
                    break
                holder = self._read()
                if holder is None:
                    continue
                reason = "--steal_lock was given" if self.steal else self.stale_reason(holder)
                if reason is None:
                    raise WorkdirLockedError(
                        f"workdir {str(self.path.parent)!r} is in use by {describe(holder)}. "
                        "Stop that run, or use another --workdir; if that run is gone (its "
                        "host was replaced), pass --steal_lock")
                logging.warning("taking over the workdir lock of %s: %s",
                                describe(holder) if holder else str(self.path), reason)
                self._publish(replace=True)
                break
            else:
                raise WorkdirLockedError(f"could not take the lock {str(self.path)!r}; retry")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._thread.start()

    def _whose(self) -> str | None:
        """None while the lock file is ours, else who holds it now (or that it is gone)."""
        holder = self._read()
        if holder is None:
            return "someone removed it"
        if holder.get("token") == self.record["token"]:
            return None
        return f"{describe(holder)} took it" if holder else "it was overwritten"

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                with self._guard():
                    self.lost = self._whose()
                    if self.lost is None:
                        self._publish(replace=True)
                if self.lost is not None:
                    logging.error("the workdir lock %s is no longer this run's: %s", self.path,
                                  self.lost)
                    return
            except (OSError, WorkdirLockedError) as error:  # a full disk: the saves will say so
                logging.warning("could not renew the workdir lock: %s", error)

    def check(self, step: int | None = None) -> None:
        """Raises WorkdirLockLostError when the lock is no longer this run's (`step`: where
        the run stands, for the message)."""
        if self.lost is None:
            try:
                self.lost = self._whose()
            except WorkdirLockedError as error:
                self.lost = str(error)
        if self.lost is not None:
            raise WorkdirLockLostError(
                f"the workdir lock {str(self.path)!r} is no longer this run's ({self.lost}); "
                f"this run stopped{f' at step {step}' if step is not None else ''} without "
                "writing another checkpoint, so two runs never write into one workdir")

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with self._guard():
                if self._whose() is None:
                    self.path.unlink()
        except (OSError, WorkdirLockedError) as error:
            logging.warning("could not remove the workdir lock %s: %s", self.path, error)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Holding:
    """What `hold` gives the run: `check()` raises WorkdirLockLostError on every process
    when process 0's lock was taken, so all of them stop together before a save."""

    def __init__(self, lock: WorkdirLock | None):
        self.lock = lock

    def check(self, step: int | None = None) -> None:
        import jax  # as in `hold`: only a multi-process run's broadcast needs it
        import numpy as np
        from jax.experimental import multihost_utils

        error = None
        if self.lock is not None:
            try:
                self.lock.check(step)
            except WorkdirLockLostError as caught:
                error = caught
        if jax.process_count() > 1:
            lost = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if lost and error is None:
                error = WorkdirLockLostError("process 0 lost the workdir lock to another run (its "
                                             "log says which); this run stopped before saving")
        if error is not None:
            raise error


@contextlib.contextmanager
def hold(workdir: epath.Path, steal: bool = False) -> Iterator[Holding]:
    """Holds the workdir's lock for the body: process 0 takes it and every process learns
    whether it did, so all of them stop together when another run holds it."""
    # The lock needs no JAX; only a multi-process run's broadcast does (and the lock's tests
    # start many processes, each of which would pay for importing it).
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
        yield Holding(lock)
    finally:
        if lock is not None:
            lock.release()
