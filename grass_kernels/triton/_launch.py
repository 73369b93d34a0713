"""Host-side helpers shared by the Triton launchers: argument checks at the op boundary, the
choice of tile sizes, and how many programs share one example's tokens.

The checks here are the set the native kernels make at their boundary, with the same exception
classes: dtypes, shapes and devices (which run on FakeTensors too), and the range of every
table and index set (``check_ranges``, with the native kernels' messages), so a direct
``torch.ops.grass_triton`` call never reads or writes out of bounds.
"""

from __future__ import annotations

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

from .. import _checks

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a triton without the interpreter module
    InterpretedFunction = ()

# Launch parameters, chosen so that every kernel compiles for sm_90 without register spills
# at 16-bit inputs (tests/test_triton.py checks ptxas -v on the Triton output) and keeps whole
# 64-wide tiles for tl.dot.
# Factorized kernels: tokens per tile, the d-step of the projections, the largest tile
# along k (tl.dot needs every dimension >= 16), and 8 warps / 2 pipeline stages (three
# 64 x 64 fp32 tiles, two projections and the accumulator, spill from 4 warps or 3 stages).
# fp32 inputs take IEEE products on FMA units and LoGra then spills ~1 KB a thread: fp32 is
# the exact path, the 16-bit one is the fast path.
BLOCK_T = 64
BLOCK_D = 32
MAX_BLOCK_K = 64
MIN_DOT = 16
DOT_WARPS = 8
DOT_STAGES = 2
# Flat kernels: rows per tile, elements per tile (rows x columns), warps (16 elements and
# their 64-bit pointers per thread: 92 registers).
MAX_BLOCK_N = 64
FLAT_TILE = 4096
FLAT_WARPS = 8


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs under the Triton interpreter (TRITON_INTERPRET=1 at definition)."""
    return isinstance(kernel, InterpretedFunction)


def native_dot(kernel, acts: torch.Tensor, grads: torch.Tensor) -> bool:
    """Multiply 16-bit inputs in their own dtype (tensor cores), except under the interpreter
    (its bf16 dot is broken) and when acts and grads disagree on the dtype."""
    return (
        not interpreted(kernel)
        and acts.dtype in (torch.bfloat16, torch.float16)
        and grads.dtype == acts.dtype
    )


def block_k(k: int) -> int:
    return max(MIN_DOT, min(MAX_BLOCK_K, triton.next_power_of_2(k)))


def flat_grid(n: int, cols: int) -> tuple[tuple[int, int], int, int]:
    """Grid and tile of a flat kernel over n rows and ``cols`` columns (or mask positions):
    ((column blocks, row blocks), BN, BD). A tile holds all rows up to 64, so each table
    entry is decoded once per 64 rows, and ~4096 elements. Column blocks go on grid axis 0,
    the only one that may pass 65535 programs."""
    bn = min(MAX_BLOCK_N, triton.next_power_of_2(max(n, 1)))
    bd = FLAT_TILE // bn
    return (triton.cdiv(cols, bd), triton.cdiv(n, bn)), bn, bd


def token_splits(device: torch.device, programs_per_split: int, t: int) -> int:
    """How many programs share one example's tokens (grid axis 1).

    On a GPU: enough to give every SM two programs, at most one per T-tile. Each extra split
    costs one more atomic flush of the program's tile, which is small next to its share of
    X and Delta. Elsewhere (the interpreter runs programs one after another) one.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(t, BLOCK_T), triton.cdiv(2 * sms, programs_per_split)))


def check_matrix(name: str, t: torch.Tensor) -> None:
    _checks.floating(name, t)
    _checks.ndim(name, t, (2,), "(N, D)")


def check_codes(name: str, codes: torch.Tensor, rows: int | None, ref: torch.Tensor) -> None:
    """codes: int32 (rows, c) (any rows >= 1 if None) on ref's device, < 2**31 entries."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 torch.Tensor (an SJLT table); got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    expected = "D" if rows is None else rows
    shape_ok = codes.dim() == 2 and min(codes.shape) >= 1
    if not shape_ok or (rows is not None and codes.shape[0] != rows):
        raise ValueError(f"{name} must have shape ({expected}, c) with c >= 1; got "
                         f"{tuple(codes.shape)}")
    if codes.numel() >= 2**31:
        raise ValueError(f"{name} must have fewer than 2**31 entries; got {codes.numel()}")
    _checks.same_device(name, codes, "the input", ref)


def check_k(k: int, codes: torch.Tensor, name: str = "k") -> None:
    """k outputs for codes with c copies per coordinate: 1 <= c <= k (ValueError), in the words
    of the native kernels' check."""
    if k < 1:
        raise ValueError(f"{name} must be positive, got {k}")
    if codes.shape[1] > k:
        raise ValueError(f"codes has c = {codes.shape[1]} copies per coordinate but {name} = "
                         f"{k} (need c <= {name})")


