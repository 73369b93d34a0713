"""Checks the CMake-built op library (run by `make cmake-check`, under the CPU torch wheel).

Usage: python tests/cmake_smoke.py build/cmake/libgrass_kernels.so
Loads the library in place of the Python extension (built portable: the kernels' paths for CPUs
without AVX-512) and compares every op on the CPU with the pure-torch reference, on random
inputs: fp32, bf16 and fp16; bool and float token masks, with NaN in masked tokens where the
kernel promises never to read them; odd shapes, 2-D inputs, strided views, the thread-split and
multi-tile flat shapes and the multi-panel fact_grass shapes. The bound is the suite's rule:
1e-5 relative error against the fp32 computation on the same (rounded) inputs.
"""

import math
import os
import sys

os.environ["GRASS_KERNELS_LIBRARY"] = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import grass_kernels as gk  # noqa: E402

RTOL = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def token_mask(b, t, kind, seed=1):
    """None, or a (B, T) bool / float mask that keeps the first token of every example."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, t, generator=g) > 0.3
    keep[:, 0] = True
    return keep if kind == "bool" else keep * torch.rand(b, t, generator=g)


def flat_calls():
    """(name, call(backend)) for the flat ops."""
    shapes = [(1, 37, 8, 1), (5, 1001, 24, 3), (16, 5003, 32, 2), (37, 2001, 40, 5),
              (3, 70001, 128, 1), (2, 90001, 96, 4), (7, 333, 1, 1)]
    for (n, d, k, c) in shapes:
        for tag, dtype in DTYPES.items():
            x = randn(n, d, dtype=dtype, seed=d)
            y = randn(n, k, dtype=dtype, seed=k)
            idx = gk.random_indices(d, d // 3 + 1, seed=d)
            name = f"({n}, {d}, k={k}, c={c}) {tag}"
            yield f"sjlt {name}", lambda b, x=x, k=k, c=c: gk.sjlt(x, k, c=c, seed=7, backend=b)
            yield f"sjlt_transpose {name}", (
                lambda b, y=y, d=d, c=c: gk.sjlt_transpose(y, d, c=c, seed=3, backend=b))
            yield f"grass {name}", (
                lambda b, x=x, k=k, c=c, idx=idx: gk.grass(x, k, indices=idx, c=c, backend=b))
    x = randn(301, 6, dtype=torch.bfloat16).T  # (6, 301), column-major
    yield "sjlt transposed view bf16", lambda b: gk.sjlt(x, 64, c=2, backend=b)


def factorized_calls():
    """(name, call(backend)) for logra, fact_grass and fact_sjlt."""
    # (B, T, d_in, d_out, k_o', k_i'): T = None is 2-D inputs; the last three are the
    # multi-panel fact_grass shapes (dense, sparse and mixed gathers, T past one tile).
    shapes = [(5, None, 37, 23, 6, 9), (3, 17, 70, 45, 6, 9), (4, 9, 33, 1, 1, 9),
              (2, 1000, 19, 13, 6, 9), (3, 37, 70, 45, 19, 41), (2, 29, 1500, 1100, 21, 71),
              (2, 600, 1500, 45, 9, 33)]
    for (b, t, d_in, d_out, n_out, n_in) in shapes:
        dims = (b,) if t is None else (b, t)
        for tag, dtype in DTYPES.items():
            for kind in (None, "bool", "float"):
                acts = randn(*dims, d_in, dtype=dtype, seed=1)
                grads = randn(*dims, d_out, dtype=dtype, seed=2)
                mask = token_mask(b, 1 if t is None else t, kind)
                name = f"(B={b}, T={t}, {d_in}->{d_out}) {tag} mask={kind}"
                in_idx = gk.random_indices(d_in + 1, min(d_in + 1, n_in), seed=3)
                out_idx = gk.random_indices(d_out, min(d_out, n_out), seed=4)
                p_in, p_out = gk.gaussian_matrix(d_in + 1, 7), gk.gaussian_matrix(d_out, 5)
                yield f"logra {name}", lambda be, a=acts, g=grads, m=mask, pi=p_in, po=p_out: (
                    gk.logra(a, g, p_in=pi, p_out=po, bias=True, token_mask=m, backend=be,
                             path="factorized"))
                yield f"fact_grass {name}", (
                    lambda be, a=acts, g=grads, m=mask, i=in_idx, o=out_idx: gk.fact_grass(
                        a, g, k=64, in_indices=i, out_indices=o, c=2, bias=True, token_mask=m,
                        backend=be))
                yield f"fact_sjlt {name}", lambda be, a=acts, g=grads, m=mask: (
                    gk.fact_sjlt(a, g, k_in=8, k_out=4, c=2, bias=True, token_mask=m,
                                 backend=be, path="factorized"))


def masked_nan_calls():
    """fact_grass never reads masked tokens: NaN there must not reach the output."""
    for d_in in (40, 3000):  # row-by-row and column-by-column gathers
        acts = randn(2, 9, d_in, seed=5)
        grads = randn(2, 9, 20, seed=6)
        mask = token_mask(2, 9, "bool")
        dirty = acts.clone()
        dirty[~mask] = float("nan")
        in_idx, out_idx = gk.random_indices(d_in + 1, 20, seed=7), gk.random_indices(20, 6)

        def call(backend, a, m=mask, g=grads, i=in_idx, o=out_idx):
            return gk.fact_grass(a, g, k=64, in_indices=i, out_indices=o, bias=True, token_mask=m,
                                 backend=backend)

        yield f"fact_grass NaN in masked tokens d_in={d_in}", (
            lambda backend, call=call, dirty=dirty, acts=acts: (
                call("cpu", dirty) if backend == "cpu" else call("reference", acts)))


def main() -> None:
    failures = []
    count = 0
    for name, call in [*flat_calls(), *factorized_calls(), *masked_nan_calls()]:
        out, ref = call("cpu"), call("reference")
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        count += 1
        if not (math.isfinite(err) and err < RTOL):
            failures.append(f"{name}: rel_err={err:.2e}")
    for line in failures:
        print("MISMATCH", line)
    if failures:
        raise SystemExit(f"{len(failures)} of {count} CMake-built kernel calls disagree with the "
                         "reference")
    print(f"CMake-built library: all {count} calls match the reference (rel_err < {RTOL})")


if __name__ == "__main__":
    main()
