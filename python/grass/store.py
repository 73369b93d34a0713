"""GradientStore: fixed-width rows of compressed per-example gradients, in memory or on disk.

One row per training example, n_rows × width with width = Σ_l k_l; layer l owns the columns
``layout[l]`` (``grass.layers.Layout``: the layers in column order). On disk a store is a
directory:

    manifest.json        config (compressor, seeds, ...), layers, n_rows, width, dtype,
                         block_rows (rows per checksum block), version
    rows.bin             the raw row-major matrix (fp32 / bf16 / fp16; bf16 through uint16),
                         read and written through a memory map
    progress/<writer>.json   each writer's finished rows as coalesced ranges
    checksums/<writer>.crc   each writer's crc32 per block of rows
    claimed.bin          a shared byte per row, set once the row is recorded (a hint for writers)
                         (grass.store_progress gives the formats and why they are shaped so)
    arrays/<name>.bin + arrays/<name>.json   extra tensors (selective masks, FIMs), no pickle

Why this layout: a killed run leaves at worst rows that are on disk but not recorded; a resumed
run recomputes exactly `missing()` and, the computation being deterministic, ends bit-identical
to an uninterrupted one. Progress lives in files per writer so that several processes can
fill disjoint row ranges of one store without a lock. A write costs the same however many rows
and writers came before it: it flushes only its own rows, extends a running checksum and
rewrites a record whose size grows with the number of gaps, not of writes. A file of the wrong
size or a block whose checksum does not match raises StoreError instead of yielding wrong scores.
An open store checks each block once, at its first read (every later query of a complete store
reads the rows without hashing them again): a block changed after that, say by another
process, is caught when the store is next opened, not by this store object.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .layers import Layout
from .store_progress import (FORMAT, ChecksumError, ChecksumTable, Claims, Intervals,
                             StoreError, WriterProgress, create_sparse, read_json, read_record,
                             read_records, verify_block, write_atomic)
from .store_repair import find_damage

__all__ = ["ChecksumError", "GradientStore", "StoreError", "write_atomic"]

VERSION = FORMAT
# Rows per checksum block of a new store: about this many bytes, at least one row.
BLOCK_BYTES = 1 << 18
_DTYPES: dict[torch.dtype, tuple[str, np.dtype]] = {
    # torch dtype -> (manifest name, numpy dtype of the raw file)
    torch.float32: ("float32", np.dtype(np.float32)),
    torch.float16: ("float16", np.dtype(np.float16)),
    torch.bfloat16: ("bfloat16", np.dtype(np.uint16)),  # numpy has no bf16: same bits as uint16
}
_BY_NAME = {name: dt for dt, (name, _) in _DTYPES.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _json_roundtrip(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it will read back from the manifest (tuples become lists, ...)."""
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except TypeError as e:
        raise TypeError(f"config must be JSON-serialisable (str/int/float/bool/list/dict): {e}") from None


def _check_layer_order(path: str, found: Any, wanted: list[list]) -> None:
    """Refuse a store that lists the wanted layers (name, k) in another column order, naming
    both orders: reading its rows with the wanted layout would hand one layer another's
    columns."""
    if not isinstance(found, list) or found == wanted:
        return
    if sorted(found, key=repr) == sorted(wanted, key=repr):
        raise StoreError(f"the store at {path} holds the requested layers in another column "
                         f"order ({[p[0] for p in found]}; requested "
                         f"{[p[0] for p in wanted]}): its rows cannot be read with the requested "
                         "columns; use a new path or delete it")


