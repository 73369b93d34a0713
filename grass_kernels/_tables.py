"""Random tables behind the compressors: SJLT codes, mask indices, Gaussian matrices.

Every table is drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` and then
copied to the requested device, so one (size, seed) gives the same map on every device,
backend and process. Tables are cached: the CPU draw once per key, and one copy per device.

SJLT codes
----------
``codes`` is an int32 tensor of shape (d, c). Row i lists the c buckets of input coordinate i,
one per block: bucket j lies in ``[j * k // c, (j + 1) * k // c)``, so the c buckets are
distinct by construction. The sign rides in the same int32: a bucket ``b`` with sign -1 is
stored as ``~b`` (= -b - 1), with sign +1 as ``b``. Kernels decode with
``b = code if code >= 0 else ~code`` and ``s = +1 if code >= 0 else -1``; one 4-byte load per
(coordinate, copy) is all the table traffic a kernel pays.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _checks

_SEED_MASK = (1 << 63) - 1
# Gaussian matrices are drawn in column chunks of this width, each from its own generator,
# so a matrix can be produced piecewise (it is far too large to hold at D = 1e6, k = 4096)
# and the same (d, k, seed) gives the same matrix whether it is cached or streamed.
GAUSSIAN_CHUNK = 1 << 14


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) & _SEED_MASK)


@functools.lru_cache(maxsize=32)
def _sjlt_codes_cpu(d: int, k: int, c: int, seed: int) -> torch.Tensor:
    g = _generator(seed)
    width = k // c
    offsets = torch.randint(0, width, (d, c), generator=g, dtype=torch.int64)
    negative = torch.randint(0, 2, (d, c), generator=g, dtype=torch.int64).bool()
    buckets = offsets + torch.arange(c, dtype=torch.int64) * width
    return torch.where(negative, ~buckets, buckets).to(torch.int32).contiguous()


_device_cache: dict[tuple, torch.Tensor] = {}
_DEVICE_CACHE_SIZE = 64


def _on_device(key: tuple, cpu_table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return cpu_table
    full_key = key + (str(device),)
    table = _device_cache.get(full_key)
    if table is None:
        if len(_device_cache) >= _DEVICE_CACHE_SIZE:
            _device_cache.pop(next(iter(_device_cache)))
        table = cpu_table.to(device)
        _device_cache[full_key] = table
    return table


def sjlt_codes(d: int, k: int, *, c: int = 1, seed: int = 0, device=None) -> torch.Tensor:
    """The SJLT table that maps ``d`` input coordinates to ``k`` buckets (see the module doc).

    Arguments:
        d       int > 0, input coordinates; d * c < 2**31
        k       int > 0, output buckets, divisible by c
        c       int, 1 <= c <= k, buckets per coordinate
        seed    int, the table's seed
        device  where the table lives (default the CPU); the same table on every device
    Returns:
        codes   int32 (d, c): bucket b with sign +1 as b, with sign -1 as ~b
    """
    d = _checks.positive_int("d", d)
    k, c = _checks.sjlt_sizes(k, c)
    # Tables are int32 (d, c); kernels index them with 32-bit offsets.
    if d * c >= 2**31:
        raise ValueError(f"d * c must be below 2**31 for the SJLT table; got d = {d}, c = {c}")
    device = torch.device("cpu") if device is None else torch.device(device)
    cpu_table = _sjlt_codes_cpu(d, k, c, int(seed))
    return _on_device(("sjlt", d, k, c, seed), cpu_table, device)


def decode_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split SJLT codes into int64 buckets and fp32 signs, both shaped like ``codes``."""
    codes = codes.to(torch.int64)
    negative = codes < 0
    buckets = torch.where(negative, ~codes, codes)
    signs = torch.where(negative, -1.0, 1.0).to(torch.float32)
    return buckets, signs


@functools.lru_cache(maxsize=64)
def _random_indices_cpu(d: int, k: int, seed: int) -> torch.Tensor:
    perm = torch.randperm(d, generator=_generator(seed))
    return perm[:k].sort().values.contiguous()


def random_indices(d: int, k: int, *, seed: int = 0, device=None) -> torch.Tensor:
    """A uniform random subset of ``[0, d)`` of size ``k``, the index set of a random mask.

    Arguments:
        d       int > 0, the dimension indexed
        k       int, 1 <= k <= d, entries kept
        seed    int, the subset's seed
        device  where the indices live (default the CPU); the same subset on every device
    Returns:
        indices int64 (k,), sorted, distinct, in [0, d)
    """
    d = _checks.positive_int("d", d)
    k = _checks.positive_int("k", k)
    if k > d:
        raise ValueError(f"k must be at most d = {d} (a subset of [0, d)); got k = {k}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _on_device(("indices", d, k, seed), _random_indices_cpu(d, k, int(seed)), device)


def gaussian_chunk(d: int, k: int, start: int, stop: int, seed: int) -> torch.Tensor:
    """Columns ``[start, stop)`` of the (k, d) N(0, 1/k) matrix; ``start`` is chunk-aligned."""
    if start % GAUSSIAN_CHUNK:
        raise ValueError(f"start must be a multiple of {GAUSSIAN_CHUNK}; got {start}")
    parts = []
    for lo in range(start, stop, GAUSSIAN_CHUNK):
        width = min(GAUSSIAN_CHUNK, d - lo, stop - lo)
        # One generator per chunk, seeded from (seed, chunk number): chunks are independent
        # of which other chunks were drawn before them.
        g = _generator(seed * 1_000_003 + lo // GAUSSIAN_CHUNK)
        parts.append(torch.randn(k, width, generator=g) / math.sqrt(k))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@functools.lru_cache(maxsize=16)
def _gaussian_matrix_cpu(d: int, k: int, seed: int) -> torch.Tensor:
    return gaussian_chunk(d, k, 0, d, seed).contiguous()


def gaussian_matrix(d: int, k: int, *, seed: int = 0, device=None) -> torch.Tensor:
    """The dense N(0, 1/k) matrix that projects ``d`` inputs to ``k`` outputs (``gaussian``,
    and LoGra's p_in / p_out).

    Arguments:
        d       int > 0, input dimension
        k       int > 0, output dimension
        seed    int, the matrix's seed
        device  where the matrix lives (default the CPU); the same matrix on every device
    Returns:
        matrix  float32 (k, d); a projection is x @ matrix.T
    """
    d = _checks.positive_int("d", d)
    k = _checks.positive_int("k", k)
    device = torch.device("cpu") if device is None else torch.device(device)
    return _on_device(("gaussian", d, k, seed), _gaussian_matrix_cpu(d, k, int(seed)), device)
