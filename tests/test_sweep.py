"""Every public kernel op against its oracle on every device, backend, dtype and shape of the
sweep (tests/sweep.py), and proof that the sweep's check catches a wrong kernel: a missing
output column or input column, a call routed to another implementation, and (for the bound of
kernels that multiply in 16 bits, which only a GPU runs) a missing column at that bound."""

from __future__ import annotations

import pytest
import sweep
import torch
from conftest import rel_err

from grass_kernels import _backend


@pytest.mark.parametrize("case", sweep.cases())
def test_sweep(case):
    sweep.check(case)


def zero_a_column(out: torch.Tensor) -> torch.Tensor:
    """out with its middle nonzero column zeroed (a bucket no input reaches is zero anyway)."""
    used = out.abs().sum(0).nonzero().flatten()
    out[:, used[len(used) // 2]] = 0
    return out


def _faulty(fault: str):
    """A wrapper for ``_backend.implementation`` whose "cpu" ops make one small mistake.

    zero_column: one whole output column is zero. drop_input: one input column is never read
    (as if one thread's share of D lost its first column): a 1 / sqrt(D) relative error for
    the flat ops; sjlt_transpose, whose input is the sketch, zeroes an output column instead.
    """
    real = _backend.implementation

    def implementation(op, backend):
        fn = real(op, backend)
        if backend != "cpu":
            return fn

        def wrong(*args):
            if fault == "drop_input" and op != "sjlt_transpose":
                x = args[0].clone()  # x, or acts for the factorized ops
                read = {"grass": args[1], "fact_grass": args[2]}.get(op)  # the kept columns
                x[..., 0 if read is None else read[0]] = 0
                return fn(x, *args[1:])
            return zero_a_column(fn(*args))

        return wrong

    return implementation


# Where each op's check must see the fault: the large-D flat shapes (a D split over threads
# with partial sums, a table over several tiles); T-tiles with tails for the factorized ops.
FAULT_SHAPES = {"sjlt": ("d-split", "big-table"), "sjlt_transpose": ("d-split", "big-table"),
                "grass": ("d-split", "big-table"), "logra": ("tiles", "long"),
                "fact_grass": ("tiles", "long"), "fact_sjlt": ("tiles", "long")}


@pytest.mark.parametrize("fault", ["zero_column", "drop_input"])
@pytest.mark.parametrize("op", list(FAULT_SHAPES))
def test_faulty_kernel_fails_the_check(monkeypatch, op, fault):
    """The sweep's check rejects a CPU kernel with one column missing, for 16-bit inputs too
    (their bound is the fp32 one: every CPU kernel multiplies and adds in fp32)."""
    monkeypatch.setattr(_backend, "implementation", _faulty(fault))
    for name in FAULT_SHAPES[op]:
        case = sweep.Case(op, "cpu", "cpu", torch.bfloat16, sweep.SHAPES[name])
        with pytest.raises(AssertionError, match="^value: "):
            sweep.check(case)


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_misrouted_call_fails_the_check(monkeypatch, target):
    """With backend="cpu" resolved to another implementation, every kernel op's case fails on
    dispatch, though the values agree."""
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda op, device, backend: (
        target if backend == "cpu" else real(op, device, backend)))
    for op in _backend.OPS:
        case = sweep.Case(op, "cpu", "cpu", torch.float32, sweep.SHAPES["one-row"])
        with pytest.raises(AssertionError, match="^dispatch: "):
            sweep.check(case)


# A shape per op whose outputs each hold a sizeable share of the norm (k or k_out * k_in small).
LOWP_SHAPES = {"logra": "tokens-odd", "fact_grass": "tiles", "fact_sjlt": "tokens-odd"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", list(LOWP_SHAPES))
def test_16_bit_rule(op, dtype):
    """The bound of kernels that multiply in 16 bits (compiled Triton on a GPU), checked here
    on the CPU kernel's output: torch's own 16-bit computation errs by about the unit roundoff
    (so the bound is neither zero nor loose), the fp32-exact kernel is inside the bound, and
    the same output with one column zeroed is outside it."""
    case = sweep.Case(op, "cpu", "cpu", dtype, sweep.SHAPES[LOWP_SHAPES[op]])
    run = sweep.run_variant(case, ("float", True), lowp=True)
    lowp_err = rel_err(run["lowp"], run["expected"])
    unit = sweep.UNIT_ROUNDOFF[dtype]
    assert unit / 4 < lowp_err < 4 * unit
    rule = sweep.LOWP_MULTIPLE * lowp_err + sweep.FP32_RTOL
    assert rel_err(run["out"], run["expected"]) < rule
    assert rel_err(zero_a_column(run["out"].clone()), run["expected"]) > rule
