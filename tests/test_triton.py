"""Triton-specific tests for ``torch.ops.grass_triton`` (grass_kernels/triton).

Every op's values through the public API, on every shape and dtype the interpreter can afford
(and every shape on a GPU), are checked by the sweep (test_sweep.py). Here: tokens split
across programs (which the launcher chooses only on a GPU), strided inputs read in place,
argument checks at the op boundary, tracing, and lowering for the H200 (sm_90) without a GPU.

On the CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1);
on a CUDA machine without the interpreter they run compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sweep
import torch
import triton
from conftest import DTYPES, rel_err
from sweep import FP32_RTOL, random_tensor

import grass_kernels as gk
from grass_kernels import _backend, reference
from grass_kernels import triton as grass_triton
from grass_kernels.triton import _launch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRETING else []) + (["cuda"] if torch.cuda.is_available() else [])
OPS = grass_triton.ops()


@pytest.fixture(params=DEVICES or [pytest.param(None, marks=pytest.mark.skip(
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1"))])
def device(request):
    return request.param


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """out equals the reference's fp32 result on the same inputs (fp32 inputs: every kernel
    multiplies and adds in fp32)."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ref.abs().sum() > 0  # never compare zeros
    assert rel_err(out, ref) < FP32_RTOL


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["logra", "fact_grass", "fact_sjlt"])
def test_tokens_split_across_programs(device, monkeypatch, op, dtype):
    """Three programs share each example's tokens (partial tiles flushed with atomics): the
    sweep's "tiles" case with the launcher's split forced, checked as the sweep checks."""
    calls = []

    def three_splits(dev, programs_per_split, t):
        calls.append(t)
        return min(3, triton.cdiv(t, _launch.BLOCK_T))

    monkeypatch.setattr(_launch, "token_splits", three_splits)
    case = sweep.Case(op, device, "triton", dtype, sweep.SHAPES["tiles"])
    sweep.check(case)
    assert calls and all(triton.cdiv(t, _launch.BLOCK_T) >= 3 for t in calls)


def test_flat_ops_strided_inputs(device):
    """Transposed and column-strided views are read through their strides, not copied."""
    base = random_tensor((300, 9), device=device)
    x = base.T  # (9, 300), strides (1, 9)
    y = random_tensor((40, 9), device=device).T[:, :20]  # (9, 20)
    codes = gk.sjlt_codes(300, 20, c=2, seed=5, device=device)
    _check(OPS.sjlt(x, codes, 20), reference.sjlt(x, codes, 20))
    _check(OPS.sjlt_transpose(y, codes), reference.sjlt_transpose(y, codes))
    idx = gk.random_indices(300, 101, seed=1, device=device)
    codes_idx = gk.sjlt_codes(101, 20, c=2, seed=6, device=device)
    _check(OPS.grass(x, idx, codes_idx, 20, 1.0), reference.grass(x, idx, codes_idx, 20, 1.0))


def test_out_of_range_table_entries_are_refused_before_the_launch(device):
    """A corrupt table passed straight to the op raises the native kernels' ValueError; the
    largest bad bucket is named (tests/test_range_policy.py compares every op's message)."""
    d, k = 200, 16
    x = random_tensor((3, d), device=device)
    codes = gk.sjlt_codes(d, k, c=1, seed=0, device=device).clone()
    codes[torch.arange(0, d, 7, device=device)] = k + 1000
    message = r"codes must hold buckets in \[0, k = 16\); found bucket 1016"
    with pytest.raises(ValueError, match=message):
        OPS.sjlt(x, codes, k)


def test_factorized_strided_inputs(device):
    """acts as a transposed view and grads as a column slice: read through their strides."""
    acts = random_tensor((2, 33, 9), device=device).transpose(1, 2)  # (2, 9, 33)
    grads = random_tensor((2, 9, 40), device=device, seed=1)[:, :, ::2]  # (2, 9, 20)
    p_in = random_tensor((16, 33), device=device, seed=2)
    p_out = random_tensor((8, 20), device=device, seed=3)
    _check(OPS.logra(acts, grads, p_in, p_out, None, False),
           reference.logra(acts, grads, p_in, p_out, None, False))
    in_idx = gk.random_indices(33, 11, seed=4, device=device)
    out_idx = gk.random_indices(20, 7, seed=5, device=device)
    codes = gk.sjlt_codes(77, 32, c=1, seed=6, device=device)
    _check(OPS.fact_grass(acts, grads, in_idx, out_idx, codes, 32, 1.0, None, False),
           reference.fact_grass(acts, grads, in_idx, out_idx, codes, 32, 1.0, None, False))


