"""Data in the forms people have, read as ordered batches of rows for capture.

The rule that tells columns from batches (``data`` is ``train_data`` or ``test_data``):

* **Columns** (one data set, cut into batches of ``batch_size`` rows, in order): a tensor, a dict,
  or a tuple/list whose members are all tensors. The tensors are columns and share their first
  dimension (the rows); a batch is the same structure sliced to its rows.
* **Rows** (``batch_size`` at a time, in order): a map-style torch ``Dataset`` (items joined by
  ``default_collate``) or a Hugging Face ``datasets.Dataset`` (numeric columns, lists of ids padded
  on the right: ``attention_mask`` with 0, ``labels`` with -100, others with 0; an
  ``attention_mask`` is added when the rows have different lengths and none is given).
* **Batches** (used as they come, in order): a DataLoader (that does not shuffle), an
  ``IterableDataset``, a generator or any other iterable that is none of the above, and a
  tuple/list whose members are all batches (tuples, lists or dicts).

A tuple/list that mixes tensors and batches is refused, and so is a tuple/list of tensors whose
first dimensions differ (columns must share them; single-tensor batches are written
``[(x0,), (x1,)]``). A batch whose members are 0-dimensional tensors is a single example, not a
batch: wrap such a data set in ``DataLoader(data, batch_size=...)``.

Row counts: columns, rows and lists of batches know theirs; a generator or an unsized iterable does
not (``n`` is None). An iterator (a generator) can be read only once, in order. Resuming a cache over one reads it again
from the start and skips the batches whose rows are stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, default_collate

__all__ = ["Source", "pad_rows", "to_device", "token_mask", "overlaps"]

# Padding of per-token columns: labels use transformers' ignore index, everything else 0.
PAD_VALUES = {"labels": -100}


def _is_hf_dataset(data) -> bool:
    """A Hugging Face datasets.Dataset, recognised without importing ``datasets``."""
    cls = type(data)
    return cls.__module__.startswith("datasets.") and hasattr(data, "column_names")


def _is_batch(item) -> bool:
    return isinstance(item, (tuple, list, Mapping))


def _tensors(batch) -> Iterator[torch.Tensor]:
    """The tensors of a (nested) batch, in order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif _is_batch(batch):
        for member in (batch.values() if isinstance(batch, Mapping) else batch):
            yield from _tensors(member)


