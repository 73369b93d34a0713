"""The one reference sweep of grass_kernels' public ops: device x backend x dtype x shape.

``SHAPES`` is the kernel tests' one shape table and ``random_tensor`` their one random-tensor
helper. ``cases()`` expands them into the cases of test_sweep.py: every public op (flat: sjlt,
sjlt_transpose, mask, grass, gaussian; per linear layer: linear_grads, logra, fact_grass,
fact_sjlt) on every device
(cpu; cuda, which skips with its reason where there is no GPU), through every backend present
for that op there (the native kernel, Triton: interpreted on the CPU, compiled on a GPU), for
fp32, bf16 and fp16 inputs, on every shape of its family. ``check(case)`` runs one case through
the public op, for each of the shape's variants (memory layouts of x; token masks and the bias
column for the factorized ops), and asserts

- dispatch: exactly the implementation asked for ran, once, and the pure-torch reference did not
  (recorded as in test_dispatch.py); mask, gaussian and linear_grads are torch ops and run no
  kernel;
- form: an fp32 result of the documented shape;
- value: the relative error against the oracle within ``bound`` (the tolerance rule below).

The oracle is each op's linear map written out in torch in float64, on the same (rounded) inputs
the kernel reads: a flat op is x -> x M^T with M the dense matrix of the map; a factorized op is
G_i -> vec(L G_i R^T), then a flat map F for fact_grass, with G_i the per-example gradient
formed here in float64 (linear_grads' own oracle) and L, R the two side maps (projections,
SJLTs or row selections). The tables come from grass_kernels' table makers, which
test_statistics.py checks on their own.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import pytest
import torch
from conftest import DTYPES, backends_for, rel_err
from test_dispatch import implementations_run

import grass_kernels as gk
from grass_kernels import _backend, _tables

# Every device is swept; those absent here skip with the reason.
DEVICES = ("cpu", "cuda")
FLAT_OPS = ("sjlt", "sjlt_transpose", "mask", "grass", "gaussian")
# The ops on a linear layer's (acts, grads): its per-example gradient and the factorized maps.
FACTORIZED_OPS = ("linear_grads", "logra", "fact_grass", "fact_sjlt")
# mask, gaussian and linear_grads are torch ops (a gather, GEMMs): no backend argument and no
# kernel.
TORCH = "torch"

# The tolerance rule. A kernel that accumulates in fp32 differs from the float64 oracle on the
# same rounded inputs only by fp32 rounding, ~1e-7 * sqrt(terms per output) relative: far
# below FP32_RTOL at the tested sizes, whatever the input dtype. One missing term of an output
# (a bucket, a token, a column) moves it by far more.
FP32_RTOL = 1e-5
# A kernel that multiplies in 16 bits is held to flash-attention's rule instead: its error is
# at most LOWP_MULTIPLE times the error of the same computation done by torch at the input's
# precision (``lowp_output``), plus FP32_RTOL.
LOWP_MULTIPLE = 2
# Unit roundoff (half an ulp at 1) of the 16-bit formats.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def multiplies_in_16_bits(op: str, dtype: torch.dtype, device: str, backend: str) -> bool:
    """Whether the implementation rounds to 16 bits (or TF32) on the way to its fp32 sums.

    Only the compiled Triton factorized kernels on 16-bit inputs do (tensor-core dots): logra
    rounds its fp32 projections to the input's dtype and multiplies them in TF32; fact_sjlt
    multiplies its fp32 sketches in TF32; fact_grass rounds a float token mask times the
    gradient to the input's dtype. Every other kernel multiplies and adds in fp32."""
    compiled_triton = (backend == "triton" and device == "cuda"
                       and os.environ.get("TRITON_INTERPRET") != "1")
    return compiled_triton and dtype in UNIT_ROUNDOFF and op in ("logra", "fact_sjlt", "fact_grass")


def bound(case: "Case", lowp_err: float | None) -> float:
    """The largest relative error ``case`` may have (``lowp_err``: that of ``lowp_output``)."""
    if multiplies_in_16_bits(case.op, case.dtype, case.device, case.backend):
        return LOWP_MULTIPLE * lowp_err + FP32_RTOL
    return FP32_RTOL


# --- the shape table ---------------------------------------------------------------------------