# Bad input at the op boundary: a direct torch.ops.grass_triton call fails with a message
# naming the argument instead of reading out of bounds.
def _bad_calls():
    x = torch.randn(4, 10)
    codes = gk.sjlt_codes(10, 8, c=1, seed=0)
    acts, grads = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    idx_in, idx_out = torch.arange(3), torch.arange(2)
    fg_codes = gk.sjlt_codes(6, 8, c=1, seed=0)
    return [
        ("sjlt", (x.long(), codes, 8), TypeError, "x must be float32"),
        ("sjlt", (x[None], codes, 8), ValueError, r"x must have shape \(N, D\)"),
        ("sjlt", (x, codes.long(), 8), TypeError, "codes must be an int32"),
        ("sjlt", (x, codes[:9], 8), ValueError, r"codes must have shape \(10, c\)"),
        ("sjlt_transpose", (x, codes[:, 0]), ValueError, r"codes must have shape \(D, c\)"),
        ("grass", (x, idx_in.int(), gk.sjlt_codes(3, 8, c=1, seed=0), 8, 1.0), TypeError,
         "indices must be an int64"),
        ("grass", (x, idx_in, codes, 8, 1.0), ValueError, r"codes must have shape \(3, c\)"),
        ("logra", (acts, grads[:1], torch.randn(4, 6), torch.randn(4, 5), None, False),
         ValueError, r"agree on \(B, T\)"),
        ("logra", (acts, grads, torch.randn(4, 6), torch.randn(4, 5), None, True), ValueError,
         r"p_in must have shape \(k, 7\)"),
        ("fact_grass", (acts, grads, idx_in, idx_out, fg_codes, 8, 1.0, torch.ones(2, 4), False),
         ValueError, r"token_mask must have shape \(B, T\)"),
        ("fact_grass", (acts, grads, idx_in, idx_out, fg_codes, 8, 1.0, torch.ones(2, 3).bool(),
                        False), TypeError, "token_mask must be float32"),
        ("fact_grass", (acts, grads, idx_in, idx_out, codes, 8, 1.0, None, False), ValueError,
         r"codes must have shape \(6, c\)"),
        ("fact_sjlt", (acts, grads, gk.sjlt_codes(6, 8, c=2, seed=0),
                       gk.sjlt_codes(5, 8, c=1, seed=0),
                       8, 8, None, False), ValueError, "the same c"),
        ("fact_sjlt", (acts, grads, gk.sjlt_codes(6, 8, c=1, seed=0),
                       gk.sjlt_codes(5, 8, c=1, seed=0),
                       8, 8, None, True), ValueError, r"codes_in must have shape \(7, c\)"),
    ]


