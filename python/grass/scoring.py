"""Scores between test and train features, streamed over chunks of the train store.

score(j, i) = sum_l phi_{j,l}^T (F_l + lambda_l I)^{-1} phi_{i,l}: the test side is
preconditioned once, then every train chunk costs one GEMM. Only one chunk of train rows is in
memory at a time; ``top_k`` keeps (n_test, k) running results instead of the score matrix.

Options: ``per_layer`` gives one score matrix per layer, (L, n_test, n_train), in store layer
order; ``cosine`` divides by the preconditioned norms sqrt(phi^T (F + lambda I)^{-1} phi) of
both sides (per layer when ``per_layer``), so scores lie in [-1, 1].
"""

from __future__ import annotations

from typing import Iterator

import torch
from tqdm.auto import tqdm

from .curvature import DEFAULT_CHUNK, Preconditioner


def _products(a: torch.Tensor, b: torch.Tensor, offsets, per_layer: bool) -> torch.Tensor:
    """a (n, width) x b (m, width) -> (n, m), or (L, n, m) per layer."""
    if not per_layer:
        return a @ b.T
    return torch.stack([a[:, s:e] @ b[:, s:e].T for s, e in offsets.values()])


def _rowwise(a: torch.Tensor, b: torch.Tensor, offsets, per_layer: bool) -> torch.Tensor:
    """Row-wise inner products: (n,), or (L, n) per layer."""
    prod = a * b
    if not per_layer:
        return prod.sum(1)
    return torch.stack([prod[:, s:e].sum(1) for s, e in offsets.values()])


def _norms(pre: torch.Tensor, x: torch.Tensor, offsets, per_layer: bool) -> torch.Tensor:
    """Preconditioned norms sqrt(x^T (F + lambda I)^{-1} x) from pre = preconditioned x."""
    return _rowwise(pre, x, offsets, per_layer).clamp_min(0).sqrt()


def _normalise(block: torch.Tensor, test_norms: torch.Tensor, train_norms: torch.Tensor):
    denom = test_norms.unsqueeze(-1) * train_norms.unsqueeze(-2)
    return block / denom.clamp_min(torch.finfo(block.dtype).tiny)


class Scorer:
    """Scores against the rows of ``store`` under ``precondition``.

    rows: the train rows [start, stop) scored, all by default; grass.distributed gives each
    rank its own range, and results then cover those rows only (indices stay global).
    """

    def __init__(self, store, precondition: Preconditioner, chunk_size: int = DEFAULT_CHUNK,
                 rows: tuple[int, int] | None = None):
        self.store = store
        self.precondition = precondition
        self.offsets = dict(store.offsets)
        self.chunk_size = chunk_size
        self.rows = (0, store.n_rows) if rows is None else rows

    def _chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, fp32 rows) over ``self.rows`` in chunks of ``chunk_size``."""
        first, last = self.rows
        for start in range(first, last, self.chunk_size):
            stop = min(start + self.chunk_size, last)
            yield start, stop, self.store.read(start, stop)

    def blocks(
        self, test: torch.Tensor, *, per_layer: bool = False, cosine: bool = False,
        progress: bool = False,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, scores of test against train rows [start, stop)) chunk by chunk."""
        test = test.float()
        pre = self.precondition(test)
        if cosine:
            test_norms = _norms(pre, test, self.offsets, per_layer)
        chunks = self._chunks()
        if progress:
            total = -(-(self.rows[1] - self.rows[0]) // self.chunk_size)
            chunks = tqdm(chunks, total=total, desc="grass attribute", unit="chunk")
        for start, stop, rows in chunks:
            rows = rows.float()
            block = _products(pre, rows, self.offsets, per_layer)
            if cosine:
                train_norms = _norms(self.precondition(rows), rows, self.offsets, per_layer)
                block = _normalise(block, test_norms, train_norms)
            yield start, stop, block

    def scores(self, test: torch.Tensor, *, per_layer=False, cosine=False, progress=False):
        """(n_test, n_train), or (L, n_test, n_train) with ``per_layer``."""
        first, last = self.rows
        shape = (len(self.offsets),) if per_layer else ()
        out = torch.empty(*shape, test.shape[0], last - first)
        for start, stop, block in self.blocks(
            test, per_layer=per_layer, cosine=cosine, progress=progress
        ):
            out[..., start - first:stop - first] = block
        return out

    def top_k(self, test: torch.Tensor, k: int, *, cosine: bool = False):
        """The k highest scores per test row and their train indices: two (n_test, k) tensors."""
        values = torch.full((test.shape[0], 0), float("-inf"))
        indices = torch.zeros((test.shape[0], 0), dtype=torch.int64)
        for start, _, block in self.blocks(test, cosine=cosine):
            top = block.topk(min(k, block.shape[1]), dim=1)
            values = torch.cat([values, top.values], 1)
            indices = torch.cat([indices, top.indices + start], 1)
            keep = values.topk(min(k, values.shape[1]), dim=1)
            values, indices = keep.values, indices.gather(1, keep.indices)
        return values, indices

    def self_influence(self, *, per_layer: bool = False) -> torch.Tensor:
        """phi_i^T (F + lambda I)^{-1} phi_i for every train row: (n_train,), or (L, n_train)."""
        first, last = self.rows
        shape = (len(self.offsets),) if per_layer else ()
        out = torch.empty(*shape, last - first)
        for start, stop, rows in self._chunks():
            out[..., start - first:stop - first] = _rowwise(self.precondition(rows), rows,
                                                            self.offsets, per_layer)
        return out