# Factorized variants: (token mask kind, bias column).
MASK_BIAS = tuple((mask, bias) for mask in (None, "bool", "float") for bias in (False, True))
# Fewer where six would cost too much: the plain call and the hardest one (bias column and a
# fractional mask); under the Triton interpreter, where it is slowest, the hardest alone.
TWO = ((None, False), ("float", True))
WITH_BIAS = tuple((mask, True) for mask in (None, "bool", "float"))
HARDEST = (("float", True),)
# Memory layouts of a flat op's input (see ``with_layout``).
ALL_LAYOUTS = ("contiguous", "transposed", "column_step", "row_step", "offset", "padded")
# The CUDA kernels' load paths: rows unaligned (scalar loads), aligned with a ragged tail
# (vector loads), read through a column stride.
CUDA_LOADS = ("contiguous", "offset", "padded", "transposed")


@dataclass(frozen=True)
class Shape:
    """One row of the shape table.

    Flat ops read x (b * t, d_in) (y (b * t, k) for sjlt_transpose; t = None counts as 1);
    factorized ops read acts (b, t, d_in) and grads (b, t, d_out), or the 2-D (b, d_in) and
    (b, d_out) when t is None. k and c size sjlt, sjlt_transpose, grass, gaussian and
    fact_grass; k_in and k_out (multiples of c) the sides of logra and fact_sjlt; keep_in and
    keep_out the index sets of mask, grass (keep_in of d_in) and fact_grass (of d_in' and
    d_out, each capped at its dimension). Variants: flat ops run every layout in ``layouts``,
    factorized ops every (token mask, bias) in ``mask_bias``. ``interpreter`` says what runs
    under the Triton interpreter, which is slow: every variant ("all"), TWO or HARDEST
    factorized variants ("two", "hardest"; flat ops run their layouts), the flat ops alone
    ("flat"), or nothing ("none"). ``devices``: the paths of the CUDA kernels that only large
    sizes reach are swept on CUDA alone (every variant: they cost the CPU suite nothing).
    """

    name: str
    why: str
    b: int
    t: int | None
    d_in: int
    d_out: int
    k: int
    c: int
    k_in: int
    k_out: int
    keep_in: int
    keep_out: int
    families: tuple[str, ...] = ("flat", "factorized")
    interpreter: str = "none"
    layouts: tuple[str, ...] = ("contiguous",)
    mask_bias: tuple = MASK_BIAS
    devices: tuple[str, ...] = ("cpu", "cuda")

    @property
    def rows(self) -> int:
        return self.b * (self.t or 1)


