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
* Curvature, sharded by layer: each layer has one owner rank (``layer_owners``, balanced by
  k_l^2). The owner sums phi phi^T of its layers over all rows (for the sampled Fisher: every
  rank sums its batches and the sums are reduced to the owner), saves them with the store and
  factorises only those; test features are preconditioned block by block on the owners and
  summed over ranks.
* Scoring: each rank scores its contiguous share of train rows. ``top_k`` all-gathers the per-rank
  (n_test, k) values and global indices and keeps the best k: no score matrix is gathered.
  ``attribute`` and ``self_influence`` all-gather their columns: every rank receives the full
  result. Test features are computed by every rank in full: test sets are small next to the
  train set, and scoring (not test capture) dominates.
* A model sharded with FSDP2 runs collectives in its forward: ranks step through their batches
  in lockstep (``lockstep``). ``lease`` keeps a second run off a store being written;
  ``init_torchrun`` joins a torchrun group so that ``--max-restarts`` can re-form it, and
  ``shutdown`` (or the block ``leaving_group``) leaves it at the end of the script.

Collectives run on the CPU for gloo and on ``cuda:current_device()`` for nccl: call
``torch.cuda.set_device(local_rank)`` and put the model on that device, as usual under torchrun.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .curvature import DEFAULT_CHUNK, Preconditioner, fisher_sums
from .layers import Layout
from .scoring import Scorer, TrainNorms, layer_quadratics
from .store import GradientStore, StoreError
from .store_lock import StoreLease

__all__ = ["ShardedScorer", "active", "barrier", "fisher", "init_torchrun", "layer_owners",
           "lease", "lockstep", "mean_over_ranks", "open_store", "own_layers", "own_rows",
           "leaving_group", "rank_world", "scorer", "shard", "sharded_model", "shutdown",
           "split"]

T = TypeVar("T")