class GradientStore:
    """n_rows × Σk_l compressed gradients with per-layer column ranges; see the module docstring.

    Create or reopen with `GradientStore.open`. Rows are written as fp32 and stored in `dtype`;
    reads always return fp32.
    """

    def __init__(
        self,
        path: str | None,
        config: dict[str, Any],
        n_rows: int,
        layout: Layout,
        dtype: torch.dtype,
        writer: str,
        block_rows: int,
    ) -> None:
        self.path = path
        self.config = config
        self.n_rows = n_rows
        self.layout = layout
        self.dtype = dtype
        self.writer = writer
        self.block_rows = block_rows
        self.width = layout.width
        # This writer's recorded rows, and a snapshot of every other writer's (taken at open,
        # refreshed by missing() and read(), or when a write meets a row claimed since then).
        self._own = Intervals()
        self._others: dict[str, Intervals] = {}
        self._others_union = Intervals()
        self._verified: set[tuple[str, int, int]] = set()  # (writer, block, count) checked here
        self._tables: dict[str, ChecksumTable] = {}  # every writer's table, read-only, for reads
        self._arrays: dict[str, torch.Tensor] = {}  # in-memory stores only
        np_dtype = _DTYPES[dtype][1]
        self._row_nbytes = self.width * np_dtype.itemsize
        if path is None:
            self._raw = np.zeros((n_rows, self.width), dtype=np_dtype)
        else:
            with open(self._file("rows.bin"), "r+b") as f:
                # A shared map of our own, so that a write can msync just its rows' pages.
                self._map = mmap.mmap(f.fileno(), n_rows * self._row_nbytes)
            self._raw = np.frombuffer(self._map, dtype=np_dtype).reshape(n_rows, self.width)
            self._claims = Claims(self._file("claimed.bin"))
            own = self._file("progress", f"{writer}.json")
            self._own = read_record(own, n_rows) if os.path.exists(own) else Intervals()
            for a, b in self._own.pairs():  # a kill between a record and its claim left a gap
                self._claims.mark(a, b)
            self._refresh()
            self._progress = WriterProgress(path, writer, n_rows, block_rows, self._own)
        # A torch view sharing memory with the raw array (bf16 reinterprets the uint16 bits).
        self._rows = torch.from_numpy(self._raw)
        if dtype == torch.bfloat16:
            self._rows = self._rows.view(torch.bfloat16)

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None,
        *,
        config: dict[str, Any],
        n_rows: int,
        layers: Layout | Mapping[str, int],
        dtype: torch.dtype = torch.float32,
        writer: str = "main",
        block_rows: int | None = None,
    ) -> GradientStore:
        """Create a store, or reopen the one at `path` if its manifest matches.

        path: a directory (created if absent), or None for an in-memory store.
        config: JSON-serialisable description of what produced the rows (model, compressor,
            seeds); an existing store with a different config is refused with a StoreError
            (a ValueError) naming the differing keys.
        n_rows: number of examples; layers: the column Layout, or name -> k_l in column order.
            An existing store that lists the same layers in another order is refused.
        dtype: storage dtype, float32 / bfloat16 / float16.
        writer: names this process's progress files; processes filling disjoint rows of one
            store concurrently must use distinct writers.
        block_rows: rows per checksum block, the unit in which corruption is detected and
            reads are checked. None: the existing store's value, or rows of about 256 KiB for
            a new store.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows <= 0:
            raise ValueError(f"n_rows must be a positive int, got {n_rows!r}")
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(f"layers must be a non-empty dict name -> k, got {layers!r}")
        layout = layers if isinstance(layers, Layout) else Layout(layers.items())
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
        if not _NAME_RE.match(writer):
            raise ValueError(f"writer must match {_NAME_RE.pattern}, got {writer!r}")
        if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int)
                                       or block_rows <= 0):
            raise ValueError(f"block_rows must be None or a positive int, got {block_rows!r}")
        config = _json_roundtrip(config)
        width = layout.width
        default_block = max(1, BLOCK_BYTES // (width * _DTYPES[dtype][1].itemsize))
        if path is None:
            return cls(None, config, n_rows, layout, dtype, writer, block_rows or default_block)
        path = os.fspath(path)
        found = None
        if os.path.exists(os.path.join(path, "manifest.json")):
            found = read_json(os.path.join(path, "manifest.json"))
            cls._check_version(path, found)
        if block_rows is None:
            block_rows = found.get("block_rows") if found is not None else default_block
        manifest = {
            "version": VERSION,
            "config": config,
            "n_rows": n_rows,
            "layers": [[name, k] for name, k in layout.sizes.items()],
            "width": width,
            "dtype": _DTYPES[dtype][0],
            "block_rows": block_rows,
        }
        if found is not None:
            cls._check_matches(path, found, manifest)
        else:
            cls._create(path, manifest, _DTYPES[dtype][1].itemsize)
        return cls(path, config, n_rows, layout, dtype, writer, block_rows)

    @classmethod
    def load(cls, path: str | os.PathLike, *, writer: str = "main") -> GradientStore:
        """Reopen the store at `path` with the configuration its manifest records."""
        manifest_path = os.path.join(os.fspath(path), "manifest.json")
        if not os.path.exists(manifest_path):
            raise StoreError(f"{path} is not a gradient store: it has no manifest.json")
        m = read_json(manifest_path)
        cls._check_version(os.fspath(path), m)
        try:
            return cls.open(path, config=m["config"], n_rows=m["n_rows"],
                            layers=Layout(m["layers"]), dtype=_BY_NAME[m["dtype"]], writer=writer)
        except (KeyError, TypeError) as e:
            raise StoreError(f"{manifest_path} is corrupted (bad or missing field {e})") from None

    @staticmethod
    def _create(path: str, manifest: dict[str, Any], itemsize: int) -> None:
        if os.path.isdir(path) and os.listdir(path):
            raise StoreError(f"{path} exists, is not empty and holds no manifest.json: "
                             "refusing to turn it into a gradient store")
        for directory in ("progress", "checksums", "arrays"):
            os.makedirs(os.path.join(path, directory), exist_ok=True)
        for name, size in (("rows.bin", manifest["n_rows"] * manifest["width"] * itemsize),
                           ("claimed.bin", manifest["n_rows"])):
            create_sparse(os.path.join(path, name), size)
        # The manifest comes last: its presence means the store is complete and sized.
        write_atomic(os.path.join(path, "manifest.json"),
                     json.dumps(manifest, indent=1, sort_keys=True).encode())

    @staticmethod
    def _check_version(path: str, found: Any) -> None:
        version = found.get("version") if isinstance(found, dict) else None
        if version != VERSION:
            raise StoreError(f"{path}/manifest.json has store format version {version!r}; this "
                             f"grass reads version {VERSION} (coalesced progress records with "
                             "per-block checksums): delete the store and recompute its rows")

    @staticmethod
    def _check_matches(path: str, found: dict[str, Any], wanted: dict[str, Any]) -> None:
        _check_layer_order(path, found.get("layers"), wanted["layers"])
        a = _flatten({k: v for k, v in found.items() if k != "config"})
        b = _flatten({k: v for k, v in wanted.items() if k != "config"})
        a.update(_flatten(found.get("config", {}), "config."))
        b.update(_flatten(wanted["config"], "config."))
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
        if differ:
            details = "; ".join(f"{k}: store has {a.get(k, '<absent>')!r}, "
                                f"requested {b.get(k, '<absent>')!r}" for k in differ)
            raise StoreError(f"the store at {path} was made with a different configuration "
                             f"({details}); use a new path or delete it")
        block_rows = found.get("block_rows")
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows <= 0:
            raise StoreError(f"{path}/manifest.json is corrupted (block_rows {block_rows!r} "
                             "is not a positive int)")
        expected = wanted["n_rows"] * wanted["width"] * _DTYPES[_BY_NAME[wanted["dtype"]]][1].itemsize
        size = os.path.getsize(os.path.join(path, "rows.bin"))
        if size != expected:
            raise StoreError(f"{path}/rows.bin is {size} bytes but the manifest "
                             f"({wanted['n_rows']} rows × {wanted['width']} × {wanted['dtype']}) "
                             f"needs {expected}: the file is truncated or corrupted")

    def _file(self, *parts: str) -> str:
        assert self.path is not None
        return os.path.join(self.path, *parts)

    # ----------------------------------------------------------------------------- progress
    def _refresh(self) -> dict[str, Intervals]:
        """writer -> recorded rows for every writer, the others' read fresh from disk (and kept
        as the snapshot writes check against). Two writers that recorded one row raise."""
        records = read_records(self._file("progress"), self.n_rows) if self.path else {}
        records[self.writer] = self._own
        reach, reacher = 0, ""  # the furthest stop so far and the writer who recorded it
        for start, stop, writer in sorted((a, b, w) for w, r in records.items() for a, b in r.pairs()):
            if start < reach:
                raise StoreError(f"writers {reacher!r} and {writer!r} both recorded rows "
                                 f"[{start}, {min(stop, reach)}) of {self.path}: processes filling "
                                 "one store must write disjoint rows; delete the store and recompute")
            if stop > reach:
                reach, reacher = stop, writer
        self._others = {w: r for w, r in records.items() if w != self.writer}
        self._others_union = Intervals(p for w, r in self._others.items() for p in r.pairs())
        return records

    def missing(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) not yet written (by any writer), in order."""
        records = self._refresh()
        return Intervals(p for r in records.values() for p in r.pairs()).gaps(self.n_rows)

    @property
    def complete(self) -> bool:
        return not self.missing()

    def _row_bytes(self, start: int, stop: int) -> memoryview:
        return memoryview(self._raw[start:stop]).cast("B")

    # ----------------------------------------------------------------------------- writing
    def _check_free(self, start: int, stop: int) -> None:
        """Refuse [start, stop) if this writer, or another one as last seen, recorded any of it."""
        if self.path is not None and not self._others_union.clipped(start, stop) \
                and self._claims.any(start, stop):
            self._refresh()  # another writer recorded some of these rows since the snapshot
        for writer, ranges in [(self.writer, self._own), *self._others.items()]:
            hit = ranges.clipped(start, stop)
            if hit:
                raise ValueError(f"rows [{start}, {stop}) overlap rows [{hit[0][0]}, {hit[-1][1]}) "
                                 f"already written by writer {writer!r}")

    def _flush_rows(self, start: int, stop: int) -> None:
        """msync the pages that hold rows [start, stop), and no others."""
        offset = start * self._row_nbytes
        aligned = offset - offset % mmap.PAGESIZE
        self._map.flush(aligned, stop * self._row_nbytes - aligned)

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Store rows (m, width) at [start, start + m) and record them durably.

        rows: any float dtype, converted to the store dtype. A range that overlaps rows already
        recorded is refused (a resumed run writes only `missing()` ranges). Costs O(m · width)
        plus a record of O(number of gaps) bytes, whatever was written before.
        """
        if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
            raise TypeError(f"rows must be a floating-point tensor, got "
                            f"{rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__}")
        if rows.dim() != 2 or rows.shape[1] != self.width or rows.shape[0] == 0:
            raise ValueError(f"rows must have shape (m >= 1, width={self.width}), got {tuple(rows.shape)}")
        stop = start + rows.shape[0]
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or stop > self.n_rows:
            raise ValueError(f"rows [{start}, {stop}) must lie in [0, n_rows={self.n_rows})")
        if not torch.isfinite(rows).all():
            bad = int((~torch.isfinite(rows)).any(dim=1).nonzero()[0, 0]) + start
            raise ValueError(f"rows must be finite; row {bad} is not")
        self._check_free(start, stop)
        self._rows[start:stop] = rows.detach().to("cpu", self.dtype)
        if self.path is None:
            self._own.add(start, stop)
            return
        self._flush_rows(start, stop)  # the rows are on disk before their checksum and record
        self._progress.record(start, stop, self._row_bytes, self._verified)
        self._claims.mark(start, stop)

    # ----------------------------------------------------------------------------- reading
    def _columns(self, layer: str | None) -> slice:
        if layer is None:
            return slice(0, self.width)
        if layer not in self.layout:
            raise ValueError(f"layer must be one of {list(self.layout)}, got {layer!r}")
        return self.layout[layer].cols

    def _records_covering(self, start: int, stop: int) -> dict[str, Intervals]:
        """writer -> recorded rows, as last seen when that covers [start, stop) (recorded rows
        stay recorded while the store is open: no need to read every writer's record at every
        read of a complete store), else read fresh from disk."""
        if Intervals([*self._own.clipped(start, stop),
                      *self._others_union.clipped(start, stop)]).pairs() == [(start, stop)]:
            return {self.writer: self._own, **self._others}
        return self._refresh()

    def _verify(self, start: int, stop: int) -> None:
        """Check that [start, stop) is written and that every block it touches is intact."""
        records = self._records_covering(start, stop)
        covered = Intervals(p for r in records.values() for p in r.clipped(start, stop))
        if covered.pairs() != [(start, stop)]:
            raise ValueError(f"rows [{start}, {stop}) are not all written yet; "
                             f"missing: {self.missing()}")
        if self.path is None:
            return
        first, last = start // self.block_rows, (stop - 1) // self.block_rows
        for writer, ranges in records.items():
            if not ranges.clipped(first * self.block_rows, (last + 1) * self.block_rows):
                continue
            entries = self._table(writer).entries(first, last + 1)
            for i, block in enumerate(range(first, last + 1)):
                self._verify_block(writer, block, ranges, entries[i])

    def _table(self, writer: str) -> ChecksumTable:
        """``writer``'s checksum table, opened read-only once."""
        if writer not in self._tables:
            self._tables[writer] = ChecksumTable(self._file("checksums", f"{writer}.crc"),
                                                 -(-self.n_rows // self.block_rows),
                                                 writable=False)
        return self._tables[writer]

    def _verify_block(self, writer: str, block: int, ranges: Intervals,
                      entry: np.ndarray | None = None) -> None:
        """Check ``writer``'s rows of ``block`` against its checksum-table ``entry`` (read here
        when not given, and only if the block still needs checking); a block this object has
        verified with the same rows is not read again."""
        lo = block * self.block_rows
        hi = min(lo + self.block_rows, self.n_rows)
        spans = ranges.clipped(lo, hi)
        while spans and (writer, block, sum(b - a for a, b in spans)) not in self._verified:
            if entry is None:
                entry = self._table(writer).entries(block, block + 1)[0]
            try:
                intact = verify_block(writer, block, spans, entry, self._row_bytes, self.path)
            except ChecksumError as e:
                damage = "; ".join(map(str, find_damage(self.path)))
                raise ChecksumError(f"{e}. Damaged: {damage}. Run the computation that wrote "
                                    "the store again (Attributor.cache) to recompute just "
                                    "those rows") from None
            if intact:
                self._verified.add((writer, block, sum(b - a for a, b in spans)))
                return
            # The record was read before the writer moved on twice in this block: read it again.
            fresh = read_record(self._file("progress", f"{writer}.json"), self.n_rows).clipped(lo, hi)
            if fresh == spans:
                raise StoreError(f"{self.path}/checksums/{writer}.crc does not match {writer}.json "
                                 f"at rows [{lo}, {hi}): the progress of {writer!r} is corrupted")
            spans, entry = fresh, self._tables[writer].entries(block, block + 1)[0]

    def _checked(self, start: int, stop: int) -> None:
        """Refuse a bad range, rows not written yet, or rows that fail their checksum."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.n_rows):
            raise ValueError(f"need 0 <= start < stop <= n_rows={self.n_rows}, got [{start}, {stop})")
        self._verify(start, stop)

    def read(self, start: int, stop: int, layer: str | None = None) -> torch.Tensor:
        """Rows [start, stop) as a new fp32 tensor, (stop - start, width) or (.., k_layer)."""
        cols = self._columns(layer)
        self._checked(start, stop)
        # copy=True: an fp32 store would otherwise hand out a view of the map, whose pages are
        # then read by whoever touches it first instead of here.
        return self._rows[start:stop, cols].to(torch.float32, copy=True)

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct int64 (u,)) as a new (u, width) fp32 tensor, in one
        pass: the progress records are read once, each checksum block the rows touch is
        verified once (blocks already verified by this store object are not read again), and
        the rows are gathered by one indexed copy. Refuses rows not written yet and rows that
        fail their checksum, like ``read``."""
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1:
            got = (f"{rows.dtype} of shape {tuple(rows.shape)}" if isinstance(rows, torch.Tensor)
                   else type(rows).__name__)
            raise TypeError(f"rows must be a 1-D int64 tensor of row numbers; got {got}")
        if rows.numel() == 0:
            return torch.empty(0, self.width)
        if not bool((rows[1:] > rows[:-1]).all()) or rows[0] < 0 or rows[-1] >= self.n_rows:
            raise ValueError(f"rows must be strictly increasing row numbers in [0, "
                             f"n_rows={self.n_rows}) (torch.unique gives them); got "
                             f"{rows[:8].tolist()}{' ...' if rows.numel() > 8 else ''}")
        ids = rows.numpy()  # the bookkeeping on a few hundred numbers runs in numpy
        records = self._refresh()
        written = Intervals(p for r in records.values() for p in r.pairs())
        # Row i is written when the last range starting at or before it ends after it.
        where = np.searchsorted(np.asarray(written.starts, dtype=np.int64), ids, side="right") - 1
        stops = np.asarray(written.stops + [0], dtype=np.int64)  # where == -1 -> 0: unwritten
        unwritten = ids[stops[where] <= ids]
        if unwritten.size:
            raise ValueError(f"rows {unwritten[:8].tolist()} are not all written yet; "
                             f"missing: {self.missing()}")
        if self.path is not None:
            for block in np.unique(ids // self.block_rows).tolist():
                for writer, ranges in records.items():
                    self._verify_block(writer, block, ranges)
        return self._rows.index_select(0, rows).to(torch.float32)

    def read_raw(self, start: int, stop: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) in the store's dtype (bf16 / fp16 stay 16-bit: half the bytes to
        move to a GPU), checked like ``read``: a new tensor, or the first rows of ``out`` (a
        contiguous buffer of the store's dtype and width, e.g. pinned for a GPU copy)."""
        m = stop - start
        if out is not None and (out.dtype != self.dtype or out.dim() != 2 or out.shape[0] < m
                                or out.shape[1] != self.width or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {self.dtype} tensor of at least ({m}, "
                             f"{self.width}); got {out.dtype} {tuple(out.shape)}")
        self._checked(start, stop)
        if out is None:
            return self._rows[start:stop].clone()
        if self.path is None:
            return out[:m].copy_(self._rows[start:stop])
        # pread, not a copy out of the map: the kernel's readahead then sees one sequential
        # stream, where threads faulting pages of the map in turn look like random access.
        target = out[:m].view(torch.uint8).numpy().reshape(-1)
        with open(self._file("rows.bin"), "rb", buffering=0) as f:
            done, offset = 0, start * self._row_nbytes
            while done < target.nbytes:
                n = os.preadv(f.fileno(), [memoryview(target[done:])], offset + done)
                if n == 0:
                    raise StoreError(f"{self.path}/rows.bin ended before row {stop}")
                done += n
        return out[:m]

    def read_mapped(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in the store's dtype as a view of the mapped file, no copy,
        checked like ``read``: (stop - start, width). For readers that consume the rows at once
        (scoring reads each page once, straight from the page cache). Read-only by contract
        (writing through it would bypass the checksums); valid while the store is open."""
        self._checked(start, stop)
        return self._rows[start:stop]

    def prefetch(self, start: int, stop: int) -> None:
        """Ask the kernel to start reading rows [start, stop) into the page cache and return at
        once (madvise WILLNEED on the map), so that the disk works while the caller computes.
        Unchecked and without effect on results; nothing to do for an in-memory store."""
        if self.path is None or not 0 <= start < stop <= self.n_rows:
            return
        offset = start * self._row_nbytes
        aligned = offset - offset % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_WILLNEED, aligned, stop * self._row_nbytes - aligned)

    def chunks(self, size: int, layer: str | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (start, stop, rows fp32) over all rows in chunks of at most `size` rows."""
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self._columns(layer)
        for start in range(0, self.n_rows, size):
            stop = min(start + size, self.n_rows)
            yield start, stop, self.read(start, stop, layer)

    # ----------------------------------------------------------------------------- extras
    def save_array(self, name: str, tensor: torch.Tensor) -> None:
        """Save an extra tensor (e.g. a selective mask or a FIM) with the store, replacing any
        array of that name. Stored raw with its dtype and shape; float, int and bool supported."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"name must match {_NAME_RE.pattern}, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous()
        if self.path is None:
            self._arrays[name] = t.clone()
            return
        raw = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
        data = raw.numpy().tobytes()
        meta = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "crc32": zlib.crc32(data)}
        write_atomic(self._file("arrays", f"{name}.bin"), data)
        write_atomic(self._file("arrays", f"{name}.json"), json.dumps(meta).encode())

    def has_array(self, name: str) -> bool:
        if self.path is None:
            return name in self._arrays
        return os.path.exists(self._file("arrays", f"{name}.json"))

    def load_array(self, name: str) -> torch.Tensor:
        """The tensor saved under `name`; KeyError if there is none, StoreError if corrupted."""
        if not self.has_array(name):
            raise KeyError(f"no array named {name!r} in this store")
        if self.path is None:
            return self._arrays[name].clone()
        meta = read_json(self._file("arrays", f"{name}.json"))
        with open(self._file("arrays", f"{name}.bin"), "rb") as f:
            data = f.read()
        if zlib.crc32(data) != meta["crc32"]:
            raise StoreError(f"array {name!r} of {self.path} fails its checksum: corrupted")
        dtype = getattr(torch, meta["dtype"])
        raw_dtype = torch.uint16 if dtype == torch.bfloat16 else dtype
        flat = (torch.frombuffer(bytearray(data), dtype=raw_dtype) if data
                else torch.empty(0, dtype=raw_dtype))
        return flat.view(dtype).reshape(meta["shape"])

    def __repr__(self) -> str:
        where = self.path or "memory"
        return (f"GradientStore({where}, n_rows={self.n_rows}, width={self.width}, "
                f"dtype={_DTYPES[self.dtype][0]}, layers={len(self.layout)})")
