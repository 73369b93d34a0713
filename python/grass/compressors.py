"""Compressors as small configuration objects.

A compressor is a frozen dataclass that says *which* random linear map to use; ``build`` turns
it into a per-layer callable ``(acts, grads, token_mask) -> (B, k_l)`` fp32 that calls the
``grass_kernels`` ops. The map of a layer is fixed by (compressor, seed, layer name): seeds are
derived with a stable hash, so every process and every device builds the same map.

Factorized compressors (LoGra, FactGraSS, FactSJLT) read the layer's inputs and output
gradients directly. Flat ones (Identity, SJLT, RandomMask, SelectiveMask, GraSS, Gaussian) act
on the materialised per-example gradient vec(G_i), G_i = sum_t delta_t x_t^T (d_out, d_in'),
which ``grass_kernels.linear_grads`` forms a few examples at a time into a reused workspace.

Feature layout: vec(G_i) is row-major over (d_out, d_in'), d_in' = d_in + bias, with the bias
as the last input column; a transformers Conv1D (weight (d_in, d_out)) uses the same layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

import grass_kernels as gk

log = logging.getLogger("grass")

LayerFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class LayerShape:
    """A captured linear layer: y = W x (+ b), W (d_out, d_in)."""

    name: str
    d_in: int
    d_out: int
    bias: bool

    @property
    def d_in_total(self) -> int:
        """Input columns of G_i: d_in, plus one for the bias."""
        return self.d_in + int(self.bias)

    @property
    def numel(self) -> int:
        """Parameters of the layer = length of vec(G_i)."""
        return self.d_out * self.d_in_total


@dataclass(frozen=True)
class LayerMap:
    """A built per-layer compressor: ``fn(acts, grads, token_mask) -> (B, k)`` fp32.

    acts (B, T, d_in), grads (B, T, d_out), token_mask (B, T) or None.
    """

    k: int
    fn: LayerFn

    def __call__(self, acts, grads, token_mask=None) -> torch.Tensor:
        return self.fn(acts, grads, token_mask)


def layer_seed(seed: int, name: str, role: str = "") -> int:
    """A 63-bit seed from (seed, layer name, role), stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def split_even(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """Factor k = k_out * k_in as evenly as possible, preferring sides that fit (d_out, d_in).

    4096 -> (64, 64); 512 -> (16, 32) unless a side would exceed its dimension.
    """
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0]
    fitting = [p for p in pairs if p[0] <= d_out and p[1] <= d_in]
    # Most even first (ratio of the sides), then the larger input side.
    return min(fitting or pairs, key=lambda p: (max(p) / min(p), -p[1]))