def init_torchrun(backend: str | None = None) -> None:
    """Join the process group of a torchrun launch, restart-safe: each attempt (the
    TORCHELASTIC_RESTART_COUNT of ``--max-restarts``) uses its own key prefix in torchrun's
    store, so that a restarted rank never reads the addresses its predecessors published there
    (plain ``init_process_group`` then fails to connect under gloo). backend: default nccl
    when CUDA is available, else gloo; with nccl, call ``torch.cuda.set_device`` first."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False)
    except KeyError as e:
        raise ValueError(f"init_torchrun needs the environment torchrun sets; {e} is missing: "
                         "launch the script with torchrun") from None
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", agent),
                            rank=rank, world_size=world)


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


def sharded_model(model: torch.nn.Module) -> bool:
    """True when ``model`` has parameters sharded over ranks (FSDP2's fully_shard, DTensor):
    its forward runs collectives, so every rank must run the same number of forwards."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return active() and any(isinstance(p, DTensor) for p in model.parameters())


def lockstep(items: Iterator[T], spare: Callable[[], T]) -> Iterator[tuple[T, bool]]:
    """(item, real) until every rank's ``items`` are exhausted, the same number of steps on
    every rank: a rank that has run out repeats its last item (``spare()`` if it had none) with
    real=False, so that a sharded model's all-gathers in each forward meet their partners.
    One all-reduce of one int per step."""
    last = None
    for_device = _device()
    while True:
        item = next(items, None)
        more = torch.tensor([int(item is not None)], device=for_device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not int(more):
            return
        if item is not None:
            last = item
            yield item, True
        else:
            last = spare() if last is None else last
            yield last, False


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group at the end of a run: wait until every rank is done, then destroy
    the group. Tearing gloo down while a peer still uses its connections can abort the process
    (std::terminate inside gloo), so call this, not ``destroy_process_group`` alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def leaving_group() -> Iterator[None]:
    """Run the block, then leave the process group (if one is initialised): ``shutdown`` when
    the block ends normally; when it raises, destroy the group at once (the other ranks may
    never reach the barrier) and re-raise."""
    try:
        yield
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown()


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


def lease(store: GradientStore) -> StoreLease | None:
    """The writer lease of an on-disk ``store`` (grass.store_lock), taken by rank 0 (the
    single process without a group); another run's live lease raises StoreError on every
    rank. None for an in-memory store and on ranks other than 0."""
    if store.path is None:
        return None
    held, error = None, None
    if rank_world()[0] == 0:
        try:
            held = StoreLease(store.path)
            held.acquire()
        except StoreError as e:
            held, error = None, str(e)
    if active():
        _raise_any(error)
    elif error is not None:
        raise StoreError(error)
    return held


def layer_owners(layers: Mapping[str, int], world: int) -> dict[str, int]:
    """name -> the rank that owns the layer's curvature: largest k_l^2 first, each to the rank
    with the least k^2 so far (ties: lowest rank, then store order). Deterministic."""
    load = [0] * world
    owners = {}
    for name in sorted(layers, key=lambda n: -layers[n] ** 2):  # stable: store order on ties
        rank = min(range(world), key=lambda r: load[r])
        owners[name] = rank
        load[rank] += layers[name] ** 2
    return owners


def own_layers(layout: Layout) -> list[str]:
    """The layers whose curvature this rank owns, in store order (all without a group)."""
    rank, world = rank_world()
    owners = layer_owners(layout.sizes, world)
    return [name for name in layout if owners[name] == rank]


def fisher(store: GradientStore, chunk_size: int = DEFAULT_CHUNK,
           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Per-layer empirical Fisher of this rank's own layers (all without a group), name ->
    (k_l, k_l) fp32 on the CPU: the owner sums all rows of its layers on ``device`` (the
    rank's capture device); no collective, no rank holds another's layers."""
    names = own_layers(store.layout)
    sums = fisher_sums(store, (0, store.n_rows), chunk_size, device, names)
    return {name: mat.cpu() / store.n_rows for name, mat in sums.items()}


def mean_over_ranks(sums: dict[str, torch.Tensor], count: int,
                    layout: Layout) -> dict[str, torch.Tensor]:
    """Every rank's per-layer sums (name -> (k_l, k_l), every layer of ``layout``) added up on
    the layer's owner (reduce SUM) and divided by ``count``: this rank's own layers, name ->
    fp32 on the CPU. Every rank reduces the layers in ``layout``'s order."""
    if not active():
        return {name: sums[name].cpu() / count for name in layout}
    owners, rank = layer_owners(layout.sizes, dist.get_world_size()), dist.get_rank()
    out = {}
    for name in layout:
        mat = sums[name].to(_device())
        dist.reduce(mat, dst=owners[name], op=dist.ReduceOp.SUM)
        if owners[name] == rank:
            out[name] = mat.cpu() / count
    return out


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """All-reduce SUM of ``t`` on the group's device, back on ``t``'s device."""
    total = t.to(_device()).contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(t.device)


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
    """A Scorer over this rank's share of train rows whose results cover all rows.

    With curvature, ``precondition`` holds only this rank's own layers' factors: test features
    are preconditioned block by block on each layer's owner and summed over ranks (the other
    blocks are zero), so every rank scores its rows with the full preconditioned test. Train
    norms (self-influence, cosine) are computed per layer by the owner over all rows.
    """

    def __init__(self, store, precondition: Preconditioner, chunk_size: int = DEFAULT_CHUNK,
                 norms: TrainNorms | None = None):
        super().__init__(store, precondition, chunk_size, rows=own_rows(store.n_rows), norms=norms)
        self.owned = precondition
        self.layer_sharded = precondition.factors is not None
        if self.layer_sharded:
            self.precondition = lambda features: _sum_over_ranks(self.owned(features))
        self._all_quadratics: torch.Tensor | None = None  # (L, n_rows), layer-sharded only

    def train_quadratics(self, progress: bool = False) -> torch.Tensor:
        """This rank's rows' per-layer quadratic forms (L, own rows). Layer-sharded, each owner
        computes its layers' forms over all rows and the ranks sum them: every rank then holds
        all (L, n_rows) forms, kept with the store by rank 0."""
        if not self.layer_sharded:
            return super().train_quadratics(progress)
        if self._all_quadratics is None:
            saved = self.norms.load() if self.norms is not None else None
            if saved is None:
                out = torch.zeros(len(self.layout), self.store.n_rows)
                for start, stop, rows in self.store.chunks(self.chunk_size):
                    rows = rows.float()
                    out[:, start:stop] = layer_quadratics(self.owned(rows), rows, self.layout)
                saved = _sum_over_ranks(out)
                if self.norms is not None and dist.get_rank() == 0:
                    self.norms.save(saved)
            self._all_quadratics = saved
        first, last = self.rows
        return self._all_quadratics[:, first:last]

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
        if self.layer_sharded:
            self.train_quadratics()
            influence = self._all_quadratics
            return influence.clone() if per_layer else influence.sum(0)
        return _gather_columns(super().self_influence(per_layer=per_layer), self.store.n_rows)


def scorer(store, precondition: Preconditioner, chunk_size: int = DEFAULT_CHUNK,
           norms: TrainNorms | None = None) -> Scorer:
    """A ShardedScorer under a process group, else a plain Scorer."""
    cls = ShardedScorer if active() else Scorer
    return cls(store, precondition, chunk_size, norms=norms)