FLAT = ("flat",)
FACTORIZED = ("factorized",)
CUDA_ONLY = ("cuda",)
SHAPES = {s.name: s for s in [
    #     name  why  b  t  d_in  d_out  k  c  k_in  k_out  keep_in  keep_out
    Shape("one-row", "N = B = 1, 2-D inputs (T = 1), odd sizes inside one tile",
          1, None, 37, 23, 8, 1, 7, 5, 9, 6, interpreter="flat"),
    Shape("2d", "2-D inputs (T = 1), B = 5",
          5, None, 37, 23, 64, 2, 8, 4, 9, 6, families=FACTORIZED, interpreter="two"),
    Shape("odd", "odd D over many column tiles, c = 3",
          5, None, 1001, 45, 24, 3, 9, 6, 334, 7, interpreter="flat", mask_bias=TWO),
    Shape("c4", "c = 4, D past two 1024-wide tiles",
          3, None, 2053, 29, 64, 4, 8, 4, 685, 9, interpreter="flat", mask_bias=TWO),
    Shape("layouts", "every memory layout of x and y, on every backend",
          6, None, 517, 9, 32, 2, 8, 4, 173, 5, families=FLAT, interpreter="all",
          layouts=ALL_LAYOUTS),
    Shape("wide-row", "one row: 4096 columns per Triton program",
          1, None, 5003, 11, 24, 4, 8, 4, 1668, 5, families=FLAT, interpreter="all"),
    Shape("wide-row-c1", "one row, c = 1",
          1, None, 5003, 11, 24, 1, 8, 4, 1668, 5, families=FLAT, interpreter="all"),
    Shape("rows-70", "70 rows: two Triton row blocks of 64",
          70, None, 150, 11, 24, 1, 8, 4, 50, 5, families=FLAT, interpreter="all"),
    Shape("rows-70-c4", "70 rows, c = 4",
          70, None, 150, 11, 24, 4, 8, 4, 50, 5, families=FLAT, interpreter="all"),
    Shape("t=1", "3-D inputs with T = 1",
          3, 1, 17, 9, 32, 1, 5, 4, 5, 4, families=FACTORIZED, interpreter="two", mask_bias=TWO),
    Shape("d_out=1", "one output feature",
          4, 9, 33, 1, 16, 2, 8, 2, 9, 1, families=FACTORIZED, interpreter="all"),
    Shape("tokens", "T = 7, c = 3; fact_grass keeps every column on both sides",
          3, 7, 45, 29, 48, 3, 39, 15, 46, 29, families=FACTORIZED, interpreter="two",
          mask_bias=TWO),
    Shape("tokens-odd", "T = 17, d past the CPU kernel's 8- and 32-wide panels",
          3, 17, 70, 45, 64, 2, 8, 4, 9, 6, families=FACTORIZED),
    Shape("tiles", "3 T-tiles of 64 and a tail, d in 32-steps with tails, 2 output tiles a side",
          2, 150, 70, 66, 48, 2, 70, 64, 71, 65, families=FACTORIZED, interpreter="hardest",
          mask_bias=TWO),
    Shape("panels-dense", "CPU fact_grass: kept columns dense in their rows, several 8- and "
          "32-wide panels and a partial last one", 3, 37, 70, 45, 64, 2, 8, 4, 41, 19,
          families=FACTORIZED, mask_bias=WITH_BIAS),
    Shape("panels-sparse", "CPU fact_grass: kept columns sparse in their rows (gathered "
          "column by column)", 2, 29, 1500, 1100, 64, 2, 8, 4, 71, 21,
          families=FACTORIZED, mask_bias=WITH_BIAS),
    Shape("panels-mixed", "CPU fact_grass: T past one 512-token tile, sparse inputs, dense "
          "outputs", 2, 600, 1500, 45, 64, 2, 8, 4, 33, 9,
          families=FACTORIZED, mask_bias=WITH_BIAS),
    Shape("long", "T = 1000 through a small layer",
          2, 1000, 19, 13, 64, 2, 8, 4, 9, 6, families=FACTORIZED),
    Shape("threads", "rows split evenly over CPU threads",
          16, None, 5003, 11, 32, 2, 8, 4, 1668, 5, families=FLAT),
    Shape("many-rows", "many rows, c = 5",
          37, None, 2001, 13, 40, 5, 10, 5, 668, 5, families=FLAT),
    Shape("d-split", "few rows: D split over CPU threads with partial sums",
          3, None, 70001, 5, 128, 1, 8, 4, 23334, 3, families=FLAT),
    Shape("big-table", "an SJLT table too large for one CPU tile, c = 4",
          2, None, 90001, 7, 96, 4, 8, 4, 30001, 3, families=FLAT),
    Shape("k=1", "k = c = 1",
          7, None, 333, 3, 1, 1, 1, 1, 112, 1),
    Shape("unit", "every size 1",
          1, None, 1, 1, 1, 1, 1, 1, 1, 1),
    Shape("vector-rows", "CUDA rows per block with a ragged last group, every load path",
          5, None, 1003, 7, 64, 4, 8, 4, 334, 3, families=FLAT, layouts=CUDA_LOADS,
          devices=CUDA_ONLY),
    Shape("many-chunks", "CUDA: many chunks per row, k = 512",
          9, None, 70001, 7, 512, 2, 8, 4, 23334, 3, families=FLAT, layouts=CUDA_LOADS,
          devices=CUDA_ONLY),
    Shape("aligned-64000", "CUDA: 16-byte-aligned rows (vector loads), k = 1024",
          7, None, 64000, 7, 1024, 2, 8, 4, 21333, 3, families=FLAT, layouts=CUDA_LOADS,
          devices=CUDA_ONLY),
    Shape("c=k", "c = k = 96",
          3, None, 4099, 7, 96, 96, 96, 96, 1366, 3, families=FLAT, layouts=CUDA_LOADS,
          devices=CUDA_ONLY),
    Shape("k-65536-flat", "CUDA: k too large for shared memory, global atomics",
          2, None, 333, 7, 65536, 2, 8, 4, 111, 3, families=FLAT, layouts=CUDA_LOADS,
          devices=CUDA_ONLY),
    Shape("bias-selected", "CUDA: many token splits, a ragged last one; bias column selected",
          2, 1000, 40, 33, 256, 4, 16, 8, 41, 16, families=FACTORIZED, devices=CUDA_ONLY),
    Shape("d_out=1-wide", "CUDA: several 128-tiles of inputs, one output; bias selected",
          2, 77, 300, 1, 128, 2, 8, 2, 257, 1, families=FACTORIZED, devices=CUDA_ONLY),
    Shape("c=k-fact", "CUDA: c = k = 64, ragged 128-tiles on both sides",
          1, 45, 200, 260, 64, 64, 64, 64, 150, 140, families=FACTORIZED, devices=CUDA_ONLY),
    Shape("k-65536-fact", "CUDA: k too large for shared memory",
          2, 5, 30, 20, 65536, 1, 8, 4, 10, 10, families=FACTORIZED, devices=CUDA_ONLY),
]}


