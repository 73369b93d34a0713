"""Scores between test and train features, streamed over chunks of the train store.

score(j, i) = sum_l phi_{j,l}^T (F_l + lambda_l I)^{-1} phi_{i,l}: the test side is
preconditioned once, then every train chunk costs one GEMM. ``top_k`` keeps (n_test, k)
running results instead of the score matrix.

On the CPU each chunk (at least ``CHUNK_BYTES``) is scored straight from the store's mapped
pages (checked, not copied) while the kernel reads the next chunk into the page cache (madvise
WILLNEED: no reader thread competes with the GEMM for the cores). fp32 rows go to the GEMM as
they are; bf16 / fp16 rows are widened in tiles just before their GEMM, and a small test batch
is scored tile by tile in one thread (see ``_ChunkProducts``). When the test features are on a
CUDA device a reader thread reads up to ``READ_AHEAD`` chunks ahead of the one being scored, as raw
rows (bf16 / fp16 stay 16-bit) into a ring of ``READ_AHEAD + 2`` pinned host buffers, which are
copied to the device asynchronously on a side stream and widened to fp32 there.

Options: ``per_layer`` gives one score matrix per layer, (L, n_test, n_train), in store layer
order; ``cosine`` divides by the preconditioned norms sqrt(phi^T (F + lambda I)^{-1} phi) of
both sides (per layer when ``per_layer``), so scores lie in [-1, 1]. The train side of those
norms is the per-layer quadratic forms q_{l,i} = phi_{i,l}^T (F_l + lambda_l I)^{-1} phi_{i,l},
(L, n_train), computed in one pass the first time they are needed and kept with the store
(see ``TrainNorms``); ``self_influence`` is the same array.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .curvature import DEFAULT_CHUNK, Preconditioner
from .layers import Layout

# Chunks read ahead of the one being scored: one in flight while one is scored.
READ_AHEAD = 2
# Test rows up to which a chunk is scored in tiles in one thread (see _ChunkProducts).
SMALL_BATCH = 16
# fp32 bytes of one such tile, and the least bytes of rows a CPU chunk reads (a smaller
# chunk_size is raised to it): both chosen by bench/scoring.py --sweep.
TILE_BYTES = 4 << 20
CHUNK_BYTES = 32 << 20


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the body with torch's intra-op threads set to one, restored after (the setting is
    process-wide). For bodies of small ops, where a second thread costs more in
    synchronisation than it saves, and around code with its own OpenMP runtime (FAISS), which
    torch's busy-waiting workers would otherwise slow down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _ChunkProducts:
    """pre (n, width) fp32 against chunks of train rows: chunk (m, width) -> (n, m) fp32, or
    (L, n, m) per layer, each tile's GEMM writing its columns in place (a transposed result
    would cost a strided copy of every score afterwards).

    A small test batch (n <= ``SMALL_BATCH``) leaves the GEMM bound by reading the rows: the
    chunk is scored in tiles of ``TILE_BYTES`` of fp32 in one intra-op thread, 16-bit tiles
    widened into one reused buffer that stays in cache while its GEMM reads it (no fp32 copy
    of the chunk goes to memory and back), fp32 tiles used in place. Such tiles are too small
    to split across threads: on a machine whose cores are busy, every split op waits for a
    thread to be scheduled. A larger batch makes the GEMM the bottleneck: the chunk is one
    tile (widened whole into a reused buffer when 16-bit) and the GEMM uses every thread.
    Rows staged to a GPU arrive as fp32 and are one tile.
    """

    def __init__(self, pre: torch.Tensor, layout: Layout, per_layer: bool,
                 store_dtype: torch.dtype, chunk_rows: int):
        self.pre, self.layout, self.per_layer = pre, layout, per_layer
        width = pre.shape[1]
        on_cpu = pre.device.type == "cpu"
        self.small = on_cpu and pre.shape[0] <= SMALL_BATCH
        self.tile_rows = (max(1, min(TILE_BYTES // (4 * width), chunk_rows)) if self.small
                          else chunk_rows)
        widen = on_cpu and store_dtype != torch.float32
        self.buffer = torch.empty(self.tile_rows, width) if widen else None  # (tile, width) fp32

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        m, n = rows.shape[0], self.pre.shape[0]
        out = torch.empty((len(self.layout), n, m) if self.per_layer else (n, m),
                          device=self.pre.device)
        with one_torch_thread() if self.small else contextlib.nullcontext():
            for a in range(0, m, self.tile_rows):
                b = min(a + self.tile_rows, m)
                tile = rows[a:b] if self.buffer is None else self.buffer[:b - a].copy_(rows[a:b])
                self._tile_products(tile, out[..., a:b])
        return out

    def _tile_products(self, tile: torch.Tensor, out: torch.Tensor) -> None:
        """tile (t, width) fp32 -> out (n, t), or (L, n, t) per layer (column slices)."""
        if not self.per_layer:
            torch.mm(self.pre, tile.T, out=out)
            return
        for layer, c in enumerate(self.layout.values()):
            torch.mm(self.pre[:, c.cols], tile[:, c.cols].T, out=out[layer])


def layer_quadratics(pre: torch.Tensor, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Per-layer row-wise inner products of pre = preconditioned x with x: (L, m) fp32."""
    prod = pre * x
    return torch.stack([prod[:, c.cols].sum(1) for c in layout.values()])


