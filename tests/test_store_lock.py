"""One writing run per store: grass.store_lock's lease, with real processes.

A live holder (another process that took the lease and waits) makes a 2-rank distributed cache
fail on both ranks with a StoreError naming it; once the holder is killed with SIGKILL, leaving
its lease file, the same run takes the lease over and finishes, and removes the lease. Leases
from a dead pid, a reused pid (another start time) and a torn file are recovered; one from
another host is refused.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket

import pytest

import grass
from grass.store import StoreError
from grass.store_lock import LOCK_FILE, StoreLease, holder_identity
from bench.ranks import free_port, gloo_group, launch
from test_distributed import N_TRAIN, _attributor, _data


def _hold(path: str, ready) -> None:
    """Take the lease of ``path`` and wait to be killed."""
    StoreLease(path).acquire()
    ready.set()
    signal.pause()


def _rank(rank: int, world: int, port: int, store: str, out: str) -> None:
    with gloo_group(rank, world, port):
        try:
            _attributor(store).cache(_data(N_TRAIN, 1))
            result = "cached"
        except StoreError as e:
            result = str(e)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(result)


def _run_two_ranks(store, out) -> list[str]:
    os.makedirs(out, exist_ok=True)
    launch(_rank, 2, (2, free_port(), str(store), str(out)))
    return [open(os.path.join(out, f"rank{r}.txt")).read() for r in range(2)]


def test_live_holder_refuses_a_run_and_a_killed_one_is_recovered(tmp_path):
    store = tmp_path / "store"
    # The holder's run created the store (no rows yet) and took its lease.
    first = _attributor(store)
    grass.GradientStore.open(store, config=first.config, n_rows=N_TRAIN,
                             layers=first.layers.layout)
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    holder = spawn.Process(target=_hold, args=(str(store), ready))
    holder.start()
    try:
        assert ready.wait(60)
        results = _run_two_ranks(store, tmp_path / "refused")
        for result in results:
            assert "being written by another run" in result and f"pid {holder.pid}" in result
    finally:
        holder.kill()  # SIGKILL: the lease file stays behind
        holder.join()
    assert json.load(open(store / LOCK_FILE))["pid"] == holder.pid
    assert _run_two_ranks(store, tmp_path / "recovered") == ["cached", "cached"]
    assert not (store / LOCK_FILE).exists()  # released at the end of cache
    assert grass.GradientStore.load(store).complete


def _write_lease(directory, record) -> None:
    with open(os.path.join(directory, LOCK_FILE), "w") as f:
        f.write(record if isinstance(record, str) else json.dumps(record))


def test_stale_leases_are_taken_over(tmp_path):
    dead = _spawn_and_reap()
    me = holder_identity()
    for record in ({**me, "pid": dead},  # its process is gone
                   {**me, "start_time": "1"},  # a live pid, but another process's start time
                   {**me, "boot_id": "another boot"}):
        _write_lease(tmp_path, record)
        os.utime(tmp_path / LOCK_FILE, (0, 0))
        with StoreLease(tmp_path):
            assert json.load(open(tmp_path / LOCK_FILE)) == me
        assert not (tmp_path / LOCK_FILE).exists()


def test_torn_lease_is_refused_while_fresh_and_taken_when_old(tmp_path):
    _write_lease(tmp_path, '{"pid": 12')
    with pytest.raises(StoreError, match="being taken by another run"):
        StoreLease(tmp_path).acquire()
    os.utime(tmp_path / LOCK_FILE, (0, 0))
    with StoreLease(tmp_path):
        pass


def test_live_and_remote_holders_are_refused(tmp_path):
    _write_lease(tmp_path, holder_identity())  # this very process, still running
    with pytest.raises(StoreError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        StoreLease(tmp_path).acquire()
    _write_lease(tmp_path, {**holder_identity(), "hostname": "elsewhere"})
    with pytest.raises(StoreError, match="on elsewhere.*delete .*writer.lock"):
        StoreLease(tmp_path).acquire()


def _spawn_and_reap() -> int:
    """The pid of a process that has exited and been reaped."""
    process = multiprocessing.get_context("spawn").Process(target=int)
    process.start()
    process.join()
    return process.pid
