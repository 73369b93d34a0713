"""Checks the CMake-built op library (run by `make cmake-check`, under the CPU torch wheel).

Usage: python tests/cmake_smoke.py build/cmake/libgrass_kernels.so
Loads the library in place of the Python extension and compares every op it implements on the
CPU with the pure-torch reference, on random inputs.
"""

import os
import sys

os.environ["GRASS_KERNELS_LIBRARY"] = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import grass_kernels as gk  # noqa: E402


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((out - ref).norm() / ref.norm())
    status = "ok" if err < 1e-5 else "MISMATCH"
    print(f"{name:12s} rel_err={err:.2e} {status}")
    if err >= 1e-5:
        raise SystemExit(f"{name}: CMake-built kernel disagrees with the reference")


torch.manual_seed(0)
x = torch.randn(5, 301)
idx = gk.random_indices(301, 97, seed=3)
acts, grads = torch.randn(3, 7, 33), torch.randn(3, 7, 21)
calls = {
    "sjlt": lambda b: gk.sjlt(x, 64, c=2, seed=1, backend=b),
    "sjlt_transpose": lambda b: gk.sjlt_transpose(x[:, :64], 301, c=4, backend=b),
    "grass": lambda b: gk.grass(x, 32, indices=idx, c=2, backend=b),
    "logra": lambda b: gk.logra(
        acts, grads, p_in=gk.gaussian_matrix(8, 34), p_out=gk.gaussian_matrix(4, 21),
        bias=True, backend=b),
    "fact_grass": lambda b: gk.fact_grass(
        acts, grads, 64, in_indices=gk.random_indices(34, 9), out_indices=gk.random_indices(21, 5),
        c=2, bias=True, backend=b),
    "fact_sjlt": lambda b: gk.fact_sjlt(acts, grads, k_in=8, k_out=4, c=2, backend=b),
}
for name, call in calls.items():
    check(name, call("cpu"), call("reference"))
print("CMake-built library: all ops match the reference")
