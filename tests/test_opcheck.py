"""``torch.library.opcheck`` for every op of both namespaces: schema, fake (meta) implementation
against the real kernel, autograd registration and AOT dispatch, and the fakes' checks."""

from __future__ import annotations

import os

import pytest
import torch

import grass_kernels as gk
from grass_kernels import _backend
from grass_kernels import triton as triton_ops


def _args():
    """op -> arguments of the registered op (CPU tensors; bias on, one token mask)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, generator=g)
    acts, grads = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.rand(2, 5, generator=g)
    return {
        "sjlt": (x, gk.sjlt_codes(12, 8, c=2, seed=0), 8),
        "sjlt_transpose": (torch.randn(3, 8, generator=g), gk.sjlt_codes(12, 8, c=2, seed=0)),
        "grass": (x, gk.random_indices(12, 5, seed=1), gk.sjlt_codes(5, 8, c=2, seed=1), 8, 1.5),
        "logra": (acts, grads, torch.randn(3, 7, generator=g), torch.randn(2, 4, generator=g),
                  mask, True),
        "fact_grass": (acts, grads, gk.random_indices(7, 3, seed=2),
                       gk.random_indices(4, 2, seed=3), gk.sjlt_codes(6, 8, c=1, seed=2), 8, 2.0,
                       mask, True),
        "fact_sjlt": (acts, grads, gk.sjlt_codes(7, 4, c=1, seed=4),
                      gk.sjlt_codes(4, 4, c=1, seed=5),
                      4, 4, mask, True),
    }


NAMESPACES = {"grass_kernels": lambda: _backend.native(), "grass_triton": triton_ops.ops}
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_dynamic")
# The checks that run a Triton op on FakeTensors: under the interpreter the kernel itself
# then runs on them and reads their (absent) data, so they need compiled Triton on a GPU.
FAKE_CHECKS = ("test_faketensor", "test_aot_dispatch_dynamic")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _opcheck(namespace: str, op: str, device: str, checks: tuple[str, ...]) -> None:
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _args()[op])
    torch.library.opcheck(getattr(NAMESPACES[namespace](), op).default, args, test_utils=checks)


@pytest.mark.parametrize("namespace", list(NAMESPACES))
@pytest.mark.parametrize("op", _backend.OPS)
def test_opcheck(namespace, op, device):
    if namespace == "grass_kernels" and device == "cuda" and op in _backend.NO_CUDA_KERNEL:
        pytest.skip(f"{op} has no CUDA kernel")
    if namespace == "grass_triton" and INTERPRETED:
        _opcheck(namespace, op, device, tuple(c for c in ALL_CHECKS if c not in FAKE_CHECKS))
        pytest.skip(f"{FAKE_CHECKS} of grass_triton::{op} need compiled Triton on a GPU (the "
                    "interpreter runs the kernel on FakeTensors); the other checks passed")
    _opcheck(namespace, op, device, ALL_CHECKS)


@pytest.mark.parametrize("op", _backend.OPS)
def test_fakes_refuse_what_the_kernels_refuse(op):
    """Under FakeTensorMode a wrong dtype or shape of a table fails in the fake itself."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = list(_args()[op])
    # Which argument to break, and how: a table one row short, or (sjlt_transpose, whose table
    # may have any number of rows) y with k = 1 below c = 2; logra's p_in one column short.
    position, broken = {
        "sjlt": (1, lambda t: t[:-1]),
        "sjlt_transpose": (0, lambda t: t[:, :1]),
        "grass": (2, lambda t: t[:-1]),
        "logra": (2, lambda t: t[:, :-1]),
        "fact_grass": (4, lambda t: t[:-1]),
        "fact_sjlt": (3, lambda t: t[:-1]),
    }[op]
    args[position] = broken(args[position])
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match="must|need c <= k"):
            getattr(_backend.native(), op)(*fakes)


def test_random_indices_takes_a_device():
    """The public random_indices puts the same subset on any device (meta: shape and dtype)."""
    cpu = gk.random_indices(50, 9, seed=3)
    assert torch.equal(gk.random_indices(50, 9, seed=3, device="cpu"), cpu)
    meta = gk.random_indices(50, 9, seed=3, device="meta")
    assert meta.device.type == "meta" and meta.shape == (9,) and meta.dtype == torch.int64
    if torch.cuda.is_available():
        assert torch.equal(gk.random_indices(50, 9, seed=3, device="cuda").cpu(), cpu)