def _norms_from_quadratics(quadratics: torch.Tensor, per_layer: bool) -> torch.Tensor:
    """(L, m) quadratic forms -> norms (L, m) per layer, else (m,) over all layers."""
    q = quadratics if per_layer else quadratics.sum(0)
    return q.clamp_min(0).sqrt()


def _normalise(block: torch.Tensor, test_norms: torch.Tensor, train_norms: torch.Tensor):
    denom = test_norms.unsqueeze(-1) * train_norms.unsqueeze(-2)
    return block / denom.clamp_min(torch.finfo(block.dtype).tiny)


def read_ahead(read: Callable[[int, int, int], torch.Tensor], first: int, last: int, size: int,
               depth: int = READ_AHEAD) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, read(start, stop, slot)) over [first, last) in chunks of ``size`` rows,
    read by a background thread up to ``depth`` chunks ahead of the consumer (torch copies and
    file reads release the GIL, so reading overlaps scoring).

    slot cycles through ``depth + 2`` values: a chunk read into a slot's buffer is not
    overwritten before the consumer has asked for the chunk after it (at most ``depth`` wait in
    the queue, one is being read, one is being used). An error in the reader is raised here, at
    the chunk where it happened; closing the generator early stops the reader."""
    spans = [(a, min(a + size, last)) for a in range(first, last, size)]
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop_reading = threading.Event()

    def reader() -> None:
        for i, (a, b) in enumerate(spans):
            if stop_reading.is_set():
                return
            try:
                item = (a, b, read(a, b, i % (depth + 2)), None)
            except BaseException as e:  # handed to the consumer, which raises it
                item = (a, b, None, e)
            while not stop_reading.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[3] is not None:
                return

    thread = threading.Thread(target=reader, name="grass-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in spans:
            a, b, rows, error = ready.get()
            if error is not None:
                raise error
            yield a, b, rows
    finally:
        stop_reading.set()
        thread.join()


class _CudaStager:
    """Reads raw chunks (the store dtype) into a ring of pinned host buffers on the reader
    thread, then copies them to ``device`` on a side stream and widens them to fp32 there. A
    buffer is refilled only after the copy out of it has finished (its event)."""

    def __init__(self, store, chunk_size: int, device: torch.device, slots: int = READ_AHEAD + 2):
        self.store, self.device = store, device
        self.buffers = [torch.empty((chunk_size, store.width), dtype=store.dtype, pin_memory=True)
                        for _ in range(slots)]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.stream = torch.cuda.Stream(device)

    def read(self, start: int, stop: int, slot: int) -> tuple[int, torch.Tensor]:
        """On the reader thread: rows [start, stop) into the pinned buffer of ``slot``."""
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return slot, self.store.read_raw(start, stop, out=self.buffers[slot])

    def to_device(self, staged: tuple[int, torch.Tensor]) -> torch.Tensor:
        """On the scoring thread: (m, width) fp32 on the device, copied asynchronously."""
        slot, raw = staged
        with torch.cuda.stream(self.stream):
            on_device = raw.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[slot] = event
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        on_device.record_stream(current)
        return on_device.float()


class TrainNorms:
    """The train side of ``cosine`` and ``self_influence``: per-layer quadratic forms
    q (L, n_rows) fp32 of every store row under one preconditioner, kept with the store.

    Arrays of the store, under ``key`` (the curvature kind, e.g. "efim"): "<key>.norms" the
    forms, "<key>.norms_damping" the (relative, absolute) damping they were computed under, and
    last "<key>.norms_rows" the row count they cover (its presence marks a complete save). Forms
    saved under another damping or row count are recomputed (one pass over the rows) and
    replace them.
    """

    def __init__(self, store, key: str, dampings: tuple[float, float]):
        self.store, self.key = store, key
        self.dampings = torch.tensor([float(d) for d in dampings], dtype=torch.float64)

    def load(self) -> torch.Tensor | None:
        """The saved (L, n_rows) forms, or None when none match this damping and row count."""
        s, k = self.store, self.key
        if not (s.has_array(f"{k}.norms_rows") and s.has_array(f"{k}.norms_damping")):
            return None
        if (int(s.load_array(f"{k}.norms_rows")) != s.n_rows
                or not torch.equal(s.load_array(f"{k}.norms_damping"), self.dampings)):
            return None
        return s.load_array(f"{k}.norms")

    def save(self, quadratics: torch.Tensor) -> None:
        s, k = self.store, self.key
        s.save_array(f"{k}.norms", quadratics.float().cpu())
        s.save_array(f"{k}.norms_damping", self.dampings)
        s.save_array(f"{k}.norms_rows", torch.tensor(s.n_rows, dtype=torch.int64))


class Scorer:
    """Scores against the rows of ``store`` under ``precondition``.

    chunk_size: rows read, checked and scored at a time (on the CPU raised to ``CHUNK_BYTES``).
    rows: the train rows [start, stop) scored, all by default; grass.distributed gives each
        rank its own range, and results then cover those rows only (indices stay global).
    norms: where the train norms are kept (``TrainNorms``); None computes them once per Scorer.
        Only a Scorer over all rows saves them; one over a row range reads its slice of saved
        forms or computes its own rows'.
    """

    def __init__(self, store, precondition: Preconditioner, chunk_size: int = DEFAULT_CHUNK,
                 rows: tuple[int, int] | None = None, norms: TrainNorms | None = None):
        self.store = store
        self.precondition = precondition
        self.layout = store.layout
        self.chunk_size = chunk_size
        self.rows = (0, store.n_rows) if rows is None else rows
        self.norms = norms
        self._quadratics: torch.Tensor | None = None  # (L, rows) fp32, CPU

    def _chunks(self, device: torch.device, progress: bool = False, desc: str = "grass attribute"
                ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows) over ``self.rows`` in chunks of ``chunk_size`` rows (on the CPU at
        least ``CHUNK_BYTES``: fewer per-chunk checks, advice and thread switches). On a CUDA
        ``device``: fp32 rows there, read ahead by a background thread and staged through pinned
        memory. On the CPU: checked views of the mapped store in its dtype, no copy, with the
        kernel asked to read the next chunk into the page cache while this one is scored (no
        reader thread: the disk works on its own, the cores stay with the GEMM)."""
        first, last = self.rows
        size = self._chunk_rows(device)
        if device.type == "cuda":
            stager = _CudaStager(self.store, size, device)
            chunks = ((a, b, stager.to_device(staged)) for a, b, staged in
                      read_ahead(stager.read, first, last, size))
        else:
            chunks = self._mapped_chunks(first, last, size)
        if progress:
            total = -(-(last - first) // size)
            chunks = tqdm(chunks, total=total, desc=desc, unit="chunk")
        return chunks

    def _chunk_rows(self, device: torch.device) -> int:
        """Rows per chunk: ``chunk_size``, on the CPU at least ``CHUNK_BYTES`` of rows."""
        size = self.chunk_size
        if device.type != "cuda":
            size = max(size, CHUNK_BYTES // (self.store.width * self.store.dtype.itemsize))
        return max(1, min(size, self.rows[1] - self.rows[0]))

    def _mapped_chunks(self, first: int, last: int, size: int
                       ) -> Iterator[tuple[int, int, torch.Tensor]]:
        self.store.prefetch(first, min(first + size, last))
        for a in range(first, last, size):
            b = min(a + size, last)
            self.store.prefetch(b, min(b + size, last))
            yield a, b, self.store.read_mapped(a, b)

    def train_quadratics(self, progress: bool = False) -> torch.Tensor:
        """Per-layer phi_{i,l}^T (F_l + lambda_l I)^{-1} phi_{i,l} of ``self.rows``: (L, m) fp32,
        read from the store when kept there, else computed in one pass (and saved)."""
        if self._quadratics is not None:
            return self._quadratics
        first, last = self.rows
        saved = self.norms.load() if self.norms is not None else None
        if saved is not None:
            self._quadratics = saved[:, first:last]
            return self._quadratics
        out = torch.empty(len(self.layout), last - first)
        for start, stop, rows in self._chunks(torch.device("cpu"), progress, "grass norms"):
            rows = rows.float()  # a 16-bit chunk widened (an fp32 one is used in place)
            out[:, start - first:stop - first] = layer_quadratics(self.precondition(rows), rows,
                                                                   self.layout)
        if self.norms is not None and self.rows == (0, self.store.n_rows):
            self.norms.save(out)
        self._quadratics = out
        return out

    def blocks(
        self, test: torch.Tensor, *, per_layer: bool = False, cosine: bool = False,
        progress: bool = False,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, scores of test against train rows [start, stop)) chunk by chunk, on
        the test features' device."""
        test = test.float()
        pre = self.precondition(test)
        first = self.rows[0]
        if cosine:
            test_norms = _norms_from_quadratics(layer_quadratics(pre, test, self.layout),
                                                per_layer)
            train_norms = _norms_from_quadratics(self.train_quadratics(progress),
                                                 per_layer).to(test.device)
        products = _ChunkProducts(pre, self.layout, per_layer, self.store.dtype,
                                  self._chunk_rows(test.device))
        for start, stop, rows in self._chunks(test.device, progress):
            block = products(rows)
            if cosine:
                block = _normalise(block, test_norms,
                                   train_norms[..., start - first:stop - first])
            yield start, stop, block

    def scores(self, test: torch.Tensor, *, per_layer=False, cosine=False, progress=False):
        """(n_test, n_train), or (L, n_test, n_train) with ``per_layer``; on the CPU."""
        first, last = self.rows
        shape = (len(self.layout),) if per_layer else ()
        out = torch.empty(*shape, test.shape[0], last - first)
        for start, stop, block in self.blocks(
            test, per_layer=per_layer, cosine=cosine, progress=progress
        ):
            out[..., start - first:stop - first] = block.cpu()
        return out

    def top_k(self, test: torch.Tensor, k: int, *, cosine: bool = False):
        """The k highest scores per test row and their train indices: two (n_test, k) tensors
        on the CPU."""
        values = torch.full((test.shape[0], 0), float("-inf"), device=test.device)
        indices = torch.zeros((test.shape[0], 0), dtype=torch.int64, device=test.device)
        for start, _, block in self.blocks(test, cosine=cosine):
            top = block.topk(min(k, block.shape[1]), dim=1)
            values = torch.cat([values, top.values], 1)
            indices = torch.cat([indices, top.indices + start], 1)
            keep = values.topk(min(k, values.shape[1]), dim=1)
            values, indices = keep.values, indices.gather(1, keep.indices)
        return values.cpu(), indices.cpu()

    def self_influence(self, *, per_layer: bool = False) -> torch.Tensor:
        """phi_i^T (F + lambda I)^{-1} phi_i for every train row: (n_train,), or (L, n_train)."""
        quadratics = self.train_quadratics()
        return quadratics.clone() if per_layer else quadratics.sum(0)