@pytest.mark.parametrize("op,args,error,match", _bad_calls(),
                         ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_op_boundary_rejects_bad_arguments(op, args, error, match):
    with pytest.raises(error, match=match):
        getattr(OPS, op)(*args)


# Tracing and lowering, in a fresh process without the interpreter.
#
# torch.compile cannot run over these ops under the interpreter: wrap_triton hands back the
# InterpretedFunction itself, which then executes the kernel body on FakeTensors and fails.
# Without the interpreter, running a compiled graph launches real kernels, which needs a GPU.
# So the subprocess checks what does not need one: torch.export(strict=True) (Dynamo's
# fullgraph capture plus FakeTensor propagation through each triton_op's launcher) must keep
# every op in one graph with the reference's output shape; and every kernel, with the exact
# arguments its launcher passes, must compile for sm_90 (the H200) without register spills
# for 16-bit inputs. On a CUDA machine, test_torch_compile_fullgraph_on_gpu runs the real
# thing.

def _export_cases():
    """(op, args) for every op, CPU tensors, with bias and a token mask where there are any."""
    x = torch.randn(5, 40)
    acts, grads, mask = torch.randn(2, 7, 12), torch.randn(2, 7, 9), torch.rand(2, 7)
    idx_in, idx_out = torch.arange(0, 13, 2), torch.arange(0, 9, 3)
    return [
        ("sjlt", (x, gk.sjlt_codes(40, 16, c=2, seed=0), 16)),
        ("sjlt_transpose", (torch.randn(5, 16), gk.sjlt_codes(40, 16, c=2, seed=0))),
        ("grass", (x, torch.arange(0, 40, 3), gk.sjlt_codes(14, 16, c=2, seed=0), 16, 1.5)),
        ("logra", (acts, grads, torch.randn(4, 13), torch.randn(3, 9), mask, True)),
        ("fact_grass", (acts, grads, idx_in, idx_out, gk.sjlt_codes(21, 16, c=1, seed=0), 16, 1.0,
                        mask, True)),
        ("fact_sjlt", (acts, grads, gk.sjlt_codes(13, 8, c=2, seed=0),
                       gk.sjlt_codes(9, 4, c=2, seed=1),
                       8, 4, mask, True)),
    ]


def _export_report() -> dict:
    report = {}
    for op, args in _export_cases():
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        class Call(torch.nn.Module):
            def forward(self, *ts, _op=op, _args=args, _where=tensors):
                full = list(_args)
                for i, t in zip(_where, ts):
                    full[i] = t
                return getattr(OPS, _op)(*full)

        program = torch.export.export(Call(), tuple(args[i] for i in tensors), strict=True)
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        meta = program.graph_module.graph.find_nodes(op="output")[0].args[0][0].meta["val"]
        expected = getattr(reference, op)(*args)
        report[op] = {
            "ops_in_graph": targets,
            "shape_ok": tuple(meta.shape) == tuple(expected.shape),
            "dtype_ok": meta.dtype == expected.dtype,
        }
    return report


def _recorded_launches() -> list[tuple]:
    """(label, kernel, args, kwargs) of every launch the launchers make for representative
    16-bit (bias, token mask, tokens split over programs) and fp32 calls, recorded instead of
    run: there is no GPU to run them on."""
    from grass_kernels.triton import fact_grass, fact_sjlt, grass, logra, sjlt, sjlt_transpose

    launches = []

    class Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for module in (sjlt, sjlt_transpose, grass, logra, fact_grass, fact_sjlt):
        module.wrap_triton = Record
    labels = []
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(64, 1000).to(dtype)
        acts, grads = torch.randn(8, 100, 300).to(dtype), torch.randn(8, 100, 200).to(dtype)
        mask = torch.rand(8, 100)
        sjlt.sjlt(x, gk.sjlt_codes(1000, 4096, c=2, seed=0), 4096)
        sjlt_transpose.sjlt_transpose(x[:, :512], gk.sjlt_codes(1000, 512, c=2, seed=0))
        grass.grass(x, torch.arange(0, 1000, 2), gk.sjlt_codes(500, 4096, c=2, seed=0), 4096, 1.0)
        logra.launch(acts, grads, torch.randn(64, 301), torch.randn(64, 200), mask, True, 2)
        fact_grass.launch(acts, grads, torch.arange(128), torch.arange(128),
                          gk.sjlt_codes(128 * 128, 4096, c=2, seed=0), 4096, 1.0, mask, True, 2)
        fact_sjlt.launch(acts, grads, gk.sjlt_codes(301, 64, c=2, seed=0),
                         gk.sjlt_codes(200, 64, c=2, seed=1), 64, 64, mask, True, 2)
        labels += [str(dtype).split(".")[-1]] * 6
    return [(label, *launch) for label, launch in zip(labels, launches)]


def _signature(kernel, args, kwargs) -> tuple[dict, dict]:
    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.int32: "i32", torch.int64: "i64"}
    signature, constexprs = {}, {}
    for name, value in zip(kernel.arg_names, args):
        if value is None:
            signature[name], constexprs[name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + types[value.dtype]
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        else:
            signature[name] = "fp32"
    for name, value in kwargs.items():
        if name in kernel.arg_names:
            signature[name], constexprs[name] = "constexpr", value
    return signature, constexprs


def _lowering_report() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    rows = []
    for label, kernel, args, kwargs in _recorded_launches():
        assert not grass_triton._launch.interpreted(kernel)
        signature, constexprs = _signature(kernel, args, kwargs)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32), options=options,
        )
        row = {"kernel": kernel.__name__, "dtype": label, "cubin": len(compiled.asm["cubin"])}
        if ptxas.exists():
            ptx = Path(os.environ["LOWERING_DIR"]) / f"{kernel.__name__}_{label}.ptx"
            ptx.write_text(compiled.asm["ptx"])
            log = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o",
                                  str(ptx.with_suffix(".cubin"))],
                                 capture_output=True, text=True, check=True).stderr
            row["spill_bytes"] = sum(int(n) for n in re.findall(r"(\d+) bytes spill", log))
            row["ptxas"] = " ".join(line.split(":")[-1].strip() for line in log.splitlines()
                                    if "registers" in line)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def no_interpreter_report(tmp_path_factory) -> dict:
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="0", LOWERING_DIR=str(tmp_path_factory.mktemp("ptx")))
    code = (f"import sys, json; sys.path.insert(0, {str(here)!r}); import test_triton as t; "
            "print(json.dumps({'export': t._export_report(), 'lowering': t._lowering_report()}))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=900, cwd=here.parent)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ops_trace_with_torch_export(no_interpreter_report):
    report = no_interpreter_report["export"]
    assert sorted(report) == sorted(_backend.OPS)
    for op, row in report.items():
        assert f"grass_triton.{op}.default" in row["ops_in_graph"], (op, row)
        assert row["shape_ok"] and row["dtype_ok"], (op, row)


@pytest.mark.slow
def test_kernels_lower_for_sm90(no_interpreter_report):
    rows = no_interpreter_report["lowering"]
    assert {r["kernel"] for r in rows} == {f"_{op}_kernel" for op in _backend.OPS}
    assert all(r["cubin"] > 0 for r in rows)
    spilling = [r for r in rows if r["dtype"] != "float32" and r.get("spill_bytes", 0) > 0]
    assert not spilling, spilling


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING,
                    reason="needs a CUDA device and compiled (not interpreted) Triton")
def test_torch_compile_fullgraph_on_gpu():
    results = {}
    for op, args in _export_cases():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        compiled = torch.compile(lambda *a, _op=op: getattr(OPS, _op)(*a), fullgraph=True)
        results[op] = rel_err(compiled(*args), getattr(reference, op)(*args))
    assert all(err < FP32_RTOL for err in results.values()), results
