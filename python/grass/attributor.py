"""grass.Attributor: cache compressed per-example training gradients, then score test examples.

    attr = grass.Attributor(model, loss_fn, compressor=grass.FactGraSS(k=4096))
    attr.cache(train_data)                  # features -> GradientStore, per-layer Fisher
    scores = attr.attribute(test_data)      # (n_test, n_train)

Data (``train_data`` / ``test_data``) may be:
    * a tuple or list of tensors with equal first dimension: batches are tuples of slices;
    * a dict of such tensors (e.g. input_ids, attention_mask, labels): batches are dicts;
    * a single tensor: batches are slices of it;
    * a torch Dataset: batches are ``default_collate`` of ``batch_size`` items, in order;
    * a DataLoader that does not shuffle: its own batches, in order.
Rows of the store follow the data's order. ``loss_fn(model, batch)`` returns (B,) per-example
losses. A dict batch's ``"token_mask"`` (else ``"attention_mask"``) marks the real tokens; layers
whose inputs are (B, T, d) with the batch's T ignore the masked tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, default_collate
from tqdm.auto import tqdm

from .capture import Capture, LayerSpec, layer_shape, select_layers
from .compressors import Compressor, FactGraSS
from . import distributed, fisher
from .curvature import DEFAULT_CHUNK, HESSIANS, Preconditioner
from .scoring import Scorer
from .store import GradientStore

# Relative damping lambda in F_l + lambda * tr(F_l) / k_l * I. Chosen on the digits LDS
# benchmark (`python -m bench.attributor --damping`): LDS is flat for lambda in [0.3, 1] and within
# 0.03 of each method's best at 0.5 for Identity, FactGraSS, LoGra and FactSJLT at k = 64 and 256,
# while 1e-5 (DESIGN's first guess) loses up to 0.5 LDS for uncompressed gradients.
DEFAULT_DAMPING = 0.5
# Draws per example of hessian="fisher": see the README's "Choosing the Hessian and damping".
DEFAULT_FISHER_SAMPLES = 16
CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Features:
    """Compressed gradients of a data set, tagged with the configuration that produced them.

    values: (n, width) fp32, columns as in the store; config: the Attributor's config.
    """

    values: torch.Tensor
    config: dict


def _model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's parameters and buffers: features of another checkpoint differ."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- data --------------------------------------------------------------------------------------
def _members(data) -> list:
    """The tensors (or other items) a batch or data set is made of, in order."""
    if isinstance(data, Mapping):
        return list(data.values())
    if isinstance(data, (tuple, list)):
        return list(data)
    return [data]


def _leading_tensor(batch) -> torch.Tensor | None:
    """The first tensor of a (nested) batch: its first dimension is the batch size."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (Mapping, tuple, list)):
        for member in _members(batch):
            found = _leading_tensor(member)
            if found is not None:
                return found
    return None


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _token_mask(batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        for key in ("token_mask", "attention_mask"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return None


class _Source:
    """A data set as ordered batches: ``n`` rows, ``batches(plan)`` yields (start, batch)."""

    def __init__(self, data, batch_size: int, name: str):
        self.batch_size = batch_size
        self.loader: DataLoader | None = None
        self.dataset: Dataset | None = None
        self.tensors = None
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler):
                raise ValueError(
                    f"{name} is a DataLoader that reorders its data ({type(data.sampler).__name__}"
                    "); rows are stored in data order: pass shuffle=False"
                )
            self.loader = data
            self.n = len(data.dataset)
        elif isinstance(data, (torch.Tensor, tuple, list, Mapping)):
            members = _members(data)
            if not members or not all(isinstance(t, torch.Tensor) for t in members):
                raise TypeError(
                    f"{name} as a tuple, list or dict must hold tensors; got "
                    f"{[type(t).__name__ for t in members]}"
                )
            sizes = {t.shape[0] if t.dim() else -1 for t in members}
            if len(sizes) != 1 or -1 in sizes:
                raise ValueError(f"{name}'s tensors must share their first dimension; got {sizes}")
            self.tensors = data
            self.n = sizes.pop()
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            self.dataset = data
            self.n = len(data)
        else:
            raise TypeError(
                f"{name} must be a Dataset, a DataLoader, a tensor, or a tuple/list/dict of "
                f"tensors; got {type(data).__name__}"
            )
        if self.n == 0:
            raise ValueError(f"{name} is empty: it must hold at least one example")

    def _slice(self, start: int, stop: int):
        data = self.tensors
        if isinstance(data, torch.Tensor):
            return data[start:stop]
        if isinstance(data, Mapping):
            return {k: v[start:stop] for k, v in data.items()}
        return type(data)(t[start:stop] for t in data)

    def batches(self, wanted: list[tuple[int, int]]) -> Iterator[tuple[int, object]]:
        """(start, batch) for every batch that overlaps a ``wanted`` row range."""
        def needed(start, stop):
            return any(a < stop and start < b for a, b in wanted)

        if self.loader is not None:
            start = 0
            for batch in self.loader:
                lead = _leading_tensor(batch)
                if lead is None:
                    raise TypeError("DataLoader batches must contain tensors")
                stop = start + lead.shape[0]
                if needed(start, stop):
                    yield start, batch
                start = stop
            return
        for start in range(0, self.n, self.batch_size):
            stop = min(self.n, start + self.batch_size)
            if not needed(start, stop):
                continue
            if self.tensors is not None:
                yield start, self._slice(start, stop)
            else:
                yield start, default_collate([self.dataset[i] for i in range(start, stop)])


def _overlaps(ranges: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside [start, stop)."""
    return [(max(a, start), min(b, stop)) for a, b in ranges if a < stop and start < b]


def _dampings(damping, absolute_damping) -> tuple[float, float]:
    """(relative, absolute) damping from the arguments: the default relative damping unless
    an absolute one is given; both given and non-zero is refused as ambiguous."""
    for name, value in (("damping", damping), ("absolute_damping", absolute_damping)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value >= 0 or value == float("inf")):
            raise ValueError(f"{name} must be a float >= 0 (and finite); got {value!r}")
    if absolute_damping is None:
        return float(DEFAULT_DAMPING if damping is None else damping), 0.0
    if damping:
        raise ValueError(
            f"damping={damping!r} (relative) and absolute_damping={absolute_damping!r} were both "
            "given: pass one of them (or damping=0 with absolute_damping)"
        )
    return 0.0, float(absolute_damping)


# -- the attributor ----------------------------------------------------------------------------
class Attributor:
    """Training-data attribution with compressed per-example gradients.

    model: the network; its nn.Linear / transformers Conv1D layers are captured (or those that
        ``layers`` selects by fnmatch name pattern or module type).
    loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
    compressor: a ``grass`` compressor config, k features per layer (default FactGraSS(4096)).
    hessian: "efim" (block-diagonal empirical Fisher, gradients at the observed labels),
        "fisher" (the same at targets sampled from the model: needs ``fisher_loss_fn``) or
        "identity" (plain inner products).
    damping: relative damping lambda: F_l + lambda * tr(F_l) / k_l * I (default 0.5).
    absolute_damping: lambda_abs in F_l + lambda_abs * I instead, e.g. the training weight
        decay (the L2 term's share of the Hessian); giving both, each non-zero, is refused.
    fisher_loss_fn: for hessian="fisher", ``fisher_loss_fn(model, batch, generator) -> (B,)``
        per-example losses at targets drawn from the model's predictive distribution with
        ``generator`` (a torch.Generator on ``device``); or ``grass.fisher.ExactClasses`` for
        the exact expectation over a classifier's classes (one capture pass per class).
    fisher_samples: draws per example for hessian="fisher" (each costs one capture pass).
    store: None (in memory) or a directory for an on-disk GradientStore; a run that was
        interrupted resumes there, computing only the missing rows.
    batch_size: examples per capture step for data that is not a DataLoader.
    seed: the global seed of the random maps (per layer: a hash of (seed, layer name)).
    device: where capture runs (default: the model's device).
    store_dtype: float32, bfloat16 or float16 rows on disk.

    Scores: ``scores[j, i] = phi_j^T (F + lambda I)^{-1} phi_i``; positive means training on
    example i lowers test example j's loss.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, object], torch.Tensor],
        compressor: Compressor | None = None,
        *,
        layers: LayerSpec = None,
        hessian: str = "efim",
        damping: float | None = None,
        absolute_damping: float | None = None,
        fisher_loss_fn: fisher.FisherLoss | None = None,
        fisher_samples: int = DEFAULT_FISHER_SAMPLES,
        store: str | os.PathLike | None = None,
        batch_size: int = 32,
        seed: int = 0,
        device: torch.device | str | None = None,
        store_dtype: torch.dtype = torch.float32,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> (B,) losses")
        compressor = FactGraSS(k=4096) if compressor is None else compressor
        if not isinstance(compressor, Compressor):
            raise TypeError(
                f"compressor must be a grass compressor (e.g. grass.FactGraSS(k=4096)); got "
                f"{type(compressor).__name__}"
            )
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}; got {hessian!r}")
        damping, absolute_damping = _dampings(damping, absolute_damping)
        if hessian == "fisher" and not callable(fisher_loss_fn):
            raise ValueError(
                "hessian='fisher' needs fisher_loss_fn=f with f(model, batch, generator) -> (B,) "
                "per-example losses at targets sampled from the model's predictions with "
                f"generator; got fisher_loss_fn={fisher_loss_fn!r} (or use hessian='efim')"
            )
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ValueError(f"fisher_samples must be a positive int; got {fisher_samples!r}")
        for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.model, self.loss_fn, self.compressor = model, loss_fn, compressor
        self.hessian, self.damping, self.absolute_damping = hessian, damping, absolute_damping
        self.fisher_loss_fn, self.fisher_samples = fisher_loss_fn, fisher_samples
        self.store_path, self.store_dtype = store, store_dtype
        self.batch_size, self.chunk_size, self.seed = batch_size, chunk_size, seed
        self.device, self.progress = torch.device(device), progress

        self.modules = select_layers(model, layers)
        shapes = {name: layer_shape(name, m) for name, m in self.modules.items()}
        self.maps = {
            name: compressor.build(shape, seed=seed, device=self.device)
            for name, shape in shapes.items()
        }
        self.layer_sizes = {name: m.k for name, m in self.maps.items()}
        self.offsets, col = {}, 0
        for name, k in self.layer_sizes.items():
            self.offsets[name] = (col, col + k)
            col += k
        self.config = {
            "version": CONFIG_VERSION,
            "compressor": compressor.config(),
            "seed": seed,
            "model": type(model).__name__,
            "parameters": _model_fingerprint(model),
            "layers": [[s.name, s.d_out, s.d_in, s.bias] for s in shapes.values()],
        }
        self.store: GradientStore | None = None
        self._scorer: Scorer | None = None

    # -- features ------------------------------------------------------------------------------
    def _compute(self, source: _Source, wanted, sink: Callable[[int, torch.Tensor], None],
                 desc: str) -> None:
        """Capture every batch overlapping ``wanted`` and pass (start, features) to ``sink``."""
        total = sum(b - a for a, b in wanted)
        bar = tqdm(total=total, desc=desc, unit="ex", disable=not self.progress)
        with bar, Capture(self.model, self.modules, self.maps, self.offsets) as capture:
            for start, batch in source.batches(wanted):
                batch = _to_device(batch, self.device)
                out = capture.features(batch, self.loss_fn, _token_mask(batch), first_row=start)
                sink(start, out)
                bar.update(sum(b - a for a, b in _overlaps(wanted, start, start + out.shape[0])))

    def features(self, data) -> Features:
        """Compressed gradients of ``data`` (any accepted form): Features (n, width)."""
        source = _Source(data, self.batch_size, "data")
        values = torch.empty(source.n, sum(self.layer_sizes.values()))

        def keep(start: int, out: torch.Tensor) -> None:
            values[start:start + out.shape[0]] = out.cpu()

        self._compute(source, [(0, source.n)], keep, "grass features")
        return Features(values, self.config)

    def cache(self, train_data) -> GradientStore:
        """Compute the training features into the store (only missing rows) and the curvature.

        Under torch.distributed (torchrun) each rank computes its shard of the missing rows
        into one shared on-disk store: see ``grass.distributed``.
        """
        source = _Source(train_data, self.batch_size, "train_data")
        # grass.distributed: rank 0 creates the store first; each rank fills its shard.
        store = distributed.open_store(
            self.store_path, config=self.config, n_rows=source.n, layers=self.layer_sizes,
            dtype=self.store_dtype,
        )
        missing = distributed.shard(store.missing())

        def write(start: int, out: torch.Tensor) -> None:
            for a, b in _overlaps(missing, start, start + out.shape[0]):
                store.write(a, out[a - start:b - start])

        if missing:
            self._compute(source, missing, write, "grass cache")
        distributed.barrier()  # every rank's rows are on disk before anyone reads them
        if self.hessian != "identity":
            fishers = (distributed.fisher(store, self.chunk_size, self.device)
                       if self.hessian == "efim" else self._sampled_fisher(source, store))
            precondition = Preconditioner.efim(fishers, store.offsets, self.damping,
                                               self.absolute_damping)
        else:
            precondition = Preconditioner.identity(store.offsets)
        self.store = store
        self._scorer = distributed.scorer(store, precondition, self.chunk_size)
        return store

    def _sampled_fisher(self, source: _Source, store: GradientStore) -> dict[str, torch.Tensor]:
        """hessian="fisher": name -> (k_l, k_l) fp32 mean of psi psi^T over rows and draws, each
        rank summing the batches that start in its row share (see grass.fisher)."""
        first, last = distributed.own_rows(source.n)
        rank, world = distributed.rank_world()
        draws = fisher.draws(self.fisher_loss_fn, self.fisher_samples)
        exact = isinstance(self.fisher_loss_fn, fisher.ExactClasses)
        key = (self.seed, draws, int(exact), self.batch_size, world, rank)
        bar = tqdm(total=(last - first) * draws, desc="grass fisher", unit="ex",
                   disable=not self.progress)
        with bar, Capture(self.model, self.modules, self.maps, self.offsets) as capture:
            def features(start, batch, loss_fn):
                batch = _to_device(batch, self.device)
                return capture.features(batch, loss_fn, _token_mask(batch), first_row=start)

            own = ((start, batch) for start, batch in source.batches([(first, last)])
                   if first <= start < last)
            sums = fisher.sampled_sums(
                own, features, self.fisher_loss_fn, store=store, samples=self.fisher_samples,
                seed=self.seed, key=key, device=self.device, checkpoint_rows=self.chunk_size,
                on_batch=lambda rows: bar.update(rows * draws))
        return distributed.mean_over_ranks(sums, source.n * draws)

    # -- scores --------------------------------------------------------------------------------
    def _test_values(self, test_data) -> torch.Tensor:
        self._scorer_checked()
        if isinstance(test_data, Features):
            if test_data.config != self.config:
                differ = sorted(k for k in self.config if test_data.config.get(k) != self.config[k])
                raise ValueError(
                    "test features were computed with a different configuration than the "
                    f"train store (differs in {differ}): recompute them with this Attributor"
                )
            return test_data.values
        return self.features(test_data).values

    def attribute(self, test_data, *, per_layer: bool = False, cosine: bool = False):
        """Scores (n_test, n_train); (L, n_test, n_train) with ``per_layer`` (layer order of
        ``self.layer_sizes``); ``cosine`` normalises by the preconditioned norms."""
        test = self._test_values(test_data)
        return self._scorer_checked().scores(test, per_layer=per_layer, cosine=cosine,
                                   progress=self.progress)

    def top_k(self, test_data, k: int = 10, *, cosine: bool = False):
        """The k most helpful train examples per test example: (values, indices), (n_test, k)."""
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int; got {k!r}")
        return self._scorer_checked().top_k(self._test_values(test_data), k, cosine=cosine)

    def self_influence(self, *, per_layer: bool = False) -> torch.Tensor:
        """phi_i^T (F + lambda I)^{-1} phi_i per train example: (n_train,), or (L, n_train)."""
        return self._scorer_checked().self_influence(per_layer=per_layer)

    def _scorer_checked(self) -> Scorer:
        if self._scorer is None:
            raise RuntimeError("call cache(train_data) before scoring")
        return self._scorer
