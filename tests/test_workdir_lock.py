"""The workdir lock under contention: many processes released at once on a fresh, a stale
and a damaged lock, never two holders; a run whose lock was taken stops before its next save.

The race test spawns its workers once and runs hundreds of trials through them (the lock code
alone, no JAX), so it takes seconds."""

import json
import multiprocessing
import os
import socket
import time

import pytest
from etils import epath

from ddpm_jax import workdir_lock

CONTENDERS = 6
TRIALS_PER_KIND = 100


def _contender(workdirs, start, done, results):
    """A worker: for each workdir, waits for the start, tries to take its lock, reports, and
    holds what it took until every contender reported (so the holder is alive meanwhile)."""
    for workdir in workdirs:
        start.wait()
        lock = workdir_lock.WorkdirLock(epath.Path(workdir))
        try:
            lock.acquire()
            results.put((workdir, os.getpid(), lock.record["token"]))
        except workdir_lock.WorkdirLockedError:
            lock = None
            results.put((workdir, os.getpid(), None))
        done.wait()
        if lock is not None:
            lock.release()


def _dead_holder_record():
    """A lock record of a process of this host that has exited."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    now = time.time()
    return {"host": socket.gethostname(), "pid": process.pid, "pid_start_time": "1",
            "started": now, "heartbeat": now, "command": "a run that died", "token": "dead"}


def test_of_many_runs_started_at_once_exactly_one_holds_the_lock(tmp_path):
    dead = _dead_holder_record()
    silent = dict(dead, host="another-host", heartbeat=time.time() - 2 * workdir_lock.STALE_SECONDS)
    lock_files = {"fresh": None, "dead pid": json.dumps(dead), "stale heartbeat": json.dumps(silent),
                  "damaged": '{"pid": 1', "empty": ""}
    workdirs = []
    for kind, text in lock_files.items():
        for trial in range(TRIALS_PER_KIND if kind != "empty" else TRIALS_PER_KIND // 2):
            workdir = tmp_path / f"{kind.replace(' ', '_')}_{trial}"
            workdir.mkdir()
            if text is not None:
                (workdir / workdir_lock.LOCK_NAME).write_text(text)
            workdirs.append(str(workdir))
    context = multiprocessing.get_context("spawn")
    start, done = context.Barrier(CONTENDERS + 1), context.Barrier(CONTENDERS + 1)
    results = context.Queue()
    workers = [context.Process(target=_contender, args=(workdirs, start, done, results))
               for _ in range(CONTENDERS)]
    for worker in workers:
        worker.start()
    try:
        double, none = [], []
        for workdir in workdirs:
            start.wait(timeout=120)
            reports = [results.get(timeout=120) for _ in range(CONTENDERS)]
            holders = [token for where, _, token in reports if where == workdir and token]
            lock_file = json.loads((epath.Path(workdir) / workdir_lock.LOCK_NAME).read_text())
            if len(holders) > 1:
                double.append(workdir)
            elif not holders:
                none.append(workdir)
            else:
                assert lock_file["token"] == holders[0]
            done.wait(timeout=120)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    assert not double, f"two holders in {len(double)} of {len(workdirs)} trials: {double[:3]}"
    assert not none, f"no holder in {len(none)} trials: {none[:3]}"
    # each holder released its lock and no staging file was left
    assert not any(os.listdir(workdir) for workdir in workdirs)


def test_a_run_whose_lock_was_stolen_fails_its_next_check(tmp_path):
    first = workdir_lock.WorkdirLock(epath.Path(tmp_path))
    first.acquire()
    first.check()  # still ours
    thief = workdir_lock.WorkdirLock(epath.Path(tmp_path), steal=True)
    thief.acquire()
    with pytest.raises(workdir_lock.WorkdirLockLostError,
                       match=f"pid {os.getpid()} .* took it.*stopped at step 7 without writing"):
        first.check(step=7)
    first.release()  # leaves the thief's lock in place
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == thief.record["token"]
    thief.release()
    assert not (tmp_path / "run.lock").exists()


def test_the_heartbeat_sees_a_stolen_lock_and_never_rewrites_it(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_SECONDS", 0.01)
    first = workdir_lock.WorkdirLock(epath.Path(tmp_path))
    first.acquire()
    thief = workdir_lock.WorkdirLock(epath.Path(tmp_path), steal=True)
    thief.acquire()
    first._thread.join(timeout=10)
    assert first.lost and "took it" in first.lost
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == thief.record["token"]
    # removed by hand: the thief learns it too (under the guard, so that the removal does not
    # land between a heartbeat's check and its rewrite, which would put the file back)
    with thief._guard():
        (tmp_path / "run.lock").unlink()
    thief._thread.join(timeout=10)
    assert thief.lost == "someone removed it"
    first.release()
    thief.release()


@pytest.mark.parametrize("content", [
    '{"pid": "abc", "host": 3}', "[1, 2]", "null", '{"pid": 1}', "\x00\x01",
])
def test_a_damaged_lock_file_is_taken_over_with_a_warning(tmp_path, content):
    (tmp_path / "run.lock").write_text(content)
    with workdir_lock.WorkdirLock(epath.Path(tmp_path)) as lock:
        assert json.loads((tmp_path / "run.lock").read_text())["token"] == lock.record["token"]


def test_a_lock_path_that_is_a_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "run.lock").mkdir()
    with pytest.raises(workdir_lock.WorkdirLockedError, match="is a folder, not a lock file"):
        workdir_lock.WorkdirLock(epath.Path(tmp_path)).acquire()


def test_a_lock_that_cannot_be_written_leaves_no_empty_lock_file(tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(epath.Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        workdir_lock.WorkdirLock(epath.Path(tmp_path)).acquire()
    assert os.listdir(tmp_path) == []