# gaussian is a dense GEMM in torch: swept where its (k, D) matrix is small.
GAUSSIAN_MAX_ENTRIES = 1 << 22


def ops_of(shape: Shape) -> tuple[str, ...]:
    flat = tuple(op for op in FLAT_OPS
                 if op != "gaussian" or shape.k * shape.d_in <= GAUSSIAN_MAX_ENTRIES)
    return (flat if "flat" in shape.families else ()) + (
        FACTORIZED_OPS if "factorized" in shape.families else ())


# --- inputs -----------------------------------------------------------------------------------


def random_tensor(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0) -> torch.Tensor:
    """Standard normal values times ``scale``, rounded to ``dtype``, drawn on ``device`` by a
    generator seeded with ``seed`` (the same call gives the same tensor)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def token_mask(kind: str | None, b: int, t: int, device="cpu", seed=0) -> torch.Tensor | None:
    """(b, t) token mask: None, "bool" (~70% kept) or "float" (kept tokens weighted in [0.5, 1));
    every example keeps its first token, so no reference norm is zero."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, t, generator=g) > 0.3
    keep[:, 0] = True
    mask = keep if kind == "bool" else keep * (0.5 + 0.5 * torch.rand(b, t, generator=g))
    return mask.to(device)


def layer_inputs(b, t, d_in, d_out, dtype=torch.float32, device="cpu", mask=None, seed=0):
    """acts (b, t, d_in), grads (b, t, d_out) (2-D when t is None) and a token mask of kind
    ``mask`` (b, t or 1)."""
    dims = (b,) if t is None else (b, t)
    acts = random_tensor((*dims, d_in), dtype, device, seed=seed)
    grads = random_tensor((*dims, d_out), dtype, device, seed=seed + 1)
    return acts, grads, token_mask(mask, b, t or 1, device, seed=seed + 2)


# Fill of the memory around a strided view: a kernel that reads outside the view picks it up.
OUTSIDE = 1000.0


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view holding x's values (x: (N, D)) with the given memory layout."""
    n, d = x.shape
    if layout == "contiguous":
        return x
    if layout == "transposed":  # column-major: inner stride N
        return x.T.contiguous().T
    shapes = {"column_step": (n, 2 * d + 3), "row_step": (2 * n, d + 5),
              "offset": (n, d + 3), "padded": (n, d - d % 8 + 16)}
    buffer = torch.full(shapes[layout], OUTSIDE, dtype=x.dtype, device=x.device)
    view = {"column_step": buffer[:, 1 : 2 * d + 1 : 2],  # inner stride 2
            "row_step": buffer[::2, :d],  # row stride 2 (D + 5)
            "offset": buffer[:, 1 : d + 1],  # rows start one element past alignment
            "padded": buffer[:, :d]}[layout]  # rows 16-byte aligned, D not a multiple of 8
    view.copy_(x)
    return view


# --- the maps: in float64, or dense at the inputs' precision ---------------------------------


@functools.lru_cache(maxsize=16)
def _decoded(d: int, k: int, c: int, seed: int, scale: float, device: str) -> tuple:
    """Buckets (int64) and weights (float64 sign * scale / sqrt(c)) of an SJLT table, (d, c)."""
    buckets, signs = _tables.decode_codes(gk.sjlt_codes(d, k, c=c, seed=seed))
    weights = signs.double() * (scale / math.sqrt(c))
    return buckets.to(device), weights.to(device)


