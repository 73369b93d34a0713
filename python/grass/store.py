"""GradientStore: fixed-width rows of compressed per-example gradients, in memory or on disk.

One row per training example, n_rows × width with width = Σ_l k_l; layer l owns the columns
offsets[l] = (start, stop). On disk a store is a directory:

    manifest.json        config (compressor, seeds, ...), layers, n_rows, width, dtype, version
    rows.bin             the raw row-major matrix (fp32 / bf16 / fp16; bf16 through uint16),
                         read and written through a memory map
    progress/<writer>.json   the row ranges each writer has finished, each with a CRC32 of its
                         bytes; replaced atomically only after the rows are flushed to disk
    arrays/<name>.bin + arrays/<name>.json   extra tensors (selective masks, FIMs), no pickle

Why this layout: a killed run leaves at worst rows that are on disk but not recorded; a resumed
run recomputes exactly `missing()` and, the computation being deterministic, ends bit-identical
to an uninterrupted one. Progress lives in one file per writer so that several processes can
fill disjoint row ranges of one store without a lock. A file of the wrong size or a range whose
checksum does not match raises StoreError instead of yielding wrong scores.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["GradientStore", "StoreError", "write_atomic"]

VERSION = 1
_DTYPES: dict[torch.dtype, tuple[str, np.dtype]] = {
    # torch dtype -> (manifest name, numpy dtype of the raw file)
    torch.float32: ("float32", np.dtype(np.float32)),
    torch.float16: ("float16", np.dtype(np.float16)),
    torch.bfloat16: ("bfloat16", np.dtype(np.uint16)),  # numpy has no bf16: same bits as uint16
}
_BY_NAME = {name: dt for dt, (name, _) in _DTYPES.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(ValueError):
    """A store on disk is truncated, corrupted, or does not match the requested configuration."""


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` by `data` so that readers see the old or the new file, never a mix."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dirfd)  # make the rename itself durable
    finally:
        os.close(dirfd)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is corrupted (not valid JSON: {e})") from None


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


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


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
        layers: dict[str, int],
        dtype: torch.dtype,
        writer: str,
    ) -> None:
        self.path = path
        self.config = config
        self.n_rows = n_rows
        self.layers = dict(layers)
        self.dtype = dtype
        self.writer = writer
        self.offsets: dict[str, tuple[int, int]] = {}
        col = 0
        for name, k in self.layers.items():
            self.offsets[name] = (col, col + k)
            col += k
        self.width = col
        # Finished row ranges, each (start, stop, crc32); this process's own and, on disk, others'.
        self._own: list[tuple[int, int, int]] = []
        self._verified: set[tuple[int, int, int]] = set()
        self._arrays: dict[str, torch.Tensor] = {}  # in-memory stores only
        np_dtype = _DTYPES[dtype][1]
        if path is None:
            self._raw = np.zeros((n_rows, self.width), dtype=np_dtype)
        else:
            self._raw = np.memmap(self._file("rows.bin"), dtype=np_dtype, mode="r+",
                                  shape=(n_rows, self.width))
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
        layers: dict[str, int],
        dtype: torch.dtype = torch.float32,
        writer: str = "main",
    ) -> GradientStore:
        """Create a store, or reopen the one at `path` if its manifest matches.

        path: a directory (created if absent), or None for an in-memory store.
        config: JSON-serialisable description of what produced the rows (model, compressor,
            seeds); an existing store with a different config is refused with a StoreError
            (a ValueError) naming the differing keys.
        n_rows: number of examples; layers: name -> k_l, in column order.
        dtype: storage dtype, float32 / bfloat16 / float16.
        writer: names this process's progress file; processes filling disjoint rows of one
            store concurrently must use distinct writers.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows <= 0:
            raise ValueError(f"n_rows must be a positive int, got {n_rows!r}")
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(f"layers must be a non-empty dict name -> k, got {layers!r}")
        for name, k in layers.items():
            if not isinstance(name, str) or isinstance(k, bool) or not isinstance(k, int) or k <= 0:
                raise ValueError(f"layers must map str names to positive ints, got {name!r}: {k!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
        if not _NAME_RE.match(writer):
            raise ValueError(f"writer must match {_NAME_RE.pattern}, got {writer!r}")
        config = _json_roundtrip(config)
        if path is None:
            return cls(None, config, n_rows, dict(layers), dtype, writer)
        path = os.fspath(path)
        manifest = {
            "version": VERSION,
            "config": config,
            "n_rows": n_rows,
            "layers": [[name, k] for name, k in layers.items()],
            "width": sum(layers.values()),
            "dtype": _DTYPES[dtype][0],
        }
        if os.path.exists(os.path.join(path, "manifest.json")):
            cls._check_matches(path, manifest)
        else:
            cls._create(path, manifest, _DTYPES[dtype][1].itemsize)
        store = cls(path, config, n_rows, dict(layers), dtype, writer)
        store._own = [tuple(r) for r in store._progress().get(writer, [])]
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, *, writer: str = "main") -> GradientStore:
        """Reopen the store at `path` with the configuration its manifest records."""
        manifest_path = os.path.join(os.fspath(path), "manifest.json")
        if not os.path.exists(manifest_path):
            raise StoreError(f"{path} is not a gradient store: it has no manifest.json")
        m = _read_json(manifest_path)
        try:
            return cls.open(path, config=m["config"], n_rows=m["n_rows"], layers=dict(m["layers"]),
                            dtype=_BY_NAME[m["dtype"]], writer=writer)
        except (KeyError, TypeError) as e:
            raise StoreError(f"{manifest_path} is corrupted (bad or missing field {e})") from None

    @staticmethod
    def _create(path: str, manifest: dict[str, Any], itemsize: int) -> None:
        if os.path.isdir(path) and os.listdir(path):
            raise StoreError(f"{path} exists, is not empty and holds no manifest.json: "
                             "refusing to turn it into a gradient store")
        os.makedirs(os.path.join(path, "progress"), exist_ok=True)
        os.makedirs(os.path.join(path, "arrays"), exist_ok=True)
        with open(os.path.join(path, "rows.bin"), "wb") as f:
            f.truncate(manifest["n_rows"] * manifest["width"] * itemsize)  # sparse until written
            os.fsync(f.fileno())
        # The manifest comes last: its presence means the store is complete and sized.
        write_atomic(os.path.join(path, "manifest.json"),
                      json.dumps(manifest, indent=1, sort_keys=True).encode())

    @staticmethod
    def _check_matches(path: str, wanted: dict[str, Any]) -> None:
        found = _read_json(os.path.join(path, "manifest.json"))
        if not isinstance(found, dict) or found.get("version") != VERSION:
            raise StoreError(f"{path}/manifest.json has version "
                             f"{found.get('version') if isinstance(found, dict) else None!r}, "
                             f"expected {VERSION}")
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
    def _progress(self) -> dict[str, list[list[int]]]:
        """writer -> finished [start, stop, crc] ranges, read fresh from disk."""
        if self.path is None:
            return {self.writer: [list(r) for r in self._own]}
        out = {}
        for fname in sorted(os.listdir(self._file("progress"))):
            if fname.endswith(".json"):
                out[fname[: -len(".json")]] = _read_json(self._file("progress", fname))
        return out

    def _records(self) -> list[tuple[int, int, int]]:
        records = [tuple(r) for ranges in self._progress().values() for r in ranges]
        if any(len(r) != 3 or not 0 <= r[0] < r[1] <= self.n_rows for r in records):
            raise StoreError(f"the progress record of {self.path} is corrupted")
        return records  # type: ignore[return-value]

    def missing(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) not yet written (by any writer), in order."""
        written = _merge([(r[0], r[1]) for r in self._records()])
        gaps, pos = [], 0
        for start, stop in written:
            if start > pos:
                gaps.append((pos, start))
            pos = max(pos, stop)
        if pos < self.n_rows:
            gaps.append((pos, self.n_rows))
        return gaps

    @property
    def complete(self) -> bool:
        return not self.missing()

    def _crc(self, start: int, stop: int) -> int:
        return zlib.crc32(memoryview(self._raw[start:stop]).cast("B"))

    # ----------------------------------------------------------------------------- writing
    def write(self, start: int, rows: torch.Tensor) -> None:
        """Store rows (m, width) at [start, start + m) and record them durably.

        rows: any float dtype, converted to the store dtype. A range that overlaps rows already
        recorded is refused (a resumed run writes only `missing()` ranges).
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
        for a, b, _ in self._records():
            if a < stop and start < b:
                raise ValueError(f"rows [{start}, {stop}) overlap rows [{a}, {b}) already written")
        self._rows[start:stop] = rows.detach().to("cpu", self.dtype)
        if self.path is not None:
            self._raw.flush()  # msync: the data is on disk before the record says so
        self._own.append((start, stop, self._crc(start, stop)))
        self._verified.add(self._own[-1])
        if self.path is not None:
            write_atomic(self._file("progress", f"{self.writer}.json"),
                          json.dumps([list(r) for r in self._own]).encode())

    # ----------------------------------------------------------------------------- reading
    def _columns(self, layer: str | None) -> slice:
        if layer is None:
            return slice(0, self.width)
        if layer not in self.offsets:
            raise ValueError(f"layer must be one of {list(self.offsets)}, got {layer!r}")
        return slice(*self.offsets[layer])

    def _verify(self, start: int, stop: int) -> None:
        """Check that [start, stop) is written and that every range it touches is intact."""
        records = self._records()
        covered = _merge([(a, b) for a, b, _ in records if a < stop and start < b])
        if not covered or covered[0][0] > start or covered[0][1] < stop:
            raise ValueError(f"rows [{start}, {stop}) are not all written yet; "
                             f"missing: {self.missing()}")
        for rec in records:
            a, b, crc = rec
            if a < stop and start < b and rec not in self._verified:
                if self._crc(a, b) != crc:
                    raise StoreError(f"rows [{a}, {b}) of {self.path}/rows.bin fail their "
                                     "checksum: the file is corrupted; delete the store and recompute")
                self._verified.add(rec)

    def read(self, start: int, stop: int, layer: str | None = None) -> torch.Tensor:
        """Rows [start, stop) as a new fp32 tensor, (stop - start, width) or (.., k_layer)."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.n_rows):
            raise ValueError(f"need 0 <= start < stop <= n_rows={self.n_rows}, got [{start}, {stop})")
        cols = self._columns(layer)
        self._verify(start, stop)
        return self._rows[start:stop, cols].to(torch.float32)

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
        meta = _read_json(self._file("arrays", f"{name}.json"))
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
                f"dtype={_DTYPES[self.dtype][0]}, layers={len(self.layers)})")
