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

_SEED_MASK = (1 << 63) - 1
# Gaussian matrices are drawn in column chunks of this width, each from its own generator,
# so a matrix can be produced piecewise (it is far too large to hold at D = 1e6, k = 4096)
# and the same (k, d, seed) gives the same matrix whether it is cached or streamed.
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


def sjlt_codes(d: int, k: int, c: int = 1, seed: int = 0, device=None) -> torch.Tensor:
    """The SJLT table for ``d`` inputs and ``k`` outputs: int32 (d, c), see the module doc.

    Sizes are assumed valid (``grass_kernels._checks.sjlt_sizes`` checks them).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    cpu_table = _sjlt_codes_cpu(int(d), int(k), int(c), int(seed))
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
    """A uniform random subset of ``[0, d)`` of size ``k``: sorted int64 (k,)."""
    from ._checks import positive_int

    d = positive_int("d", d)
    k = positive_int("k", k)
    if k > d:
        raise ValueError(f"k must be at most d = {d} (a subset of [0, d)); got k = {k}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _on_device(("indices", d, k, seed), _random_indices_cpu(d, k, int(seed)), device)


def gaussian_chunk(k: int, d: int, start: int, stop: int, seed: int) -> torch.Tensor:
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
def _gaussian_matrix_cpu(k: int, d: int, seed: int) -> torch.Tensor:
    return gaussian_chunk(k, d, 0, d, seed).contiguous()


def gaussian_matrix(k: int, d: int, *, seed: int = 0, device=None) -> torch.Tensor:
    """The dense (k, d) N(0, 1/k) projection matrix (fp32) behind ``gaussian`` and LoGra."""
    from ._checks import positive_int

    k = positive_int("k", k)
    d = positive_int("d", d)
    device = torch.device("cpu") if device is None else torch.device(device)
    return _on_device(("gaussian", k, d, seed), _gaussian_matrix_cpu(k, d, int(seed)), device)