@dataclass(frozen=True)
class Sketch:
    """The SJLT(k, c) of ``seed`` on R^d (times ``scale``), from the table grass_kernels serves:
    applied by its definition, y[h_j(i)] += s_j(i) z_i / sqrt(c), in float64 (``__call__``,
    ``transpose``), or as a dense (k, d) matrix (``dense``)."""

    d: int
    k: int
    c: int
    seed: int
    scale: float = 1.0

    def _table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return _decoded(self.d, self.k, self.c, self.seed, self.scale, str(device))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., k) float64."""
        buckets, weights = self._table(z.device)
        values = z.double().unsqueeze(-1) * weights  # (..., d, c)
        out = torch.zeros(*z.shape[:-1], self.k, dtype=torch.float64, device=z.device)
        return out.index_add_(-1, buckets.flatten(), values.flatten(-2))

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint: (..., k) -> (..., d) float64."""
        buckets, weights = self._table(y.device)
        return (y.double()[..., buckets] * weights).sum(-1)

    def dense(self, dtype: torch.dtype, device) -> torch.Tensor:
        buckets, weights = self._table(device)
        columns = torch.arange(self.d, device=device).unsqueeze(1).expand_as(buckets)
        matrix = torch.zeros(self.k, self.d, dtype=torch.float64, device=device)
        return matrix.index_put_((buckets, columns), weights, accumulate=True).to(dtype)


def apply_side(side, z: torch.Tensor) -> torch.Tensor:
    """A map applied to the last axis of z: an int64 index set picks those entries; a float
    matrix M (rows, d) maps z to z @ M^T; a Sketch sketches (exactly for float64 z, else as a
    dense matrix in z's dtype). The result is in z's dtype."""
    if isinstance(side, Sketch):
        return side(z) if z.dtype == torch.float64 else z @ side.dense(z.dtype, z.device).T
    if not side.is_floating_point():
        return z[..., side]
    return z @ side.to(z.dtype).T


def indices(d: int, keep: int, seed: int, device="cpu") -> torch.Tensor:
    return gk.random_indices(d, min(keep, d), seed=seed).to(device)


# --- running one case -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    device: str
    backend: str
    dtype: torch.dtype
    shape: Shape

    def variants(self) -> tuple:
        if self.op in FLAT_OPS:
            return self.shape.layouts
        if self.backend == "triton" and self.device == "cpu":
            return {"two": TWO, "hardest": HARDEST}.get(self.shape.interpreter,
                                                        self.shape.mask_bias)
        return self.shape.mask_bias


def _kernel_kw(backend: str) -> dict:
    return {} if backend == TORCH else {"backend": backend}


def _flat_call(case: Case, inp: torch.Tensor) -> tuple:
    """(call of the public op, its map: a function of inp.double(), float64 out)."""
    s, kw, dev = case.shape, _kernel_kw(case.backend), inp.device
    if case.op == "sjlt":
        return (lambda: gk.sjlt(inp, s.k, c=s.c, seed=7, **kw)), Sketch(s.d_in, s.k, s.c, 7)
    if case.op == "sjlt_transpose":
        return ((lambda: gk.sjlt_transpose(inp, s.d_in, c=s.c, seed=3, **kw)),
                Sketch(s.d_in, s.k, s.c, 3).transpose)
    if case.op == "gaussian":
        matrix = gk.gaussian_matrix(s.d_in, s.k, seed=2).double().to(dev)
        return (lambda: gk.gaussian(inp, s.k, seed=2)), (lambda z: z @ matrix.T)
    idx = indices(s.d_in, s.keep_in, seed=4, device=dev)
    scale = math.sqrt(s.d_in / idx.numel())
    if case.op == "mask":
        return (lambda: gk.mask(inp, idx)), (lambda z: z[:, idx] * scale)
    sketch = Sketch(idx.numel(), s.k, s.c, 5, scale)
    return ((lambda: gk.grass(inp, s.k, indices=idx, c=s.c, seed=5, **kw)),
            (lambda z: sketch(z[:, idx])))