def check_ranges(*checks: tuple[str, torch.Tensor, int, str | None]) -> None:
    """ValueError naming the first table with a value out of range, before any kernel reads it.

    Each check is (name, values, limit, k_name): an int64 index tensor (k_name None) must lie in
    [0, limit); an int32 SJLT table (k_name the name of its k) must decode to buckets in
    [0, limit). One min/max reduction per table and one device-to-host copy for all of them.
    The messages are those of the native kernels, so every backend rejects a table alike.
    FakeTensors carry no values and are not checked.
    """
    live = [ch for ch in checks if ch[1].numel() > 0]
    if not live or any(is_fake(values) for _, values, _, _ in live):
        return
    bounds = torch.stack([torch.stack(torch.aminmax(values)).to(torch.int64)
                          for _, values, _, _ in live]).cpu().tolist()
    for (name, _, limit, k_name), (lo, hi) in zip(live, bounds):
        if k_name is not None:
            top = max(hi, ~lo)  # the most negative code ~b holds the largest negated bucket
            if top >= limit:
                raise ValueError(f"{name} must hold buckets in [0, {k_name} = {limit}); found "
                                 f"bucket {top}")
        elif lo < 0 or hi >= limit:
            raise ValueError(f"{name} must lie in [0, {limit}), got values in [{lo}, {hi}]")


def check_projection(name: str, p: torch.Tensor, width: int, ref: torch.Tensor) -> None:
    """p: float (k, width) on ref's device (LoGra's P_in / P_out)."""
    check_matrix(name, p)
    if p.shape[1] != width or p.shape[0] < 1:
        raise ValueError(f"{name} must have shape (k, {width}) with k >= 1; got {tuple(p.shape)}")
    _checks.same_device(name, p, "acts", ref)


def check_index(name: str, idx: torch.Tensor, ref: torch.Tensor) -> None:
    """idx: non-empty int64 (n,) on ref's device (values: ``check_ranges``)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 torch.Tensor; got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.dim() != 1 or idx.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D tensor; got shape {tuple(idx.shape)}")
    _checks.same_device(name, idx, "acts", ref)


def check_linear(acts: torch.Tensor, grads: torch.Tensor, token_mask) -> None:
    """acts (B, T, d_in), grads (B, T, d_out), token_mask None or fp32 (B, T)."""
    _checks.floating("acts", acts)
    _checks.floating("grads", grads)
    _checks.ndim("acts", acts, (3,), "(B, T, d_in)")
    _checks.ndim("grads", grads, (3,), "(B, T, d_out)")
    _checks.same_device("grads", grads, "acts", acts)
    if acts.shape[:2] != grads.shape[:2]:
        raise ValueError(f"acts and grads must agree on (B, T); got {tuple(acts.shape)} and "
                         f"{tuple(grads.shape)}")
    if token_mask is not None:
        if token_mask.dtype != torch.float32:
            raise TypeError(f"token_mask must be float32; got {token_mask.dtype}")
        if tuple(token_mask.shape) != tuple(acts.shape[:2]):
            raise ValueError(f"token_mask must have shape (B, T) = {tuple(acts.shape[:2])}; got "
                             f"{tuple(token_mask.shape)}")
        _checks.same_device("token_mask", token_mask, "acts", acts)


def mask_strides(token_mask) -> tuple[int, int]:
    return (0, 0) if token_mask is None else (token_mask.stride(0), token_mask.stride(1))


def outer_launch(kernel, acts: torch.Tensor, grads: torch.Tensor, k_out: int, k_in: int,
                 token_mask, bias: bool, splits: int | None) -> tuple[tuple, dict]:
    """Grid and launch parameters of a (k_out x k_in)-per-example kernel (LoGra, FactSJLT,
    ``_tiles.outer_sketch_program``): grid (B, token splits, output tiles)."""
    b, t = acts.shape[:2]
    bko, bki = block_k(k_out), block_k(k_in)
    tiles = triton.cdiv(k_out, bko) * triton.cdiv(k_in, bki)
    if splits is None:
        splits = token_splits(acts.device, b * tiles, t)
    meta = dict(
        BIAS=bias, HAS_MASK=token_mask is not None, NATIVE=native_dot(kernel, acts, grads),
        ATOMIC=splits > 1, BT=BLOCK_T, BD=BLOCK_D, BKO=bko, BKI=bki,
        num_warps=DOT_WARPS, num_stages=DOT_STAGES,
    )
    return (b, splits, tiles), meta
