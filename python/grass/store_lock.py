"""A lease on an on-disk store for the one run that writes it: ``<store>/writer.lock``.

A run that caches into a store holds the lease (one process: the run's rank 0) from before its
first row until its curvature is saved; a second run on the same store is refused while the
holder lives. The lease records who holds it: pid, hostname, the boot id and the process start
time (from /proc, so that a pid reused by an unrelated process is not mistaken for the holder).
A holder that was killed (SIGKILL, a preempted node, a torchrun restart) leaves its file; the
next run on the same host finds that pid gone or started at another time and takes the lease
over. A lease held from another host cannot be checked from here and is refused, with the path
to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time

from .store_progress import StoreError

LOCK_FILE = "writer.lock"
# An unreadable lease younger than this may be one being written: refused, not taken over.
TORN_GRACE_S = 10.0


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # not Linux: pid liveness alone decides
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc has none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may hold spaces, so count after its ")".
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_identity(pid: int | None = None) -> dict:
    """The record a lease holds for process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "hostname": socket.gethostname(), "boot_id": _boot_id(),
            "start_time": _start_time(pid)}


def _is_stale(holder: dict) -> bool:
    """Whether the recorded holder is known to be gone (only decidable on its own host)."""
    if holder.get("hostname") != socket.gethostname():
        return False
    if holder.get("boot_id") and holder["boot_id"] != _boot_id():
        return True  # the machine rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    return bool(holder.get("start_time")) and holder["start_time"] != _start_time(pid)


class StoreLease:
    """Context manager: hold ``<directory>/writer.lock`` or raise StoreError naming the holder."""

    def __init__(self, directory: str | os.PathLike):
        self.path = os.path.join(os.fspath(directory), LOCK_FILE)
        self._mine: dict | None = None

    def acquire(self) -> None:
        me = holder_identity()
        for _ in range(2):  # a second try after removing a stale lease
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder == {}:
                    continue  # released meanwhile
                if holder is None and time.time() - _mtime(self.path) < TORN_GRACE_S:
                    raise StoreError(f"the store at {os.path.dirname(self.path)} is being taken "
                                     "by another run right now: try again later") from None
                if holder is not None and not _is_stale(holder):
                    raise StoreError(
                        f"the store at {os.path.dirname(self.path)} is being written by another "
                        f"run (pid {holder.get('pid')} on {holder.get('hostname')}): wait for it "
                        f"to finish; if that run is gone, delete {self.path}") from None
                try:
                    os.unlink(self.path)  # stale (or unreadable): its holder is gone
                except FileNotFoundError:
                    pass  # another run removed it first; the O_EXCL create decides
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._mine = me
            return
        raise StoreError(f"could not take the lease {self.path}: another run takes it at the "
                         "same time")

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                found = json.load(f)
            return found if isinstance(found, dict) else None
        except FileNotFoundError:
            return {}  # released meanwhile
        except (OSError, ValueError):
            return None  # being written, or torn by a holder killed while writing it

    def release(self) -> None:
        """Remove the lease if it is still ours."""
        if self._mine is not None and self._read() == self._mine:
            os.unlink(self.path)
        self._mine = None

    def __enter__(self) -> "StoreLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