def per_example_gradient(acts, grads, mask, bias: bool) -> torch.Tensor:
    """G_i = sum_t m_t delta_t x_t^T in float64, (B, d_out, d_in + bias); 2-D inputs are T = 1."""
    x, g = acts.double(), grads.double()
    if x.dim() == 2:
        x, g = x.unsqueeze(1), g.unsqueeze(1)
    if bias:
        x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=-1)
    if mask is not None:
        x = x * mask.double().unsqueeze(-1)
    return torch.einsum("bto,bti->boi", g, x)


def factorized_call(case: Case, acts, grads, mask, bias: bool, **options) -> tuple:
    """(call of the public op on these inputs, its maps (L, R, F): out = vec(L G_i R^T) @ F^T,
    F None = I; L, R and F as in ``apply_side``). The sizes of the maps come from case.shape,
    the dimensions from the tensors; ``options`` (path=, out_dtype=) go to the op."""
    s, dev = case.shape, acts.device
    d_in, d_out = acts.shape[-1] + int(bias), grads.shape[-1]
    common = dict(bias=bias, token_mask=mask, **_kernel_kw(case.backend))
    if case.op == "linear_grads":
        return (lambda: gk.linear_grads(acts, grads, **common)), (None, None, None)
    common = {"path": "factorized", **common, **options}
    if case.op == "logra":
        p_in = gk.gaussian_matrix(d_in, s.k_in, seed=11, device=dev)
        p_out = gk.gaussian_matrix(d_out, s.k_out, seed=12, device=dev)
        call = lambda: gk.logra(acts, grads, p_in=p_in, p_out=p_out, **common)
        return call, (p_out.double(), p_in.double(), None)
    if case.op == "fact_sjlt":
        call = lambda: gk.fact_sjlt(acts, grads, k_in=s.k_in, k_out=s.k_out, c=s.c, seed_in=6,
                                    seed_out=7, **common)
        return call, (Sketch(d_out, s.k_out, s.c, 7), Sketch(d_in, s.k_in, s.c, 6), None)
    idx_in = indices(d_in, s.keep_in, seed=3, device=dev)
    idx_out = indices(d_out, s.keep_out, seed=4, device=dev)
    reduced = idx_in.numel() * idx_out.numel()
    call = lambda: gk.fact_grass(acts, grads, k=s.k, in_indices=idx_in, out_indices=idx_out,
                                 c=s.c, seed=5, **common)
    scale = math.sqrt(d_out * d_in / reduced)
    return call, (idx_out, idx_in, Sketch(reduced, s.k, s.c, 5, scale))


def factorized_oracle(maps, acts, grads, mask, bias: bool) -> torch.Tensor:
    left, right, final = maps
    gradient = per_example_gradient(acts, grads, mask, bias)  # (B, d_out, d_in')
    if left is None:  # linear_grads: G_i itself
        return gradient
    out = apply_side(left, apply_side(right, gradient).transpose(1, 2)).transpose(1, 2)
    out = out.flatten(1)  # (B, k_out * k_in), row-major over (k_out, k_in)
    return out if final is None else apply_side(final, out)


def contract(op: str, shape: str, acts, grads, mask=None, bias=False, backend="cpu",
             **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(the factorized op's output, the oracle's) on these inputs, with the map sizes of the
    table's ``shape``: the contract factorized(X, Delta) == flat map of vec(G_i)."""
    case = Case(op, str(acts.device.type), backend, acts.dtype, SHAPES[shape])
    call, maps = factorized_call(case, acts, grads, mask, bias, **options)
    return call(), factorized_oracle(maps, acts, grads, mask, bias)


def lowp_output(maps, acts, grads, mask, bias: bool) -> torch.Tensor:
    """The factorized op computed by torch at the inputs' precision (every product and sum in
    acts' dtype): each side mapped per token, the outer products summed over tokens, F last."""
    left, right, final = maps
    x, g = (acts, grads) if acts.dim() == 3 else (acts.unsqueeze(1), grads.unsqueeze(1))
    if bias:
        x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=-1)
    if mask is not None:
        x = x * mask.to(x.dtype).unsqueeze(-1)
    out = (apply_side(left, g).transpose(1, 2) @ apply_side(right, x)).flatten(1)
    return out if final is None else apply_side(final, out)


