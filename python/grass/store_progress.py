"""The progress of the writers of an on-disk GradientStore: which rows each has finished, and
the checksums that let a reader trust them.

For every writer the store holds

    progress/<writer>.json   {"version": 2, "ranges": [[start, stop], ...]}: the writer's
                    recorded rows as sorted, disjoint ranges, touching ranges merged, so its size
                    is O(number of gaps), not O(number of writes). Replaced atomically.
    checksums/<writer>.crc   the checksum table, 16 bytes per block of ``block_rows`` rows
                    (block b holds rows [b * block_rows, (b + 1) * block_rows)): two slots
                    (count, crc32) of little-endian uint32, where crc32 runs over the bytes of
                    this writer's recorded rows of the block in row order and count is how many
                    rows those are. Written in place; a sparse file, so untouched blocks cost no disk.

and the store keeps one shared ``claimed.bin``: one byte per row, set to 1 once some writer has
recorded the row. It is a hint for writers (a write checks its rows there at O(rows written)
instead of re-reading every writer's record); the records stay the truth.

Why this layout. A write costs the same whatever came before: it appends to a running crc32
(``zlib.crc32(new, crc)`` continues a crc over appended bytes) or, when rows land before rows
already recorded in their block, recomputes the crc of that one block; it writes the table
entries of the blocks it touches and a record of O(gaps) bytes. The block, not the write,
is the unit a checksum covers: a corrupted byte anywhere in a block is caught (crc32 detects
every error burst of up to 32 bits, so every flipped byte; larger damage escapes with
probability 2^-32 per block), and a read checks only the blocks it touches.

Why two slots. Rows are flushed, then the table, then the record, so a process killed between
the table and the record leaves a table one step ahead of its record. The slot whose count
equals the record's count of rows in the block describes the record; a write keeps that slot
and overwrites the other one, so a table is never behind its record and a killed write never
leaves a block without a checksum that matches what the record says.
"""

from __future__ import annotations

import bisect
import json
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["ChecksumTable", "Intervals", "StoreError", "WriterProgress", "read_json",
           "read_records", "verify_block", "write_atomic", "ChecksumError"]

FORMAT = 2
# One block entry: slots[2] x (count, crc32), little-endian uint32.
_ENTRY = np.dtype("<u4")
ENTRY_BYTES = 16

# rows [start, stop) of the store -> their bytes as stored (a memoryview of the mapped file).
RowBytes = Callable[[int, int], memoryview]


class StoreError(ValueError):
    """A store on disk is truncated, corrupted, or does not match the requested configuration."""


class ChecksumError(StoreError):
    """Rows of a store on disk fail their checksum."""


