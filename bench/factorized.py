"""Factorized ops on the CPU against their torch baselines, per linear layer.

Shapes: GPT-2-small and Llama-3.1-8B linear layers, B x T = 4 x 256 tokens, fp32, k = 4096
(LoGra 64 x 64, FactGraSS 128 x 128 -> 4096 with c = 1, FactSJLT 64 x 64). Every number in a
row is measured side by side in one process (medians over 15 rounds that run every side in
turn, ``bench.timing.interleaved_ms``), under the malloc thresholds of
``bench.timing.MALLOC_ENV`` (``python -m bench`` sets them).

Baselines (same method as a fused op: logra_torch for ``logra``, unfused for ``fact_grass``;
the ratios of one method against another are labelled "cross-method"):
    logra_torch    LoGra in plain torch: X P_in^T, Delta P_out^T, einsum of the outer products
    unfused        FactGraSS unfused in torch, its strong form: index_select on the 2-D (B*T, d)
                   views, bmm to (B, 128, 128), index_add_ into the SJLT buckets
    materialise    G_i = Delta_i^T X_i for all examples (bmm to B x d_out x d_in): only the first
                   step of "materialise, then Gaussian-project"; the projection needs a
                   k x d_out*d_in matrix (9.7 GB at 768 x 768, 940 GB at 4096 x 14336) and is
                   not run, so this column is a lower bound of that baseline's time
    read           the floor: one read of X and Delta, X.sum() + Delta.sum()

Peak extra memory (``peak_extra_bytes``): torch's profiler with profile_memory=True records
every allocation and free of ATen's CPU allocator with its size and time; the peak of the
running sum over the call is the most memory the call held at once beyond what existed before
(outputs included). The fused kernels take their workspace from the same allocator, so it is
counted like any baseline temporary. Memory MKL allocates inside a GEMM is not seen, for any
side.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable

import torch

import grass_kernels as gk
from grass_kernels import _tables
from grass_kernels.factorized import _flops

from .timing import interleaved_ms, measure

B, T, K = 4, 256, 4096
LOGRA_K, GRASS_K, SJLT_K = 64, 128, 64
SHAPES = [
    ("gpt2 c_attn", 768, 2304),
    ("gpt2 c_proj", 768, 768),
    ("gpt2 c_fc", 768, 3072),
    ("gpt2 mlp c_proj", 3072, 768),
    ("llama q_proj", 4096, 4096),
    ("llama k_proj", 4096, 1024),
    ("llama up_proj", 4096, 14336),
    ("llama down_proj", 14336, 4096),
]
QUICK_SHAPES = ("gpt2 c_fc", "llama q_proj", "llama up_proj")
# Long sequences through small layers: where the FLOP rule (factorized._flops) should pick
# the materialised path. (d_in = d_out, B, T), fact_sjlt and logra at 64 x 64.
PATH_SHAPES = [(32, 16, 2048), (64, 16, 2048), (256, 4, 1024)]


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silences what native code writes to fd 2 (kineto prints a few status lines per profiler
    session, which would bury the tables); Python exceptions still surface afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by ATen's CPU allocator during ``fn()`` beyond those held before."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def _unfused_fact_grass(acts, grads, idx_in, idx_out, buckets, weights):
    """index_select on the (B*T, d) views, bmm to (B, k_o', k_i'), index_add_ into k."""
    b, t = acts.shape[:2]
    x = acts.reshape(b * t, -1).index_select(1, idx_in).view(b, t, -1)
    g = grads.reshape(b * t, -1).index_select(1, idx_out).view(b, t, -1)
    reduced = torch.bmm(g.transpose(1, 2), x).view(b, -1)
    return torch.zeros(b, K).index_add_(1, buckets, reduced * weights)


def _logra_torch(acts, grads, p_in, p_out):
    return torch.einsum("bto,bti->boi", grads @ p_out.T, acts @ p_in.T).flatten(1)


def _rounds(quick: bool) -> int:
    return 3 if quick else 15


def _row(name: str, d_in: int, d_out: int, quick: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(B, T, d_in, generator=g)
    grads = torch.randn(B, T, d_out, generator=g)
    idx_in = gk.random_indices(d_in, GRASS_K, seed=1)
    idx_out = gk.random_indices(d_out, GRASS_K, seed=2)
    p_in = gk.gaussian_matrix(d_in, LOGRA_K, seed=3)
    p_out = gk.gaussian_matrix(d_out, LOGRA_K, seed=4)
    buckets, signs = _tables.decode_codes(gk.sjlt_codes(GRASS_K * GRASS_K, K, c=1, seed=0))
    weights = signs.view(-1) * math.sqrt(d_in * d_out) / GRASS_K  # mask rescale, c = 1
    sides = {
        "fact_grass": lambda: gk.fact_grass(
            acts, grads, k=K, in_indices=idx_in, out_indices=idx_out
        ),
        "fact_sjlt": lambda: gk.fact_sjlt(
            acts, grads, k_in=SJLT_K, k_out=SJLT_K, path="factorized"
        ),
        "logra": lambda: gk.logra(acts, grads, p_in=p_in, p_out=p_out, path="factorized"),
        "logra_torch": lambda: _logra_torch(acts, grads, p_in, p_out),
        "unfused": lambda: _unfused_fact_grass(
            acts, grads, idx_in, idx_out, buckets.view(-1), weights
        ),
        "read": lambda: acts.sum() + grads.sum(),
    }
    # The fused op is checked against its unfused twin before it is timed.
    assert torch.allclose(sides["fact_grass"](), sides["unfused"](), rtol=1e-4, atol=1e-3)
    ms = interleaved_ms(sides, _rounds(quick))
    if not quick:
        # Timed apart, after the rounds: it writes B x d_out x d_in floats (27-896 MB), which
        # would flush the caches every other side works from in each round.
        sides["materialise"] = lambda: torch.bmm(grads.transpose(1, 2), acts)
        ms["materialise"] = 1e3 * measure(sides["materialise"], warmup=1, repeats=3)
    row = {"layer": f"{name} {d_in}x{d_out}"}
    # Same-method ratios first (one method, fused kernel against its own torch form), then
    # the floor, then the cross-method ones, labelled as such.
    row["logra_torch/logra"] = f"{ms['logra_torch'] / ms['logra']:.2f}x"
    row["unfused/fact_grass"] = f"{ms['unfused'] / ms['fact_grass']:.2f}x"
    row["fact_grass/read"] = f"{ms['fact_grass'] / ms['read']:.2f}"
    row["cross-method logra_torch/fact_grass"] = f"{ms['logra_torch'] / ms['fact_grass']:.1f}x"
    row["cross-method fact_sjlt/fact_grass"] = f"{ms['fact_sjlt'] / ms['fact_grass']:.2f}"
    row.update({f"{side} ms": f"{t:.2f}" for side, t in ms.items()})
    for side in ("fact_grass", "fact_sjlt", "logra", "unfused", "logra_torch", "materialise"):
        if side in sides:
            row[f"{side} peak MB"] = f"{peak_extra_bytes(sides[side]) / 2**20:.1f}"
    return row


def table(quick: bool = False) -> list[dict]:
    """One row per layer shape: ms per op and baseline, ratios, peak extra memory (MB)."""
    shapes = [s for s in SHAPES if not quick or s[0] in QUICK_SHAPES]
    return [_row(name, d_in, d_out, quick) for name, d_in, d_out in shapes]


def path_table(quick: bool = False) -> list[dict]:
    """The FLOP rule's choice against measured times of both paths (fact_sjlt, logra)."""
    rows = []
    for d, b, t in PATH_SHAPES[:2] if quick else PATH_SHAPES:
        g = torch.Generator().manual_seed(0)
        acts, grads = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
        p = gk.gaussian_matrix(d, LOGRA_K, seed=3)
        ops = {
            "fact_sjlt": lambda path: gk.fact_sjlt(
                acts, grads, k_in=SJLT_K, k_out=SJLT_K, path=path
            ),
            "logra": lambda path: gk.logra(acts, grads, p_in=p, p_out=p, path=path),
        }
        for op, fn in ops.items():
            paths = {path: (lambda path=path: fn(path)) for path in ("factorized", "materialize")}
            ms = interleaved_ms(paths, _rounds(quick))
            fused, materialised = ms["factorized"], ms["materialize"]
            factorized_flops, materialize_flops = _flops(op, t, d, d, SJLT_K, SJLT_K)
            rows.append({
                "op": op,
                "B x T, d": f"{b}x{t}, {d}",
                "factorized ms": f"{fused:.2f}",
                "materialize ms": f"{materialised:.2f}",
                "faster": "materialize" if materialised < fused else "factorized",
                "rule picks": "materialize" if materialize_flops < factorized_flops else "factorized",
            })
    return rows