def mask_sides(target: int, d_out: int, d_in: int) -> tuple[int, int]:
    """Mask sizes (k_o', k_i') with k_o' * k_i' close to ``target``, square where they fit."""
    if target >= d_out * d_in:
        return d_out, d_in
    k_out = min(d_out, math.isqrt(target))
    k_in = min(d_in, max(1, target // k_out))
    # A capped input side hands its share back to the output side.
    k_out = min(d_out, max(k_out, target // k_in))
    return k_out, k_in


class _PerExampleGradients:
    """``flat(vec(G_i))`` a few examples at a time, the blocks formed in one workspace that is
    kept across calls (allocating it per call costs more than a one-token GEMM)."""

    def __init__(self, layer: LayerShape, flat: Callable[[torch.Tensor], torch.Tensor]):
        self.layer = layer
        self.flat = flat
        self.workspace: torch.Tensor | None = None

    def __call__(self, acts, grads, token_mask) -> torch.Tensor:
        if self.workspace is None or self.workspace.device != acts.device:
            self.workspace = torch.empty(0, device=acts.device)
        return gk.linear_grads(
            acts, grads, bias=self.layer.bias, token_mask=token_mask,
            compress=lambda g: self.flat(g.flatten(1)), workspace=self.workspace,
        )


# Field metadata: a backend changes how a map is computed, not which map it is, so it stays out
# of the config; trained tables enter the config as a digest of their values.
_NOT_CONFIG = {"config": "skip"}
_TABLE = {"config": "digest"}


def _digest(tables: Mapping[str, torch.Tensor | tuple[torch.Tensor, ...]]) -> str | None:
    """sha256 over (name, values) of per-layer index tables; None when there are none."""
    if not tables:
        return None
    digest = hashlib.sha256()
    for name in sorted(tables):
        digest.update(name.encode() + b"\x00")
        parts = tables[name] if isinstance(tables[name], (tuple, list)) else (tables[name],)
        for idx in parts:
            digest.update(idx.to(torch.int64).cpu().numpy().tobytes() + b"\x00")
    return digest.hexdigest()


@dataclass(frozen=True)
class Compressor:
    """Base of every compressor config; subclasses define ``_build``.

    ``backend`` (where a subclass has it) picks the ``grass_kernels`` backend; None chooses by
    device (``grass_kernels.backends()`` reports the choice).
    """

    def build(self, layer: LayerShape, *, seed: int, device=None) -> LayerMap:
        """The per-layer map for ``layer`` with seeds from (seed, layer.name)."""
        k = getattr(self, "k", None)
        if k is not None and k >= layer.numel:
            log.info(
                "grass: layer %s has %d parameters <= k = %d; kept uncompressed",
                layer.name, layer.numel, k,
            )
            return Identity().build(layer, seed=seed, device=device)
        return self._build(layer, seed, torch.device("cpu") if device is None else device)

    def _build(self, layer: LayerShape, seed: int, device: torch.device) -> LayerMap:
        raise NotImplementedError

    def config(self) -> dict:
        """A JSON-able description: two compressors with equal configs build equal maps."""
        out: dict = {"name": type(self).__name__}
        for f in dataclasses.fields(self):
            kind = f.metadata.get("config")
            if kind != "skip":
                value = getattr(self, f.name)
                out[f.name] = _digest(value) if kind == "digest" else value
        return out

    def __post_init__(self):
        for name in ("k", "blowup", "c"):
            value = getattr(self, name, 1)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a positive int; got {type(value).__name__} "
                                f"{value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value}")


def _flat_map(layer: LayerShape, k: int, flat: Callable[[torch.Tensor], torch.Tensor]) -> LayerMap:
    return LayerMap(k, _PerExampleGradients(layer, flat))


@dataclass(frozen=True)
class Identity(Compressor):
    """No compression: vec(G_i) itself, k_l = d_out * (d_in + bias)."""

    def _build(self, layer, seed, device):
        def fn(acts, grads, token_mask):
            return gk.linear_grads(acts, grads, bias=layer.bias, token_mask=token_mask).flatten(1)

        return LayerMap(layer.numel, fn)


@dataclass(frozen=True)
class SJLT(Compressor):
    """Sparse JL transform of vec(G_i) to k, c buckets per coordinate."""

    k: int
    c: int = 1
    backend: str | None = dataclasses.field(default=None, metadata=_NOT_CONFIG)

    def _build(self, layer, seed, device):
        s = layer_seed(seed, layer.name, "sjlt")
        return _flat_map(
            layer, self.k, lambda g: gk.sjlt(g, self.k, c=self.c, seed=s, backend=self.backend)
        )


@dataclass(frozen=True)
class RandomMask(Compressor):
    """A uniform random subset of k coordinates of vec(G_i), rescaled by sqrt(D / k)."""

    k: int

    def _build(self, layer, seed, device):
        idx = gk.random_indices(layer.numel, self.k, seed=layer_seed(seed, layer.name, "mask"))
        idx = idx.to(device)
        return _flat_map(layer, self.k, lambda g: gk.mask(g, idx))


@dataclass(frozen=True)
class SelectiveMask(Compressor):
    """A trained subset of coordinates of vec(G_i) per layer (see ``grass.selective``).

    indices: layer name -> int64 (k,) indices into [0, d_out * d_in'), as trained. Every
    captured layer with more than k parameters needs an entry of exactly k indices.
    """

    k: int
    indices: Mapping[str, torch.Tensor] = dataclasses.field(
        default_factory=dict, compare=False, metadata=_TABLE
    )

    def _build(self, layer, seed, device):
        if layer.name not in self.indices:
            raise ValueError(
                f"SelectiveMask has no trained indices for layer {layer.name!r}; it has "
                f"{sorted(self.indices)}"
            )
        idx = self.indices[layer.name]
        if not isinstance(idx, torch.Tensor) or idx.numel() != self.k:
            got = idx.numel() if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(
                f"SelectiveMask indices for layer {layer.name!r} must be a tensor of k = "
                f"{self.k} entries; got {got}"
            )
        idx = idx.to(device=device, dtype=torch.int64)
        return _flat_map(layer, self.k, lambda g: gk.mask(g, idx))


@dataclass(frozen=True)
class GraSS(Compressor):
    """Random mask of vec(G_i) to blowup * k coordinates, then SJLT to k (fused kernel)."""

    k: int
    blowup: int = 4
    c: int = 1
    backend: str | None = dataclasses.field(default=None, metadata=_NOT_CONFIG)

    def _build(self, layer, seed, device):
        kept = min(layer.numel, self.blowup * self.k)
        idx = gk.random_indices(layer.numel, kept, seed=layer_seed(seed, layer.name, "mask"))
        idx = idx.to(device)
        s = layer_seed(seed, layer.name, "sjlt")
        return _flat_map(
            layer,
            self.k,
            lambda g: gk.grass(g, self.k, indices=idx, c=self.c, seed=s, backend=self.backend),
        )


@dataclass(frozen=True)
class Gaussian(Compressor):
    """Dense N(0, 1/k) projection of vec(G_i): the TRAK-style baseline, O(D k) per example."""

    k: int

    def _build(self, layer, seed, device):
        s = layer_seed(seed, layer.name, "gaussian")
        return _flat_map(layer, self.k, lambda g: gk.gaussian(g, self.k, seed=s))


@dataclass(frozen=True)
class LoGra(Compressor):
    """Gaussian projections of both sides: P_out G_i P_in^T, k = k_out * k_in (64 x 64 for 4096)."""

    k: int
    backend: str | None = dataclasses.field(default=None, metadata=_NOT_CONFIG)

    def _build(self, layer, seed, device):
        k_out, k_in = split_even(self.k, layer.d_out, layer.d_in_total)
        p_in = gk.gaussian_matrix(
            layer.d_in_total, k_in, seed=layer_seed(seed, layer.name, "in"), device=device
        )
        p_out = gk.gaussian_matrix(
            layer.d_out, k_out, seed=layer_seed(seed, layer.name, "out"), device=device
        )

        def fn(acts, grads, token_mask):
            return gk.logra(
                acts, grads, p_in=p_in, p_out=p_out, bias=layer.bias,
                token_mask=token_mask, backend=self.backend,
            )

        return LayerMap(self.k, fn)


@dataclass(frozen=True)
class FactGraSS(Compressor):
    """Mask both sides of G_i to k_o' x k_i' (k_o' k_i' ~ blowup * k, 128 x 128 for k = 4096),
    then SJLT to k; the paper's method, one fused kernel per layer.

    masks: optional trained masks, layer name -> (in_indices, out_indices), the order of
    ``grass_kernels.fact_grass`` (see ``grass.selective``); layers without an entry get uniform
    random masks.
    """

    k: int
    blowup: int = 4
    c: int = 1
    backend: str | None = dataclasses.field(default=None, metadata=_NOT_CONFIG)
    masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict, compare=False, metadata=_TABLE
    )

    def _indices(self, layer: LayerShape, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(in_indices, out_indices) of ``layer``: int64 (k_i',) and (k_o',) on ``device``."""
        if layer.name in self.masks:
            in_idx, out_idx = self.masks[layer.name]
            return in_idx.to(device, torch.int64), out_idx.to(device, torch.int64)
        k_out, k_in = mask_sides(self.blowup * self.k, layer.d_out, layer.d_in_total)
        out_idx = gk.random_indices(layer.d_out, k_out, seed=layer_seed(seed, layer.name, "out"))
        in_idx = gk.random_indices(
            layer.d_in_total, k_in, seed=layer_seed(seed, layer.name, "in")
        )
        return in_idx.to(device), out_idx.to(device)

    def _build(self, layer, seed, device):
        in_idx, out_idx = self._indices(layer, seed, device)
        s = layer_seed(seed, layer.name, "sjlt")

        def fn(acts, grads, token_mask):
            return gk.fact_grass(
                acts, grads, k=self.k, in_indices=in_idx, out_indices=out_idx, c=self.c, seed=s,
                bias=layer.bias, token_mask=token_mask, backend=self.backend,
            )

        return LayerMap(self.k, fn)


@dataclass(frozen=True)
class FactSJLT(Compressor):
    """A Kronecker SJLT: SJLTs on both sides, k = k_out * k_in (64 x 64 for 4096)."""

    k: int
    c: int = 1
    backend: str | None = dataclasses.field(default=None, metadata=_NOT_CONFIG)

    def _build(self, layer, seed, device):
        k_out, k_in = split_even(self.k, layer.d_out, layer.d_in_total)
        seed_in = layer_seed(seed, layer.name, "in")
        seed_out = layer_seed(seed, layer.name, "out")

        def fn(acts, grads, token_mask):
            return gk.fact_sjlt(
                acts, grads, k_in=k_in, k_out=k_out, c=self.c, seed_in=seed_in,
                seed_out=seed_out, bias=layer.bias, token_mask=token_mask, backend=self.backend,
            )

        return LayerMap(self.k, fn)


def compressor_from_config(config: Mapping) -> Compressor:
    """The compressor whose ``config()`` is ``config``; trained tables cannot be rebuilt from
    their digest, so a config that names some raises ValueError (pass the compressor itself)."""
    cls = globals().get(config.get("name")) if isinstance(config, Mapping) else None
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise ValueError(f"config does not name a grass compressor: {config!r}")
    options = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata.get("config")
        if kind == "digest" and config.get(f.name) is not None:
            raise ValueError(f"the {cls.__name__} config holds trained tables ({f.name}, digest "
                             f"{config[f.name]}): pass the compressor with its tables")
        if kind is None and f.name in config:
            options[f.name] = config[f.name]
    return cls(**options)