def expected_events(case: Case) -> list[str]:
    if case.backend == TORCH:
        return []
    return [f"{'triton' if case.backend == 'triton' else 'native'}:{case.op}"]


def run_variant(case: Case, variant, lowp: bool | None = None) -> dict:
    """One variant of ``case``: {"events", "out", "expected", "lowp"}. ``lowp`` (a factorized
    op's ``lowp_output``) is computed when asked for, by default when ``bound`` needs it."""
    s, dev = case.shape, case.device
    if lowp is None:
        lowp = multiplies_in_16_bits(case.op, case.dtype, case.device, case.backend)
    if case.op in FLAT_OPS:
        width = s.k if case.op == "sjlt_transpose" else s.d_in
        inp = with_layout(random_tensor((s.rows, width), case.dtype, dev, seed=1), variant)
        call, flat_map = _flat_call(case, inp)
        expected, lowp = flat_map(inp.double()), None
    else:
        mask_kind, bias = variant
        acts, grads, mask = layer_inputs(s.b, s.t, s.d_in, s.d_out, case.dtype, dev,
                                         mask=mask_kind, seed=1)
        call, maps = factorized_call(case, acts, grads, mask, bias)
        expected = factorized_oracle(maps, acts, grads, mask, bias)
        lowp = lowp_output(maps, acts, grads, mask, bias) if lowp else None
    result = {}
    result["events"] = implementations_run(lambda: result.setdefault("out", call()))
    return {**result, "expected": expected, "lowp": lowp}


def check_variant(case: Case, variant, run: dict) -> None:
    """The three assertions of the module doc for one variant's ``run_variant`` result."""
    out, expected = run["out"], run["expected"]
    where = f"{case.op} {case.backend} {case.dtype} {case.shape.name} {variant}"
    assert run["events"] == expected_events(case), f"dispatch: {where} ran {run['events']}"
    assert out.dtype == torch.float32 and out.shape == expected.shape, (
        f"form: {where} gave {out.dtype} {tuple(out.shape)}")
    assert float(expected.abs().sum()) > 0, where  # never compare zeros
    lowp_err = None if run["lowp"] is None else rel_err(run["lowp"], expected)
    err, most = rel_err(out, expected), bound(case, lowp_err)
    assert err < most, f"value: {where}: relative error {err:.3g} above the bound {most:.3g}"


def check(case: Case) -> None:
    """Run every variant of ``case`` and assert dispatch, form and value (see the module doc)."""
    for variant in case.variants():
        check_variant(case, variant, run_variant(case, variant))


# --- the cases --------------------------------------------------------------------------------


def backends(op: str, device: str) -> list[str]:
    return [TORCH] if op not in _backend.OPS else backends_for(device, op)


def _skip_reason(case: Case) -> str | None:
    if case.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if case.backend == "cuda" and not _backend.AVAILABLE.cuda_kernels:
        return "the native extension was built without its CUDA kernels"
    if case.backend == "triton" and not _backend.AVAILABLE.triton:
        return "Triton is not installed"
    return None


def _runs(case: Case) -> bool:
    """Whether the sweep holds ``case``. The Triton interpreter runs only the shapes and ops
    sized for it (on CUDA, Triton runs compiled, every shape). The torch ops (no kernel of
    ours) run on those small shapes only."""
    shape = case.shape
    small = shape.interpreter != "none"
    if case.device not in shape.devices or (case.backend == TORCH and not small):
        return False
    if case.backend == "triton" and case.device == "cpu":
        return (os.environ.get("TRITON_INTERPRET") == "1" and small
                and (shape.interpreter != "flat" or case.op in FLAT_OPS))
    return True


def cases() -> list:
    """pytest params of every case of the sweep, skips marked with their reason."""
    params = []
    for shape in SHAPES.values():
        for op in ops_of(shape):
            for device in DEVICES:
                for backend in backends(op, device):
                    for dtype in DTYPES:
                        case = Case(op, device, backend, dtype, shape)
                        if not _runs(case):
                            continue
                        reason = _skip_reason(case)
                        marks = [pytest.mark.skip(reason=reason)] if reason else []
                        name = str(dtype).removeprefix("torch.")
                        params.append(pytest.param(
                            case, marks=marks, id=f"{op}-{device}-{backend}-{name}-{shape.name}"))
    return params