def to_device(batch, device: torch.device):
    """The batch with every tensor moved to ``device`` (structure kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def token_mask(batch) -> torch.Tensor | None:
    """A dict batch's ``token_mask`` (else ``attention_mask``): (B, T), nonzero on real tokens."""
    if isinstance(batch, Mapping):
        for key in ("token_mask", "attention_mask"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return None


def overlaps(ranges: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside [start, stop)."""
    return [(max(a, start), min(b, stop)) for a, b in ranges if a < stop and start < b]


def pad_rows(columns: Mapping[str, list], pad_values: Mapping[str, int] | None = None
             ) -> dict[str, torch.Tensor]:
    """Columns of m rows (name -> list of m numbers or m sequences) -> a batch of tensors.

    Sequence columns are padded on the right to the longest row, (m, T), with
    ``pad_values[name]`` (default: -100 for ``labels``, 0 otherwise); number columns become (m,).
    Non-numeric columns (text) are left out. Adds ``attention_mask`` (1 on real tokens) when
    rows differ in length and the columns have none.
    """
    pad_values = {**PAD_VALUES, **(pad_values or {})}
    out, lengths = {}, None
    for name, values in columns.items():
        if isinstance(values, torch.Tensor):
            out[name] = values
            continue
        try:
            rows = [torch.as_tensor(v) for v in values]
        except (TypeError, ValueError):
            continue  # a text column: the model does not read it
        if not rows:
            continue
        if rows[0].dim() == 0:
            out[name] = torch.stack(rows)
            continue
        width = max(r.shape[0] for r in rows)
        batch = torch.full((len(rows), width), pad_values.get(name, 0), dtype=rows[0].dtype)
        for i, r in enumerate(rows):
            batch[i, :r.shape[0]] = r
        out[name] = batch
        lengths = lengths or [r.shape[0] for r in rows]
    if lengths and "attention_mask" not in out and len(set(lengths)) > 1:
        mask = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        out["attention_mask"] = mask
    return out


class Source:
    """A data set (any form of the module docstring) as ordered batches.

    n: the number of rows, or None for an iterable of unknown length (read once).
    """

    def __init__(self, data, batch_size: int, name: str):
        self.name, self.batch_size = name, batch_size
        self._columns = self._dataset = self._hf = self._batches = None
        self._iterable: Iterable | None = None
        self._read = False
        if isinstance(data, (str, bytes)):
            raise TypeError(f"{name} must hold tensors or batches; got a {type(data).__name__}")
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler) and not isinstance(
                    data.dataset, IterableDataset):
                raise ValueError(
                    f"{name} is a DataLoader that reorders its data ({type(data.sampler).__name__}"
                    "); rows are stored in data order: pass shuffle=False")
            self._iterable = data
            self.n = self._sized_rows(data)
        elif isinstance(data, (torch.Tensor, Mapping)) or (
                isinstance(data, (tuple, list)) and data and
                all(isinstance(t, torch.Tensor) for t in data)):
            self._columns = data
            self.n = self._column_rows(data)
        elif isinstance(data, (tuple, list)):
            if not data or not all(_is_batch(b) for b in data):
                raise TypeError(
                    f"{name} as a tuple or list must hold either tensors (columns) or batches "
                    f"(tuples, lists or dicts); got {[type(t).__name__ for t in data][:8]}")
            self._batches = list(data)
            self.n = sum(self._rows_of(b) for b in self._batches)
        elif _is_hf_dataset(data):
            self._hf = data
            self.n = len(data)
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(
                data, "__len__"):
            self._dataset = data
            self.n = len(data)
        elif isinstance(data, Iterable):
            self._iterable = data
            self.n = None
        else:
            raise TypeError(
                f"{name} must be a tensor, a dict or tuple/list of tensors, a list of batches, a "
                f"Dataset, a DataLoader or an iterable of batches; got {type(data).__name__}")
        if self.n == 0:
            raise ValueError(f"{name} is empty: it must hold at least one example")

    # -- sizes ---------------------------------------------------------------------------------
    def _column_rows(self, data) -> int:
        members = list(data.values()) if isinstance(data, Mapping) else (
            [data] if isinstance(data, torch.Tensor) else list(data))
        if not members or not all(isinstance(t, torch.Tensor) for t in members):
            raise TypeError(f"{self.name} as a dict must hold tensors (columns); got "
                            f"{[type(t).__name__ for t in members][:8]}")
        sizes = {t.shape[0] if t.dim() else -1 for t in members}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError(
                f"{self.name}'s tensors are read as columns and must share their first dimension "
                f"(the rows); got {sorted(sizes)}. A list of single-tensor batches is written "
                "[(x0,), (x1,), ...]")
        return sizes.pop()

    def _rows_of(self, batch) -> int:
        tensors = list(_tensors(batch))
        if not tensors:
            raise TypeError(f"every batch of {self.name} must contain a tensor; got "
                            f"{type(batch).__name__}")
        if any(t.dim() == 0 for t in tensors):
            raise ValueError(
                f"a batch of {self.name} holds 0-dimensional tensors: it looks like a single "
                "example, not a batch; wrap the data set in DataLoader(data, batch_size=...)")
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) != 1:
            raise ValueError(f"the tensors of a batch of {self.name} must share their first "
                             f"dimension (the batch size); got {sorted(sizes)}")
        return sizes.pop()

    @staticmethod
    def _sized_rows(loader: DataLoader) -> int | None:
        """Rows of a DataLoader whose dataset has a length (None for an unsized iterable)."""
        try:
            return len(loader.dataset)
        except TypeError:
            return None

    # -- reading -------------------------------------------------------------------------------
    def _slice(self, start: int, stop: int):
        data = self._columns
        if isinstance(data, torch.Tensor):
            return data[start:stop]
        if isinstance(data, Mapping):
            return {k: v[start:stop] for k, v in data.items()}
        return type(data)(t[start:stop] for t in data)

    def _rows(self, start: int, stop: int):
        if self._columns is not None:
            return self._slice(start, stop)
        if self._hf is not None:
            return pad_rows(self._hf[start:stop])
        return default_collate([self._dataset[i] for i in range(start, stop)])

    def batches(self, wanted: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, object]]:
        """(start, batch) for every batch overlapping a ``wanted`` row range (all by default).

        Batches of an iterable are read in order, those outside ``wanted`` skipped unused; an
        iterable of unknown length can be read once only.
        """
        def needed(start, stop):
            return wanted is None or any(a < stop and start < b for a, b in wanted)

        if self._iterable is None and self._batches is None:
            for start in range(0, self.n, self.batch_size):
                stop = min(self.n, start + self.batch_size)
                if needed(start, stop):
                    yield start, self._rows(start, stop)
            return
        if self._read and self._iterable is not None and iter(self._iterable) is self._iterable:
            raise RuntimeError(f"{self.name} is an iterable that can be read only once and was "
                               "read already: pass a list, a Dataset or a fresh iterable")
        self._read = True
        start = 0
        for batch in (self._batches if self._batches is not None else self._iterable):
            stop = start + self._rows_of(batch)
            if self.n is not None and stop > self.n:
                raise ValueError(f"{self.name} yielded more than its {self.n} rows")
            if needed(start, stop):
                yield start, batch
            start = stop
        if self.n is not None and start != self.n:
            raise ValueError(f"{self.name} yielded {start} rows, expected {self.n}")
        self.n = start
