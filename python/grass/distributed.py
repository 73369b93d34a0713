"""Multi-process caching and scoring with torch.distributed (torchrun; gloo, nccl, any backend).

When a process group with world_size > 1 is initialised, ``Attributor.cache`` and the scoring
methods split their work across ranks; with no process group (or world_size 1) every function
here reduces to the single-process path.

* Store: rank 0 creates (or validates) the on-disk store first, then every rank opens it with
  its own progress writer ``rank<r>``; any rank's configuration mismatch is raised on all ranks.
  The path must be a file system that all ranks share.
* Caching: the rows still *missing* are split into world_size contiguous, near-equal shards and
  each rank writes its own. A run killed mid-cache resumes with only the missing rows, re-sharded
  over whatever world size the resumed run has.
* Curvature: each rank sums phi phi^T per layer over its contiguous share of all rows (for the
  sampled Fisher: over the batches that start in its share); the sums are all-reduced (SUM) and
  divided by n (times the draws), equal to a single-process Fisher to fp32 rounding.
* Scoring: each rank scores its contiguous share of train rows. ``top_k`` all-gathers the per-rank
  (n_test, k) values and global indices and keeps the best k: no score matrix is gathered.
  ``attribute`` and ``self_influence`` all-gather their columns: every rank receives the full
  result. Test features are computed by every rank in full: test sets are small next to the
  train set, scoring (not test capture) dominates, and it needs no collective.

Collectives run on the CPU for gloo and on ``cuda:current_device()`` for nccl: call
``torch.cuda.set_device(local_rank)`` and put the model on that device, as usual under torchrun.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .curvature import DEFAULT_CHUNK, Preconditioner, fisher_sums
from .scoring import Scorer, TrainNorms
from .store import GradientStore, StoreError

__all__ = ["ShardedScorer", "active", "barrier", "fisher", "mean_over_ranks", "open_store",
           "own_rows", "rank_world", "scorer", "shard", "split"]


def active() -> bool:
    """True when a torch.distributed process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def split(ranges: list[tuple[int, int]], parts: int, index: int) -> list[tuple[int, int]]:
    """Part ``index`` of ``parts`` contiguous, near-equal parts of the rows in ``ranges``.

    ranges: sorted, disjoint [start, stop) row ranges; the parts partition their rows in order,
    sizes differing by at most one. Deterministic, so every rank computes the same split.
    """
    total = sum(b - a for a, b in ranges)
    lo, hi = total * index // parts, total * (index + 1) // parts
    out, pos = [], 0
    for a, b in ranges:
        # Range [a, b) holds positions [pos, pos + b - a) of the concatenated rows.
        start, stop = max(a, a + lo - pos), min(b, a + hi - pos)
        if start < stop:
            out.append((start, stop))
        pos += b - a
    return out


def shard(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """This rank's part of ``ranges`` (all of them without a process group)."""
    rank, world = rank_world()
    return split(ranges, world, rank)


def own_rows(n_rows: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of rows [0, n_rows) (possibly empty)."""
    rank, world = rank_world()
    return n_rows * rank // world, n_rows * (rank + 1) // world


def barrier() -> None:
    if active():
        dist.barrier()


def _device() -> torch.device:
    """Where collectives run: nccl only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_any(error: str | None) -> None:
    """Raise on every rank the first StoreError any rank met, so that no rank waits forever in
    a later collective for a rank that failed."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    found = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if found:
        rank, message = found[0]
        raise StoreError(f"rank {rank}: {message}")


def open_store(path: str | os.PathLike | None, **options) -> GradientStore:
    """``GradientStore.open(path, **options)`` on every rank, rank 0 first (it creates or
    validates the store), each rank with its own progress writer ``rank<r>``.

    A configuration mismatch on any rank raises StoreError on all ranks.
    """
    if not active():
        return GradientStore.open(path, **options)
    if path is None:
        raise ValueError("store must be a directory that every rank can reach when "
                         "torch.distributed runs with world_size > 1; got store=None")
    rank = dist.get_rank()

    def attempt() -> tuple[GradientStore | None, str | None]:
        try:
            return GradientStore.open(path, writer=f"rank{rank}", **options), None
        except StoreError as e:
            return None, str(e)

    store, error = attempt() if rank == 0 else (None, None)
    _raise_any(error)  # also the point after which the store exists for the other ranks
    if rank != 0:
        store, error = attempt()
    _raise_any(error)
    return store


def fisher(store: GradientStore, chunk_size: int = DEFAULT_CHUNK,
           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Per-layer empirical Fisher, name -> (k_l, k_l) fp32 on the CPU, each rank summing its
    row share on ``device`` (the rank's capture device), all-reduced over ranks."""
    return mean_over_ranks(fisher_sums(store, own_rows(store.n_rows), chunk_size, device),
                           store.n_rows)


def mean_over_ranks(sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Every rank's per-layer sums added up (all-reduce SUM) and divided by ``count``:
    name -> fp32 on the CPU, the same on every rank."""
    out = {}
    for name, mat in sums.items():
        if active():
            mat = mat.to(_device())
            dist.all_reduce(mat, op=dist.ReduceOp.SUM)
        out[name] = mat.cpu() / count
    return out


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's equally shaped ``t``, in rank order, on the CPU."""
    local = t.to(_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def _gather_columns(local: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Concatenate every rank's (..., own_rows width) results along the last dimension."""
    world = dist.get_world_size()
    widths = [n_rows * (r + 1) // world - n_rows * r // world for r in range(world)]
    # all_gather needs equal shapes: pad every share to the widest one, then trim.
    padded = F.pad(local, (0, max(widths) - local.shape[-1]))
    return torch.cat([p[..., :w] for p, w in zip(_all_gather(padded), widths)], -1)


class ShardedScorer(Scorer):
    """A Scorer over this rank's share of train rows whose results cover all rows."""

    def __init__(self, store, precondition: Preconditioner, chunk_size: int = DEFAULT_CHUNK,
                 norms: TrainNorms | None = None):
        super().__init__(store, precondition, chunk_size, rows=own_rows(store.n_rows), norms=norms)

    def scores(self, test: torch.Tensor, **options) -> torch.Tensor:
        """(n_test, n_train) (or per layer), the same full matrix on every rank."""
        return _gather_columns(super().scores(test, **options), self.store.n_rows)

    def top_k(self, test: torch.Tensor, k: int, *, cosine: bool = False):
        """The global k best per test row from each rank's k best: two (n_test, k) tensors."""
        values, indices = super().top_k(test, k, cosine=cosine)
        pad = k - values.shape[1]  # a share with fewer than k rows
        values = torch.cat(_all_gather(F.pad(values, (0, pad), value=float("-inf"))), 1)
        indices = torch.cat(_all_gather(F.pad(indices, (0, pad), value=-1)), 1)
        keep = values.topk(min(k, self.store.n_rows), dim=1)
        return keep.values, indices.gather(1, keep.indices)

    def self_influence(self, *, per_layer: bool = False) -> torch.Tensor:
        return _gather_columns(super().self_influence(per_layer=per_layer), self.store.n_rows)


def scorer(store, precondition: Preconditioner, chunk_size: int = DEFAULT_CHUNK,
           norms: TrainNorms | None = None) -> Scorer:
    """A ShardedScorer under a process group, else a plain Scorer."""
    cls = ShardedScorer if active() else Scorer
    return cls(store, precondition, chunk_size, norms=norms)