def _fsync_dir(path: str) -> None:
    dirfd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(dirfd)  # makes a creation or rename in the directory durable
    finally:
        os.close(dirfd)


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` by `data` so that readers see the old or the new file, never a mix."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is corrupted (not valid JSON: {e})") from None


def create_sparse(path: str, size: int) -> None:
    """A new file of `size` zero bytes that takes no disk until written, durably created."""
    with open(path, "xb") as f:
        f.truncate(size)
        os.fsync(f.fileno())
    _fsync_dir(os.path.dirname(path))


class Intervals:
    """Sorted, disjoint half-open row ranges [start, stop); touching ranges are merged.

    Two parallel sorted lists searched with bisect: a lookup is O(log n) and an insertion
    moves O(n) list slots, n being the number of ranges (the gaps), not of rows or writes.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self.starts: list[int] = []
        self.stops: list[int] = []
        for start, stop in sorted(ranges):
            if self.stops and start <= self.stops[-1]:  # overlapping or touching: merge
                self.stops[-1] = max(self.stops[-1], stop)
            else:
                self.starts.append(start)
                self.stops.append(stop)

    def __len__(self) -> int:
        return len(self.starts)

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.stops))

    def clipped(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The parts of the ranges inside [start, stop), in order."""
        out = []
        i = bisect.bisect_right(self.stops, start)  # first range ending after `start`
        while i < len(self.starts) and self.starts[i] < stop:
            out.append((max(self.starts[i], start), min(self.stops[i], stop)))
            i += 1
        return out

    def add(self, start: int, stop: int) -> None:
        """Insert [start, stop), which must not overlap a range already in the set."""
        i = bisect.bisect_left(self.starts, start)
        joins_left = i > 0 and self.stops[i - 1] == start
        joins_right = i < len(self.starts) and self.starts[i] == stop
        if joins_left and joins_right:
            self.stops[i - 1] = self.stops[i]
            del self.starts[i], self.stops[i]
        elif joins_left:
            self.stops[i - 1] = stop
        elif joins_right:
            self.starts[i] = start
        else:
            self.starts.insert(i, start)
            self.stops.insert(i, stop)

    def gaps(self, n: int, start: int = 0) -> list[tuple[int, int]]:
        """The complement in [start, n), in order."""
        out, pos = [], start
        for lo, hi in self.clipped(start, n):
            if lo > pos:
                out.append((pos, lo))
            pos = hi
        if pos < n:
            out.append((pos, n))
        return out


def read_record(path: str, n_rows: int) -> Intervals:
    """A writer's record (see the module docstring), checked: sorted, disjoint, in [0, n_rows)."""
    record = read_json(path)
    ranges = record.get("ranges") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("version") != FORMAT:
        raise StoreError(f"{path} is not a version-{FORMAT} progress record "
                         f"(found {str(record)[:80]!r}): the store is corrupted or was written "
                         "by another version; delete it and recompute")
    previous = 0
    ok = isinstance(ranges, list)
    for r in ranges if ok else ():
        ok = (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
              and previous <= r[0] < r[1] <= n_rows)
        if not ok:
            break
        previous = r[1] + 1  # touching ranges are always merged: a gap separates two ranges
    if not ok:
        raise StoreError(f"{path} is corrupted: its ranges must be sorted, disjoint "
                         f"[start, stop] pairs within [0, {n_rows}]")
    return Intervals(tuple(r) for r in ranges)


def read_records(directory: str, n_rows: int) -> dict[str, Intervals]:
    """writer -> its recorded rows, read fresh from every record in `directory`."""
    return {name[: -len(".json")]: read_record(os.path.join(directory, name), n_rows)
            for name in sorted(os.listdir(directory)) if name.endswith(".json")}


class ChecksumTable:
    """A writer's ``checksums/<writer>.crc``: per block two (count, crc32) slots; see the module docstring."""

    def __init__(self, path: str, n_blocks: int, *, writable: bool) -> None:
        self.path = path
        self.n_blocks = n_blocks
        try:
            self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing: the checksums of a recorded writer are "
                             "gone; delete the store and recompute") from None

    def entries(self, first: int, stop: int) -> np.ndarray:
        """Blocks [first, stop) as a (stop - first, 2, 2) uint32 array: [block, slot, (count, crc)]."""
        size = (stop - first) * ENTRY_BYTES
        data = os.pread(self.fd, size, first * ENTRY_BYTES)
        if len(data) != size:
            raise StoreError(f"{self.path} is truncated: it ends before block {stop - 1}")
        return np.frombuffer(data, dtype=_ENTRY).reshape(stop - first, 2, 2).copy()

    def put(self, first: int, entries: np.ndarray) -> None:
        """Write the entries of blocks [first, first + len(entries)) and sync them to disk."""
        os.pwrite(self.fd, entries.astype(_ENTRY).tobytes(), first * ENTRY_BYTES)
        os.fdatasync(self.fd)


def slot_of(entry: np.ndarray, count: int) -> int | None:
    """The slot (0 or 1) of one block entry (2, 2) that describes `count` recorded rows."""
    for slot in (0, 1):
        if int(entry[slot, 0]) == count:
            return slot
    return None


def crc_of(row_bytes: RowBytes, spans: Iterable[tuple[int, int]], crc: int = 0) -> int:
    """crc32 over the rows of `spans` concatenated in order, continuing `crc`."""
    for start, stop in spans:
        crc = zlib.crc32(row_bytes(start, stop), crc)
    return crc


def _count(spans: list[tuple[int, int]]) -> int:
    return sum(stop - start for start, stop in spans)


def verify_block(writer: str, block: int, spans: list[tuple[int, int]], entry: np.ndarray,
                 row_bytes: RowBytes, where: str) -> bool:
    """Check the rows `spans` that `writer` recorded in `block` against their table entry.

    Returns False when no slot matches the recorded count (the record read is older or newer
    than the table: the caller re-reads the record), raises StoreError when the bytes fail.
    """
    slot = slot_of(entry, _count(spans))
    if slot is None:
        return False
    if crc_of(row_bytes, spans) != int(entry[slot, 1]):
        raise ChecksumError(f"rows [{spans[0][0]}, {spans[-1][1]}) of {where}/rows.bin (written "
                            f"by {writer!r}) fail their checksum: the file is corrupted")
    return True


class WriterProgress:
    """This process's writer: its recorded rows, its record file and its checksum table."""

    def __init__(self, store_path: str, writer: str, n_rows: int, block_rows: int,
                 recorded: Intervals) -> None:
        self.store_path = store_path
        self.directory = os.path.join(store_path, "progress")
        self.writer = writer
        self.n_rows = n_rows
        self.block_rows = block_rows
        self.n_blocks = -(-n_rows // block_rows)
        self.recorded = recorded
        self._table: ChecksumTable | None = None  # opened (created) at the first write

    def table(self) -> ChecksumTable:
        if self._table is None:
            path = os.path.join(self.store_path, "checksums", f"{self.writer}.crc")
            if not os.path.exists(path):
                create_sparse(path, self.n_blocks * ENTRY_BYTES)
            self._table = ChecksumTable(path, self.n_blocks, writable=True)
        return self._table

    def record(self, start: int, stop: int, row_bytes: RowBytes,
               verified: set[tuple[str, int, int]]) -> None:
        """Record rows [start, stop), already flushed to disk: checksums first, then the record.

        verified: (writer, block, count) triples whose rows this process has checked; a block
        whose new checksum was computed from checked or new rows only joins it.
        """
        first, last = start // self.block_rows, (stop - 1) // self.block_rows
        table = self.table()
        entries = table.entries(first, last + 1)
        checked = []
        for i, block in enumerate(range(first, last + 1)):
            lo = block * self.block_rows
            hi = min(lo + self.block_rows, self.n_rows)
            old = self.recorded.clipped(lo, hi)
            keep = slot_of(entries[i], _count(old))
            if keep is None:
                raise StoreError(f"{table.path} does not match {self.writer}.json at block "
                                 f"{block}: the progress of {self.writer!r} is corrupted")
            new = (max(start, lo), min(stop, hi))
            if not old or old[-1][1] <= new[0]:  # appended after the block's recorded rows
                crc = crc_of(row_bytes, [new], int(entries[i, keep, 1]))
                was_checked = not old or (self.writer, block, _count(old)) in verified
            else:  # lands before recorded rows: check them, then recompute the block's crc
                verify_block(self.writer, block, old, entries[i], row_bytes, self.store_path)
                crc = crc_of(row_bytes, sorted(old + [new]))
                was_checked = True
            count = _count(old) + new[1] - new[0]
            entries[i, 1 - keep] = (count, crc)
            if was_checked:
                checked.append((self.writer, block, count))
        table.put(first, entries)
        self.recorded.add(start, stop)
        write_atomic(os.path.join(self.directory, f"{self.writer}.json"),
                     json.dumps({"version": FORMAT, "ranges": self.recorded.pairs()}).encode())
        verified.update(checked)


class Claims:
    """``claimed.bin``: one byte per row, 1 once a writer has recorded the row.

    A hint that costs O(rows) per write, shared by all writers; never synced, since the records
    stay the truth (a write that finds a claimed row re-reads the records to name the writer).
    """

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing: the store is incomplete or corrupted; "
                             "delete it and recompute") from None

    def any(self, start: int, stop: int) -> bool:
        data = os.pread(self.fd, stop - start, start)
        return data.count(0) != len(data)

    def mark(self, start: int, stop: int) -> None:
        os.pwrite(self.fd, b"\x01" * (stop - start), start)
