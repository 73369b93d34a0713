"""One-shot GPU check, a verdict before a stopwatch: build, prove the GPU results right, then time.

    python bench/gpu_check.py              # on the GPU machine (repository root as cwd or not)
    python bench/gpu_check.py --dry-run    # here, on the CPU: tiny sizes, every code path but
                                           # the build and CUDA timing
    python bench/gpu_check.py --sections build,correctness,attributor   # in two commands when
    python bench/gpu_check.py --sections bandwidth,flat,factorized      # one has a time limit

Sections, each in its own subprocess (a CUDA fault cannot take the others down) and under a
time limit drawn from one overall budget, correctness first:
    build        pip install --no-build-isolation --no-deps -e .  (TORCH_CUDA_ARCH_LIST=9.0)
    correctness  pytest on the GPU test files, and the CUDA-device cases of the shared test
                 files (a selection that selects nothing fails)
    attributor   grass.Attributor end to end on the GPU: features and scores of a small model
                 under every compressor equal the CPU run on the same model and data
    bandwidth    device copy bandwidth (a large clone): the yardstick for every GB/s figure
    flat         sjlt / grass at N = 64, D = 1e7 bf16, k = 4096, c in {1, 4}
    factorized   fact_grass / fact_sjlt / logra at B*T = 8 x 1024 bf16 on GPT-2 and
                 Llama-3.1-8B layer shapes, every GPU backend vs torch baselines
Every timed row is first compared with the reference at its own shape; its relative error and
bound go into the table, and a row that is wrong or raises is not timed and fails its section.
Any failed section fails the run: a FAIL line heads the table and the exit status is 1.

Dry run: the CPU kernels stand where the GPU ones would (the attributor section compares
them with the reference backend). GRASS_GPU_CHECK_INJECT_FAULT=1 zeroes one output column of
every fact_grass kernel call inside the check's own processes (never the reference), to prove
that a wrong kernel fails the run.

Output: a markdown table (printed, and written to $OUT/gpu_table.md) and the full log
($OUT/gpu_log.txt); OUT defaults to bench/results/. Both are rewritten after every section,
so a run cut short still leaves what it checked.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("build", "correctness", "attributor", "bandwidth", "flat", "factorized")
# Sections whose failure or absence leaves the GPU results unverified: not running them fails.
VERIFYING = ("build", "correctness", "attributor")
# Upper time limits per section (seconds); each also gets no more than what the budget has left.
CAPS = {"build": 270, "correctness": 210, "attributor": 60, "bandwidth": 30, "flat": 90,
        "factorized": 150}
# GPU test runs: (files, -k selection, whether the selection must select something). The
# GPU files run whole; in the shared files (which mix CPU cases, and whose Triton-on-CPU cases
# need the interpreter) only the cases parametrised on the CUDA device.
TEST_RUNS = (
    (("tests/test_cuda_build.py", "tests/test_cuda_checks.py", "tests/test_cuda_kernels.py"),
     None, True),
    # Not the lowering and export tests: they check on the CPU what CI already checks.
    (("tests/test_triton.py",), "not lower and not export", True),
    (("tests/test_sweep.py", "tests/test_flat.py", "tests/test_factorized.py",
      "tests/test_dispatch.py"), "cuda", True),
)
FAULT_ENV = "GRASS_GPU_CHECK_INJECT_FAULT"
FAULT_OP = "fact_grass"
VERSIONS = ("import torch, importlib.util as u; "
            "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', "
            "torch.cuda.is_available() and torch.cuda.get_device_name()); "
            "print('triton', u.find_spec('triton') and __import__('triton').__version__)")
CHECK_EXTENSION = ("import torch, grass_kernels._C; "
                   "assert torch._C._dispatch_has_kernel_for_dispatch_key("
                   "'grass_kernels::fact_grass', 'CUDA'), 'no CUDA kernels'; print('extension ok')")
COLUMNS = ["case", "op", "impl", "rel err", "bound", "verdict", "ms", "x vs torch", "GB/s",
           "% copy BW", "peak MB", "note"]

# Relative-error bounds against the fp32 reference on the same (rounded) inputs.
UNIT_ROUNDOFF = 2.0**-24
# Triton's factorized kernels multiply on tensor cores for 16-bit inputs: fp32 operands (the
# projections) rounded to the 16-bit dtype (2**-9 relative for bf16) or TF32 products of the
# sketches (2**-11 per operand), two operands per product: about 4e-3 at worst for a sum of
# products; 5e-3 allows for it. Its flat ops scatter in fp32 and get the fp32 bound.
TRITON_DOT_OPS = ("fact_grass", "fact_sjlt", "logra")
TRITON_16BIT_BOUND = 5e-3
# torch baselines in bf16 round their GEMM outputs (and the unfused mask its rescaled copy) to
# bf16: 2**-9 per element.
TORCH_16BIT_BOUND = 1e-2


def fp32_bound(terms: float) -> float:
    """Kernels accumulating in fp32 differ from the reference only in the order of additions:
    about u * sqrt(n) relative for n addends of random sign; 4x that, at least 1e-5."""
    return max(1e-5, 4 * UNIT_ROUNDOFF * math.sqrt(terms))


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- fault injection

def inject_fault_if_asked(log=print) -> None:
    """With FAULT_ENV=1: every kernel (not reference) call of FAULT_OP returns its output with
    column 0 zeroed, through the one dispatch point, grass_kernels._backend.run."""
    if os.environ.get(FAULT_ENV) != "1":
        return
    from grass_kernels import _backend

    implementation = _backend.implementation

    def faulty(op: str, backend: str):
        fn = implementation(op, backend)
        if op != FAULT_OP or backend == "reference":
            return fn

        def wrong(*args):
            out = fn(*args).clone()
            out[:, 0] = 0.0
            return out

        return wrong

    _backend.implementation = faulty
    log(f"{FAULT_ENV}=1: {FAULT_OP} kernel outputs get column 0 zeroed")


# ----------------------------------------------------------------------------- sizes

def flat_sizes(dry: bool) -> dict:
    if dry:
        return dict(n=4, d=3001, k=64, cs=(1, 4), kp=256)
    return dict(n=64, d=10_000_000, k=4096, cs=(1, 4), kp=4 * 4096)


# (name, d_in, d_out): Llama-3.1-8B and GPT-2-small linear layers, the key shapes (the Llama
# MLP) first in case the section runs out of time.
LAYERS = [
    ("llama 4096x14336", 4096, 14336), ("llama 14336x4096", 14336, 4096),
    ("llama 4096x4096", 4096, 4096), ("llama 4096x1024", 4096, 1024),
    ("gpt2 768x3072", 768, 3072), ("gpt2 3072x768", 3072, 768),
    ("gpt2 768x2304", 768, 2304), ("gpt2 768x768", 768, 768),
]


def factorized_sizes(dry: bool) -> dict:
    if dry:  # one Llama and one GPT-2 layer shrunk 16x, 2 x 8 tokens, small sketches
        layers = [(f"{name} /16", d_in // 16, d_out // 16) for name, d_in, d_out in
                  (LAYERS[0], LAYERS[4])]
        return dict(b=2, t=8, layers=layers, k=256, mask_side=32, side=16)
    return dict(b=8, t=1024, layers=LAYERS, k=4096, mask_side=128, side=64)


# ----------------------------------------------------------------------------- timing

def time_ms(fn: Callable[[], object], device: str, dry: bool) -> float:
    """Mean milliseconds per call: CUDA events around back-to-back calls on a GPU."""
    import torch

    from bench.timing import measure

    if dry or device != "cuda":
        return 1e3 * measure(fn, device=device, warmup=0 if dry else 2, repeats=1 if dry else 5)
    torch.cuda.synchronize()
    estimate = measure(fn, device=device, warmup=0, repeats=1)
    calls = max(3, min(100, int(0.05 / max(estimate, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def peak_mb(fn: Callable[[], object], device: str) -> str:
    if device != "cuda":
        return "-"
    from bench.timing import cuda_peak_extra_bytes

    return f"{cuda_peak_extra_bytes(fn) / 2**20:.0f}"


class Rows:
    """One section's table rows, saved to ``path`` after every row (a section cut short by its
    time limit keeps what it checked). Each ``add`` checks, then times, one implementation of
    one case; ``failed`` says whether any row was wrong or raised."""

    def __init__(self, path: Path, device: str, dry: bool, copy_gbps: float | None):
        self.path, self.device, self.dry, self.copy_gbps = path, device, dry, copy_gbps
        self.rows: list[dict] = []
        self.extra: dict = {}
        self.failed = False

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.path.write_text(json.dumps(dict(rows=self.rows, failed=self.failed, **self.extra)))

    def add(self, case: str, op: str, impl: str, fn: Callable[[], object], nbytes: float, *,
            ref: Callable[[], object], bound: float, baseline_ms: float | None = None,
            memory: bool = False, timed: bool = True) -> float | None:
        """Compares fn() with ref() (the bound is on the relative Frobenius error), then times
        fn if it is right (and ``timed``). Returns ms, or None for a wrong, failed or untimed
        row (the section goes on; a wrong or failed row fails it)."""
        row = dict(case=case, op=op, impl=impl, bound=f"{bound:.1e}")
        ms = None
        try:
            err = rel_err(fn(), ref())  # the first call also warms up (compiles, caches)
            row["rel err"] = f"{err:.1e}"
            if not err <= bound:
                row.update(verdict="FAIL", ms="-", note="wrong result: not timed")
            elif not timed:
                row.update(verdict="ok", ms="-")
            else:
                ms = time_ms(fn, self.device, self.dry)
                gbps = nbytes / (ms * 1e-3) / 1e9
                row.update(verdict="ok", ms=f"{ms:.3f}", **{"GB/s": f"{gbps:.3g}"})
                if baseline_ms is not None:
                    row["x vs torch"] = f"{baseline_ms / ms:.2f}"
                if self.copy_gbps:
                    row["% copy BW"] = f"{100 * gbps / self.copy_gbps:.0f}"
                if memory:
                    row["peak MB"] = peak_mb(fn, self.device)
        except Exception as error:  # recorded in the table; the other rows still run
            note = f"{type(error).__name__}: {str(error)[:90]}"
            row.update(verdict="FAIL", ms="error", note=note)
            print(f"[{case} {op} {impl}] failed:\n{traceback.format_exc()}", flush=True)
        self.failed |= row["verdict"] == "FAIL"
        self.append(row)
        print(" | ".join(f"{c}={row.get(c, '')}" for c in COLUMNS if row.get(c)), flush=True)
        return ms


def once(fn: Callable[[], object]) -> Callable[[], object]:
    """fn, computed on the first call and kept (a case's reference serves all its rows)."""
    return functools.cache(fn)


def kernel_backends(op: str, dry: bool) -> list[str]:
    """The kernels checked and timed for ``op``: the CPU kernels in a dry run (Triton too,
    interpreted), else the GPU ones (no "cuda" for the ops without a CUDA kernel)."""
    from grass_kernels._backend import NO_CUDA_KERNEL

    if dry:
        return ["cpu", "triton"]
    return ["triton"] if op in NO_CUDA_KERNEL else ["cuda", "triton"]


def kernel_bound(op: str, backend: str, fp32_terms: float, dtype) -> float:
    import torch

    if backend == "triton" and op in TRITON_DOT_OPS and dtype != torch.float32:
        return max(TRITON_16BIT_BOUND, fp32_bound(fp32_terms))
    return fp32_bound(fp32_terms)


# ----------------------------------------------------------------------------- sections

def section_bandwidth(rows: Rows) -> None:
    import torch

    device, dry = rows.device, rows.dry
    numel = (1 << 20) if dry else (1 << 30)  # 2 GiB of bf16 on the GPU
    x = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    x.clone()  # warm-up: the allocator's first block
    ms = time_ms(lambda: x.clone(), device, dry)
    gbps = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9  # read + write
    row = dict(case=f"clone {x.numel() * 2 / 2**20:.0f} MiB", op="copy", impl="torch",
               verdict="ok", ms=f"{ms:.3f}", **{"GB/s": f"{gbps:.3g}", "% copy BW": "100"})
    print(f"copy bandwidth: {gbps:.3g} GB/s", flush=True)
    rows.extra["copy_gbps"] = gbps
    rows.append(row)


def section_flat(rows: Rows) -> None:
    import torch

    import grass_kernels as gk
    from grass_kernels import _tables, reference

    device, s = rows.device, flat_sizes(rows.dry)
    dtype = torch.bfloat16
    x = torch.randn(s["n"], s["d"], device=device, dtype=dtype)
    idx = gk.random_indices(s["d"], s["kp"], seed=1).to(device)
    scale = math.sqrt(s["d"] / s["kp"])
    x_bytes = x.numel() * x.element_size()
    for c in s["cs"]:
        case = f"N={s['n']} D={s['d']:.0e} k={s['k']} c={c}"
        codes = gk.sjlt_codes(s["d"], s["k"], c=c, seed=0, device=device)
        torch_sjlt = lambda: reference.sjlt(x, codes, s["k"])
        ref = once(torch_sjlt)
        terms = s["d"] * c / s["k"]
        base = rows.add(case, "sjlt", "torch index_add_ (reference)", torch_sjlt, x_bytes,
                        ref=ref, bound=0.0)
        for backend in kernel_backends("sjlt", rows.dry):
            rows.add(case, "sjlt", backend,
                     lambda b=backend: gk.sjlt(x, s["k"], c=c, backend=b), x_bytes,
                     ref=ref, bound=kernel_bound("sjlt", backend, terms, dtype),
                     baseline_ms=base)

        g_case = f"N={s['n']} D={s['d']:.0e} k'={s['kp']} k={s['k']} c={c}"
        g_bytes = s["n"] * s["kp"] * x.element_size()  # the selected entries only
        gcodes = gk.sjlt_codes(s["kp"], s["k"], c=c, seed=0, device=device)
        torch_grass = lambda: reference.grass(x, idx, gcodes, s["k"], scale)
        g_ref = once(torch_grass)
        g_terms = s["kp"] * c / s["k"]
        base = rows.add(g_case, "grass", "torch gather + index_add_ (reference)", torch_grass,
                        g_bytes, ref=g_ref, bound=0.0)
        for backend in kernel_backends("grass", rows.dry):
            rows.add(g_case, "grass", backend,
                     lambda b=backend: gk.grass(x, s["k"], indices=idx, c=c, backend=b),
                     g_bytes, ref=g_ref, bound=kernel_bound("grass", backend, g_terms, dtype),
                     baseline_ms=base)
            rows.add(g_case, "grass", f"unfused mask, then {backend} sjlt",
                     lambda b=backend: gk.sjlt(gk.mask(x, idx), s["k"], c=c, backend=b),
                     g_bytes, ref=g_ref, bound=TORCH_16BIT_BOUND, baseline_ms=base)


def unfused_fact_grass(acts, grads, in_idx, out_idx, buckets, signs, k):
    """The strong torch FactGraSS: index_select on (B*T, d), bmm to (B, k_o', k_i'), index_add_."""
    import torch

    b, t = acts.shape[:2]
    x = acts.reshape(b * t, -1).index_select(1, in_idx).view(b, t, -1)
    g = grads.reshape(b * t, -1).index_select(1, out_idx).view(b, t, -1)
    reduced = torch.bmm(g.transpose(1, 2), x).float().reshape(b, -1)  # (B, k_o' * k_i')
    out = torch.zeros(b, k, device=acts.device)
    return out.index_add_(1, buckets, reduced * signs)


def torch_logra(acts, grads, p_in, p_out):
    """LoGra in plain torch: two matmuls and an einsum."""
    import torch

    xi = acts @ p_in.T
    go = grads @ p_out.T
    return torch.einsum("bto,bti->boi", go.float(), xi.float()).reshape(acts.shape[0], -1)


def section_factorized(rows: Rows) -> None:
    import torch

    import grass_kernels as gk
    from grass_kernels import _tables, reference

    device, dry = rows.device, rows.dry
    s = factorized_sizes(dry)
    dtype = torch.bfloat16
    for name, d_in, d_out in s["layers"]:
        case = f"{name} B*T={s['b']}x{s['t']}"
        acts = torch.randn(s["b"], s["t"], d_in, device=device, dtype=dtype)
        grads = torch.randn(s["b"], s["t"], d_out, device=device, dtype=dtype)
        nbytes = (acts.numel() + grads.numel()) * acts.element_size()
        floor = lambda: acts.float().sum() + grads.float().sum()
        rows.add(case, "floor", "read X and dX once (sum)", floor, nbytes, ref=once(floor),
                 bound=fp32_bound(acts.numel()))

        ki, ko = min(s["mask_side"], d_in), min(s["mask_side"], d_out)
        in_idx = gk.random_indices(d_in, ki, seed=1).to(device)
        out_idx = gk.random_indices(d_out, ko, seed=2).to(device)
        codes = gk.sjlt_codes(ki * ko, s["k"], c=1, seed=0, device=device)
        buckets, signs = _tables.decode_codes(codes)
        scale = math.sqrt(d_in * d_out / (ki * ko))
        ref = once(lambda: reference.fact_grass(acts, grads, in_idx, out_idx, codes, s["k"],
                                                scale, None, False))
        base = rows.add(case, "fact_grass", "torch index_select+bmm+index_add_",
                        lambda: unfused_fact_grass(acts, grads, in_idx, out_idx, buckets[:, 0],
                                                   signs[:, 0] * scale, s["k"]),
                        nbytes, ref=ref, bound=TORCH_16BIT_BOUND, memory=True)
        terms = s["t"] * ki * ko / s["k"]
        for backend in kernel_backends("fact_grass", dry):
            rows.add(case, "fact_grass", backend,
                     lambda b=backend: gk.fact_grass(acts, grads, k=s["k"], in_indices=in_idx,
                                                     out_indices=out_idx, backend=b),
                     nbytes, ref=ref, bound=kernel_bound("fact_grass", backend, terms, dtype),
                     baseline_ms=base, memory=True)

        side = s["side"]
        p_in = gk.gaussian_matrix(d_in, side, seed=3, device=device)
        p_out = gk.gaussian_matrix(d_out, side, seed=4, device=device)
        p_in_lp, p_out_lp = p_in.to(dtype), p_out.to(dtype)
        ref = once(lambda: reference.logra(acts, grads, p_in, p_out, None, False))
        base = rows.add(case, "logra", "torch 2 matmuls + einsum",
                        lambda: torch_logra(acts, grads, p_in_lp, p_out_lp), nbytes, ref=ref,
                        bound=TORCH_16BIT_BOUND, memory=True)
        terms = s["t"] * max(d_in, d_out)
        for backend in kernel_backends("logra", dry):
            rows.add(case, "logra", backend,
                     lambda b=backend: gk.logra(acts, grads, p_in=p_in, p_out=p_out, backend=b,
                                                path="factorized"),
                     nbytes, ref=ref, bound=kernel_bound("logra", backend, terms, dtype),
                     baseline_ms=base, memory=True)

        codes_in = gk.sjlt_codes(d_in, side, c=1, seed=0, device=device)
        codes_out = gk.sjlt_codes(d_out, side, c=1, seed=1, device=device)
        torch_fact_sjlt = lambda: reference.fact_sjlt(acts, grads, codes_in, codes_out, side,
                                                      side, None, False)
        ref = once(torch_fact_sjlt)
        # fact_sjlt's torch side is the reference (two index_add_ sketches + einsum).
        base = rows.add(case, "fact_sjlt", "reference", torch_fact_sjlt, nbytes, ref=ref,
                        bound=0.0, memory=True)
        for backend in kernel_backends("fact_sjlt", dry):
            rows.add(case, "fact_sjlt", backend,
                     lambda b=backend: gk.fact_sjlt(acts, grads, k_in=side, k_out=side,
                                                    backend=b, path="factorized"),
                     nbytes, ref=ref, bound=kernel_bound("fact_sjlt", backend, terms, dtype),
                     baseline_ms=base, memory=True)
        del acts, grads, ref
        if device == "cuda":
            torch.cuda.empty_cache()


def section_attributor(rows: Rows) -> None:
    """Attributor on the checked device (backend None: the GPU defaults) against the CPU run
    (dry run: the CPU kernels against the reference backend) on the same model and data."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    import grass

    def loss_fn(model, batch):
        x, y = batch  # (B, T, 24), (B, T)
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(
            y.shape).mean(1)

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 10))

    g = torch.Generator().manual_seed(1)
    train = (torch.randn(24, 7, 24, generator=g), torch.randint(0, 10, (24, 7), generator=g))
    test = (torch.randn(5, 7, 24, generator=g), torch.randint(0, 10, (5, 7), generator=g))
    compressors = {
        "FactGraSS": lambda b: grass.FactGraSS(k=64, backend=b),
        "GraSS": lambda b: grass.GraSS(k=64, backend=b),
        "SJLT": lambda b: grass.SJLT(k=64, backend=b),
        "LoGra": lambda b: grass.LoGra(k=64, backend=b),
        "FactSJLT": lambda b: grass.FactSJLT(k=64, backend=b),
    }
    baseline_backend = "reference" if rows.dry else None

    def run(device: str, backend):
        def go(make):
            attr = grass.Attributor(make_model().to(device), loss_fn, make(backend),
                                    batch_size=8, device=device, progress=False)
            attr.cache(train)
            return attr.features(train).values, attr.attribute(test).cpu()
        return go

    # Features accumulate fp32 sums over tokens and layers; scores add a solve with the
    # damped Fisher, which may amplify the feature differences by its condition number.
    bounds = {"features": fp32_bound(1e4), "scores": 1e-3}
    for name, make in compressors.items():
        case = f"{name} 24 x 7 tokens"
        expected = once(lambda m=make: run("cpu", baseline_backend)(m))
        got = once(lambda m=make: run(rows.device, None)(m))
        for i, part in enumerate(("features", "scores")):
            rows.add(case, part, f"Attributor on {rows.device}", lambda i=i: got()[i], 0,
                     ref=lambda i=i: expected()[i], bound=bounds[part], timed=False)


SECTION_FUNCS = {"attributor": section_attributor, "bandwidth": section_bandwidth,
                 "flat": section_flat, "factorized": section_factorized}


def run_section(name: str, out: Path, dry: bool) -> int:
    """Child process: run one checking section, write its rows to out/section_<name>.json;
    returns 1 if a row failed."""
    sys.path.insert(0, str(ROOT))
    import torch

    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
    if dry:
        torch.set_num_threads(2)
    inject_fault_if_asked()
    bw_file = out / "section_bandwidth.json"
    copy_gbps = json.loads(bw_file.read_text()).get("copy_gbps") if bw_file.exists() else None
    rows = Rows(out / f"section_{name}.json", device, dry, copy_gbps)
    SECTION_FUNCS[name](rows)
    return 1 if rows.failed else 0


# ----------------------------------------------------------------------------- orchestration

class Log:
    """Echoes to stdout and appends to the log file as it goes (a cut-short run keeps it)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")


def child_env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # tests/conftest.py only sets TRITON_INTERPRET when it is unset: "0" makes Triton compile.
    env["TRITON_INTERPRET"] = "1" if dry else "0"
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    return env


def run_command(cmd: list[str], env: dict, timeout: float, log: Log) -> int:
    log(f"$ {' '.join(cmd)}  (time limit {timeout:.0f} s)")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        code = 124
    log(output.rstrip())
    log(f"-> exit {code} after {time.monotonic() - start:.1f} s")
    return code


def test_commands(args) -> list[tuple[list[str], bool]]:
    """(pytest command, whether exit 5 = "nothing selected" fails) per test run. The dry run
    only collects (TRITON_INTERPRET=1 there), which checks the commands and selections."""
    py = sys.executable
    runs = []
    for files, select, must_select in TEST_RUNS:
        present = [f for f in files if (ROOT / f).exists()]
        if not present:
            continue
        opts = ["--collect-only"] if args.dry_run else ["-rs", "--maxfail=20"]
        opts += ["-k", select] if select else []
        runs.append(([py, "-m", "pytest", *present, "-q", *opts, "-p", "no:cacheprovider"],
                     must_select and not args.dry_run))
    return runs


def section_commands(name: str, args, out: Path) -> list[list[str]]:
    py = sys.executable
    if name == "build":
        if args.dry_run:
            return []
        # The in-place build runs only if pip fails or leaves no loadable CUDA extension in
        # the source tree (which the checking and test processes import).
        return [[py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                [py, "-c", CHECK_EXTENSION],
                [py, "setup.py", "build_ext", "--inplace"],
                [py, "-c", CHECK_EXTENSION]]
    if name == "correctness":
        return [cmd for cmd, _ in test_commands(args)]
    cmd = [py, str(Path(__file__).resolve()), "--section", name, "--out", str(out)]
    return [cmd + (["--dry-run"] if args.dry_run else [])]


def section_status(name: str, codes: list[int], args) -> str:
    """"ok", or what failed. pytest exits 5 when its selection holds no test: a failure where
    the selection must select CUDA cases, fine in a collect-only dry run."""
    if name == "build":
        ok = codes[-1] == 0  # the last extension check passed
        return "ok" if ok else "FAIL (no loadable CUDA extension)"
    allowed_five = [not must for _, must in test_commands(args)] if name == "correctness" \
        else [False] * len(codes)
    failed = []
    for code, five_ok in zip(codes, allowed_five):
        if code == 0 or (code == 5 and five_ok):
            continue
        failed.append("timed out" if code == 124 else
                      "nothing selected" if code == 5 else f"exit {code}")
    return "ok" if not failed else "FAIL (" + ", ".join(failed) + ")"


def verdict(status: dict) -> tuple[bool, str]:
    """Whether the run failed, and the line that heads the table."""
    failed = [n for n, v in status.items() if v.startswith("FAIL")]
    unverified = [n for n in VERIFYING if status.get(n, "").startswith("skipped (out of time)")]
    if failed or unverified:
        parts = [f"{n}: {status[n]}" for n in failed] + [f"{n} not run" for n in unverified]
        return True, "**FAIL**: " + "; ".join(parts)
    not_run = [n for n, v in status.items() if v.startswith("skipped (out of time)")]
    tail = f" (timing not run: {', '.join(not_run)})" if not_run else ""
    return False, "PASS: every check that ran passed" + tail


def write_table(out: Path, status: dict, dry: bool) -> str:
    sys.path.insert(0, str(ROOT))
    from bench.timing import format_table

    rows = []
    for name in SECTIONS:
        f = out / f"section_{name}.json"
        if f.exists():
            rows += json.loads(f.read_text())["rows"]
    _, head = verdict(status)
    title = "# GPU check" + (" (dry run on the CPU: tiny sizes, not timings)" if dry else "")
    lines = [head, "", title, "", "Sections: " + ", ".join(f"{k}: {v}" for k, v in status.items()),
             "", "rel err = relative Frobenius error against the fp32 reference at the row's own "
             "shape (checked before timing; a row over its bound is not timed). x vs torch = "
             "torch baseline ms / this ms (same case, same run). GB/s counts the input bytes "
             "each op must read (grass: the selected entries only); % copy BW is against the "
             "measured clone bandwidth.", ""]
    text = "\n".join(lines) + (format_table(rows, COLUMNS) if rows else "(no rows)") + "\n"
    (out / "gpu_table.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes, cpu/triton-interpreter kernels")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT, else bench/results/)")
    parser.add_argument("--budget", type=float, default=570.0,
                        help="seconds for all sections together")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of the sections to run, in their order")
    parser.add_argument("--section", choices=sorted(SECTION_FUNCS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    chosen = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        return run_section(args.section, out, args.dry_run)

    for name in chosen:  # results of the other sections (an earlier command) stay
        (out / f"section_{name}.json").unlink(missing_ok=True)
    log = Log(out / "gpu_log.txt")
    deadline = time.monotonic() + args.budget
    env = child_env(args.dry_run)
    log(f"gpu_check {'(dry run) ' if args.dry_run else ''}python {sys.version.split()[0]}, "
        f"budget {args.budget:.0f} s, output {out}"
        + (f", {FAULT_ENV}=1" if os.environ.get(FAULT_ENV) == "1" else ""))
    run_command([sys.executable, "-c", VERSIONS], env, 60, log)
    status = {}
    for name in (s for s in SECTIONS if s in chosen):
        remaining = deadline - time.monotonic()
        commands = section_commands(name, args, out)
        if not commands:
            status[name] = "skipped (dry run)"
            continue
        if remaining < 10:
            status[name] = "skipped (out of time)"
            log(f"== {name}: skipped, {remaining:.0f} s left")
            continue
        log(f"\n== {name}")
        codes = []
        for i, cmd in enumerate(commands):
            if name == "build" and i == 2 and codes == [0, 0]:
                break  # pip built a loadable extension
            limit = min(CAPS[name], deadline - time.monotonic())
            codes.append(run_command(cmd, env, limit, log))
        status[name] = section_status(name, codes, args)
        write_table(out, status, args.dry_run)
        if name == "build" and status[name] != "ok":
            break  # nothing else can run without the extension
    failed, _ = verdict(status)
    table = write_table(out, status, args.dry_run)
    log("\n" + table)
    log(f"wrote {out / 'gpu_table.md'} and {out / 'gpu_log.txt'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
