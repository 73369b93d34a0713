"""Which implementation runs, for every public kernel op, device and backend (None included).

A TorchDispatchMode records the ops a call dispatches: a native kernel (C++ on the CPU, CUDA on
a GPU) appears as ``grass_kernels.<op>``, a Triton kernel as ``grass_triton.<op>``, each as one
opaque op. The pure-torch reference registers no op; a spy on ``grass_kernels.reference``
records its calls. The equality tests cannot tell these apart (they agree to 1e-5), so a route
to the reference or to another kernel is caught here; ``test_misrouting_is_caught`` injects
both faults into the resolver and shows the check reports them.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from conftest import DEVICES, backends_for
from torch.utils._python_dispatch import TorchDispatchMode

import grass_kernels as gk
from grass_kernels import _backend, reference

NAMESPACES = {"grass_kernels": "native", "grass_triton": "triton"}


class _KernelRecorder(TorchDispatchMode):
    """Records "native:<op>" / "triton:<op>" for every grass op dispatched under it."""

    def __init__(self, events: list[str]):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace = func.namespace
        if namespace in NAMESPACES:
            self.events.append(f"{NAMESPACES[namespace]}:{func._opname}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _reference_spy(events: list[str]):
    """Records "reference:<op>" for each reference op called (nested calls included)."""
    originals = {op: getattr(reference, op) for op in _backend.GPU_DEFAULT}

    def spy(op, fn):
        @functools.wraps(fn)
        def wrapper(*args):
            events.append(f"reference:{op}")
            return fn(*args)

        return wrapper

    try:
        for op, fn in originals.items():
            setattr(reference, op, spy(op, fn))
        yield
    finally:
        for op, fn in originals.items():
            setattr(reference, op, fn)


def implementations_run(call) -> list[str]:
    """The kernels and reference ops ``call()`` ran, in order."""
    events: list[str] = []
    with _reference_spy(events), _KernelRecorder(events):
        call()
    return events


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device)
    return {
        "x": r(3, 50), "y": r(3, 8), "acts": r(2, 3, 10), "grads": r(2, 3, 6),
        "p_in": r(4, 11), "p_out": r(3, 6), "idx": gk.random_indices(50, 9).to(device),
        "idx_in": gk.random_indices(11, 5).to(device),
        "idx_out": gk.random_indices(6, 4).to(device),
    }


# op -> (call with backend b, the op that backend runs, how many times)
def _calls(v):
    return {
        "sjlt": (lambda b: gk.sjlt(v["x"], 8, c=2, backend=b), "sjlt", 1),
        "sjlt_transpose": (lambda b: gk.sjlt_transpose(v["y"], 50, c=2, backend=b),
                           "sjlt_transpose", 1),
        "grass": (lambda b: gk.grass(v["x"], 8, indices=v["idx"], c=2, backend=b), "grass", 1),
        "logra": (lambda b: gk.logra(v["acts"], v["grads"], p_in=v["p_in"], p_out=v["p_out"],
                                     bias=True, backend=b, path="factorized"), "logra", 1),
        "fact_grass": (lambda b: gk.fact_grass(v["acts"], v["grads"], k=8, in_indices=v["idx_in"],
                                               out_indices=v["idx_out"], bias=True, backend=b),
                       "fact_grass", 1),
        "fact_sjlt": (lambda b: gk.fact_sjlt(v["acts"], v["grads"], k_in=4, k_out=4, bias=True,
                                             backend=b, path="factorized"), "fact_sjlt", 1),
        # The materialised paths compress G_i with the flat op of the same backend: grass once,
        # sjlt twice (rows, then columns).
        "fact_grass materialize": (
            lambda b: gk.fact_grass(v["acts"], v["grads"], k=8, in_indices=v["idx_in"],
                                    out_indices=v["idx_out"], bias=True, backend=b,
                                    path="materialize"), "grass", 1),
        "fact_sjlt materialize": (
            lambda b: gk.fact_sjlt(v["acts"], v["grads"], k_in=4, k_out=4, bias=True,
                                   backend=b, path="materialize"), "sjlt", 2),
    }


def expected_backend(op: str, device: str, backend: str | None) -> str:
    """The documented choice: the named backend, or by device ("cpu", or GPU_DEFAULT)."""
    if backend is not None:
        return backend
    return "cpu" if device == "cpu" else _backend.GPU_DEFAULT[op]


def dispatch_mismatch(case: str, device: str, backend: str | None) -> str | None:
    """None when ``case`` runs the implementation it should; else what ran instead."""
    call, op, times = _calls(_inputs(device))[case]
    want = expected_backend(op, device, backend)
    label = {"cpu": "native", "cuda": "native"}.get(want, want)
    ran = implementations_run(lambda: call(backend))
    top = [e for e in ran if not e.startswith("reference:")] if label != "reference" else ran
    expected = [f"{label}:{op}"] * times
    if label == "reference":
        # The reference may call itself (grass -> sjlt); its top-level calls come first.
        ok = ran[:1] == expected[:1] and ran.count(f"reference:{op}") >= times and not any(
            e.startswith(("native:", "triton:")) for e in ran)
    else:
        ok = top == expected and not any(e.startswith("reference:") for e in ran)
    if ok:
        return None
    return f"{case} on {device}, backend={backend!r}: expected {expected}, ran {ran}"


CASES = [
    pytest.param(case, device, backend, id=f"{case}-{device}-{backend}")
    for device in DEVICES
    for case, (_, op, _) in _calls(_inputs("cpu")).items()
    for backend in [None, "reference"] + backends_for(device, op)
]


@pytest.mark.parametrize("case,device,backend", CASES)
def test_dispatch(case, device, backend):
    assert dispatch_mismatch(case, device, backend) is None


@pytest.mark.parametrize("fault", ["cpu to reference", "cpu to triton"])
def test_misrouting_is_caught(monkeypatch, fault):
    """With the resolver routing "cpu" elsewhere, every op's default dispatch is reported."""
    real = _backend.resolve
    target = fault.split()[-1]
    monkeypatch.setattr(
        _backend, "resolve", lambda op, device, backend: (
            target if real(op, device, backend) == "cpu" else real(op, device, backend))
    )
    for case in _calls(_inputs("cpu")):
        problem = dispatch_mismatch(case, "cpu", None)
        assert problem is not None and f"ran ['{target.replace('cpu', 'native')}:" in problem, case
