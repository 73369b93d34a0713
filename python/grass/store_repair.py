"""Finding and dropping damaged rows of an on-disk GradientStore, so that they are recomputed.

A store knows which rows every writer recorded and holds a crc32 per writer and block of rows
(grass.store_progress). Damage comes in two kinds:

- a block whose rows fail their checksum: the rows that writer recorded in that block;
- a writer whose progress record or checksum table cannot be read (truncated, not JSON,
  missing): every row it recorded, which is then unknown.

``find_damage`` reads every recorded row once and lists both; ``drop_damage`` removes the
damaged rows from their writers' records (and their checksum entries), so that ``missing()``
reports them and a resumed computation writes them again. The rows being deterministic, the
store then ends bit-identical to one that was never damaged.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os

import numpy as np

from .store_progress import (ENTRY_BYTES, FORMAT, ChecksumTable, Intervals, StoreError, crc_of,
                             read_json, read_record, slot_of, write_atomic)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Damage:
    """Rows [start, stop) recorded by ``writer`` that cannot be trusted, and why. start and
    stop are None when the writer's record is unreadable (its rows are unknown)."""

    writer: str
    start: int | None
    stop: int | None
    reason: str

    def __str__(self) -> str:
        rows = "all its rows" if self.start is None else f"rows [{self.start}, {self.stop})"
        return f"{rows} of writer {self.writer!r} ({self.reason})"


def _layout(path: str) -> tuple[int, int, int]:
    """(n_rows, bytes per row, block_rows) from the store's manifest."""
    m = read_json(os.path.join(path, "manifest.json"))
    try:
        return m["n_rows"], m["width"] * _ITEMSIZE[m["dtype"]], m["block_rows"]
    except (KeyError, TypeError) as e:
        raise StoreError(f"{path}/manifest.json is corrupted (bad or missing field {e})") from None


def _writers(path: str) -> list[str]:
    return sorted(name[:-len(".json")] for name in os.listdir(os.path.join(path, "progress"))
                  if name.endswith(".json"))


def find_damage(path: str | os.PathLike) -> list[Damage]:
    """Every damaged range of the store at ``path``, by writer and row: reads all recorded rows
    (one pass over rows.bin) and every record and checksum table."""
    path = os.fspath(path)
    n_rows, row_nbytes, block_rows = _layout(path)
    n_blocks = -(-n_rows // block_rows)
    found: list[Damage] = []
    with open(os.path.join(path, "rows.bin"), "rb") as f, \
            mmap.mmap(f.fileno(), n_rows * row_nbytes, access=mmap.ACCESS_READ) as rows:
        def row_bytes(start: int, stop: int) -> memoryview:
            return memoryview(rows)[start * row_nbytes:stop * row_nbytes]

        for writer in _writers(path):
            try:
                record = read_record(os.path.join(path, "progress", f"{writer}.json"), n_rows)
                table = ChecksumTable(os.path.join(path, "checksums", f"{writer}.crc"), n_blocks,
                                      writable=False)
            except StoreError as e:
                found.append(Damage(writer, None, None, str(e)))
                continue
            try:
                found += _bad_blocks(writer, record, table, block_rows, n_rows, row_bytes)
            except StoreError as e:  # a truncated table
                found.append(Damage(writer, None, None, str(e)))
            finally:
                os.close(table.fd)
    return found


def _bad_blocks(writer: str, record: Intervals, table: ChecksumTable, block_rows: int,
                n_rows: int, row_bytes) -> list[Damage]:
    """The blocks of one readable writer whose recorded rows fail their checksum."""
    found = []
    blocks = sorted({b for a, z in record.pairs() for b in range(a // block_rows,
                                                                  (z - 1) // block_rows + 1)})
    for block in blocks:
        lo, hi = block * block_rows, min((block + 1) * block_rows, n_rows)
        spans = record.clipped(lo, hi)
        entry = table.entries(block, block + 1)[0]
        slot = slot_of(entry, sum(b - a for a, b in spans))
        if slot is None:
            reason = "its checksum table does not match its record"
        elif crc_of(row_bytes, spans) != int(entry[slot, 1]):
            reason = "checksum mismatch"
        else:
            continue
        found.append(Damage(writer, spans[0][0], spans[-1][1], reason))
    return found


def drop_damage(path: str | os.PathLike, damage: list[Damage]) -> None:
    """Make the rows of ``damage`` missing: a writer with an unreadable record loses its record
    and checksum table; otherwise the damaged blocks leave its record and their checksum
    entries are cleared. Run it while no process writes to the store."""
    path = os.fspath(path)
    n_rows, _, block_rows = _layout(path)
    by_writer: dict[str, list[Damage]] = {}
    for d in damage:
        by_writer.setdefault(d.writer, []).append(d)
    for writer, items in by_writer.items():
        record_path = os.path.join(path, "progress", f"{writer}.json")
        table_path = os.path.join(path, "checksums", f"{writer}.crc")
        if any(d.start is None for d in items):
            for file in (record_path, table_path):
                if os.path.exists(file):
                    os.remove(file)
            continue
        record = read_record(record_path, n_rows)
        bad = Intervals((d.start, d.stop) for d in items)
        kept = Intervals(p for a, b in record.pairs() for p in bad.gaps(b, start=a))
        fd = os.open(table_path, os.O_RDWR)
        try:
            for start, stop in bad.pairs():
                for block in range(start // block_rows, (stop - 1) // block_rows + 1):
                    os.pwrite(fd, bytes(ENTRY_BYTES), block * ENTRY_BYTES)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        write_atomic(record_path, json.dumps({"version": FORMAT, "ranges": kept.pairs()}).encode())
        # The claim bytes are only a hint for writers: clear them so that none takes the
        # dropped rows for someone else's.
        fd = os.open(os.path.join(path, "claimed.bin"), os.O_RDWR)
        try:
            for start, stop in bad.pairs():
                os.pwrite(fd, bytes(stop - start), start)
        finally:
            os.close(fd)
