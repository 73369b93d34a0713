"""One-shot GPU check: build, time, test, in one call of a few minutes on a lent GPU.

    python bench/gpu_check.py              # on the GPU machine (repository root as cwd or not)
    python bench/gpu_check.py --dry-run    # here, on the CPU: tiny sizes, every code path but
                                           # the build and CUDA timing

Sections, each in its own subprocess (a CUDA fault cannot take the others down) and under a
time limit drawn from one overall budget:
    build       pip install --no-build-isolation --no-deps -e .  (TORCH_CUDA_ARCH_LIST=9.0)
    bandwidth   device copy bandwidth (a large clone): the yardstick for every GB/s figure
    flat        sjlt / grass at N = 64, D = 1e7 bf16, k = 4096, c in {1, 4}: CUDA vs Triton vs
                torch (index_add_), plus unfused mask-then-SJLT
    factorized  fact_grass / fact_sjlt / logra at B*T = 8 x 1024 bf16 on GPT-2 and Llama-3.1-8B
                layer shapes, every backend vs torch baselines (LoGra: two matmuls + einsum;
                FactGraSS: index_select + bmm + index_add_) and the read-once floor
    tests       pytest on the GPU-relevant tests with TRITON_INTERPRET=0 (Triton compiles)

Output: a markdown table (printed, and written to $OUT/gpu_table.md) and the full log
($OUT/gpu_log.txt); OUT defaults to bench/results/. Both are rewritten after every section,
so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
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
SECTIONS = ("build", "bandwidth", "flat", "factorized", "tests")
# Upper time limits per section (seconds); each also gets no more than what the budget has left.
CAPS = {"build": 240, "bandwidth": 40, "flat": 90, "factorized": 150, "tests": 200}
# GPU test runs: files written for the GPU run whole; in the others (which mix CPU cases, and
# whose Triton-on-CPU cases need the interpreter) only the CUDA-device cases.
TEST_RUNS = ((("tests/test_cuda_build.py", "tests/test_triton.py"), None),
             (("tests/test_flat.py", "tests/test_factorized.py"), "cuda or gpu"))
VERSIONS = ("import torch, importlib.util as u; "
            "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', "
            "torch.cuda.is_available() and torch.cuda.get_device_name()); "
            "print('triton', u.find_spec('triton') and __import__('triton').__version__)")
CHECK_EXTENSION = ("import torch, grass_kernels._C; "
                   "assert torch._C._dispatch_has_kernel_for_dispatch_key("
                   "'grass_kernels::fact_grass', 'CUDA'), 'no CUDA kernels'; print('extension ok')")
COLUMNS = ["case", "op", "impl", "ms", "x vs torch", "GB/s", "% copy BW", "peak MB", "note"]


# ----------------------------------------------------------------------------- sizes

def flat_sizes(dry: bool) -> dict:
    if dry:
        return dict(n=4, d=3001, k=64, cs=(1, 4), kp=256)
    return dict(n=64, d=10_000_000, k=4096, cs=(1, 4), kp=4 * 4096)


# (name, d_in, d_out): Llama-3.1-8B and GPT-2-small linear layers, the key shapes
# (the Llama MLP) first in case the section runs out of time.
LAYERS = [
    ("llama 4096x14336", 4096, 14336), ("llama 14336x4096", 14336, 4096),
    ("llama 4096x4096", 4096, 4096), ("llama 4096x1024", 4096, 1024),
    ("gpt2 768x3072", 768, 3072), ("gpt2 3072x768", 3072, 768),
    ("gpt2 768x2304", 768, 2304), ("gpt2 768x768", 768, 768),
]


def factorized_sizes(dry: bool) -> dict:
    if dry:  # every layer shrunk 16x, 2 x 8 tokens, small sketches
        layers = [(f"{name} /16", d_in // 16, d_out // 16) for name, d_in, d_out in LAYERS]
        return dict(b=2, t=8, layers=layers, k=256, mask_side=32, side=16)
    return dict(b=8, t=1024, layers=LAYERS, k=4096, mask_side=128, side=64)


# ----------------------------------------------------------------------------- timing

def time_ms(fn: Callable[[], object], device: str, dry: bool) -> float:
    """Mean milliseconds per call: CUDA events around back-to-back calls on a GPU."""
    import torch

    from bench.timing import measure

    if dry or device != "cuda":
        return 1e3 * measure(fn, device=device, warmup=0 if dry else 2, repeats=1 if dry else 5)
    fn()  # compile / warm caches
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
    time limit keeps what it measured). Each ``add`` times one implementation of one case."""

    def __init__(self, path: Path, device: str, dry: bool, copy_gbps: float | None):
        self.path, self.device, self.dry, self.copy_gbps = path, device, dry, copy_gbps
        self.rows: list[dict] = []
        self.extra: dict = {}

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.path.write_text(json.dumps(dict(rows=self.rows, **self.extra)))

    def add(self, case: str, op: str, impl: str, fn: Callable[[], object], nbytes: float,
            baseline_ms: float | None = None, memory: bool = False) -> float | None:
        """Times fn; returns ms, or None after recording the error (the section goes on)."""
        row = dict(case=case, op=op, impl=impl)
        try:
            ms = time_ms(fn, self.device, self.dry)
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(ms=f"{ms:.3f}", **{"GB/s": f"{gbps:.3g}"})
            if baseline_ms is not None:
                row["x vs torch"] = f"{baseline_ms / ms:.2f}"
            if self.copy_gbps:
                row["% copy BW"] = f"{100 * gbps / self.copy_gbps:.0f}"
            if memory:
                row["peak MB"] = peak_mb(fn, self.device)
        except Exception as error:  # recorded in the table; the other rows still run
            ms = None
            row.update(ms="error", note=f"{type(error).__name__}: {str(error)[:90]}")
            print(f"[{case} {op} {impl}] failed:\n{traceback.format_exc()}", flush=True)
        self.append(row)
        print(" | ".join(f"{c}={row.get(c, '')}" for c in COLUMNS if row.get(c)), flush=True)
        return ms


def kernel_backends(dry: bool) -> list[str]:
    return ["reference", "cpu", "triton"] if dry else ["cuda", "triton", "reference"]


# ----------------------------------------------------------------------------- sections

def section_bandwidth(rows: Rows) -> None:
    import torch

    device, dry = rows.device, rows.dry
    numel = (1 << 20) if dry else (1 << 30)  # 2 GiB of bf16 on the GPU
    x = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    ms = time_ms(lambda: x.clone(), device, dry)
    gbps = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9  # read + write
    row = dict(case=f"clone {x.numel() * 2 / 2**20:.0f} MiB", op="copy", impl="torch",
               ms=f"{ms:.3f}", **{"GB/s": f"{gbps:.3g}", "% copy BW": "100"})
    print(f"copy bandwidth: {gbps:.3g} GB/s", flush=True)
    rows.extra["copy_gbps"] = gbps
    rows.append(row)


def section_flat(rows: Rows) -> None:
    import torch

    import grass_kernels as gk
    from grass_kernels import _tables, reference

    device, s = rows.device, flat_sizes(rows.dry)
    x = torch.randn(s["n"], s["d"], device=device, dtype=torch.bfloat16)
    idx = gk.random_indices(s["d"], s["kp"], seed=1).to(device)
    scale = math.sqrt(s["d"] / s["kp"])
    x_bytes = x.numel() * x.element_size()
    for c in s["cs"]:
        case = f"N={s['n']} D={s['d']:.0e} k={s['k']} c={c}"
        codes = _tables.sjlt_codes(s["d"], s["k"], c, 0, device)
        base = rows.add(case, "sjlt", "torch index_add_ (reference)",
                        lambda: reference.sjlt(x, codes, s["k"]), x_bytes)
        for backend in kernel_backends(rows.dry):
            if backend != "reference":
                rows.add(case, "sjlt", backend,
                         lambda b=backend: gk.sjlt(x, s["k"], c=c, backend=b), x_bytes, base)

        g_case = f"N={s['n']} D={s['d']:.0e} k'={s['kp']} k={s['k']} c={c}"
        g_bytes = s["n"] * s["kp"] * x.element_size()  # the selected entries only
        gcodes = _tables.sjlt_codes(s["kp"], s["k"], c, 0, device)
        base = rows.add(g_case, "grass", "torch gather + index_add_ (reference)",
                        lambda: reference.grass(x, idx, gcodes, s["k"], scale), g_bytes)
        for backend in kernel_backends(rows.dry):
            if backend == "reference":
                continue
            rows.add(g_case, "grass", backend,
                     lambda b=backend: gk.grass(x, s["k"], indices=idx, c=c, backend=b),
                     g_bytes, base)
            rows.add(g_case, "grass", f"unfused mask, then {backend} sjlt",
                     lambda b=backend: gk.sjlt(gk.mask(x, idx), s["k"], c=c, backend=b),
                     g_bytes, base)


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
    from grass_kernels import _tables

    device, dry = rows.device, rows.dry
    s = factorized_sizes(dry)
    dtype = torch.bfloat16
    for name, d_in, d_out in s["layers"]:
        case = f"{name} B*T={s['b']}x{s['t']}"
        acts = torch.randn(s["b"], s["t"], d_in, device=device, dtype=dtype)
        grads = torch.randn(s["b"], s["t"], d_out, device=device, dtype=dtype)
        nbytes = (acts.numel() + grads.numel()) * acts.element_size()
        rows.add(case, "floor", "read X and dX once (sum)",
                 lambda: (acts.sum(), grads.sum()), nbytes)

        ki, ko = min(s["mask_side"], d_in), min(s["mask_side"], d_out)
        in_idx = gk.random_indices(d_in, ki, seed=1).to(device)
        out_idx = gk.random_indices(d_out, ko, seed=2).to(device)
        codes = _tables.sjlt_codes(ki * ko, s["k"], 1, 0, device)
        buckets, signs = _tables.decode_codes(codes)
        signs = signs[:, 0] * math.sqrt(d_in * d_out / (ki * ko))
        base = rows.add(case, "fact_grass", "torch index_select+bmm+index_add_",
                        lambda: unfused_fact_grass(acts, grads, in_idx, out_idx, buckets[:, 0],
                                                   signs, s["k"]), nbytes, memory=True)
        for backend in kernel_backends(dry):
            rows.add(case, "fact_grass", backend,
                     lambda b=backend: gk.fact_grass(acts, grads, s["k"], in_indices=in_idx,
                                                     out_indices=out_idx, backend=b),
                     nbytes, base, memory=True)

        side = s["side"]
        p_in = gk.gaussian_matrix(side, d_in, seed=3, device=device)
        p_out = gk.gaussian_matrix(side, d_out, seed=4, device=device)
        p_in_lp, p_out_lp = p_in.to(dtype), p_out.to(dtype)
        base = rows.add(case, "logra", "torch 2 matmuls + einsum",
                        lambda: torch_logra(acts, grads, p_in_lp, p_out_lp), nbytes, memory=True)
        for backend in kernel_backends(dry):
            rows.add(case, "logra", backend,
                     lambda b=backend: gk.logra(acts, grads, p_in=p_in, p_out=p_out, backend=b),
                     nbytes, base, memory=True)
        # fact_sjlt's torch side is the reference (two index_add_ sketches + einsum).
        base = None
        for backend in ["reference"] + [b for b in kernel_backends(dry) if b != "reference"]:
            ms = rows.add(case, "fact_sjlt", backend,
                          lambda b=backend: gk.fact_sjlt(acts, grads, k_in=side, k_out=side,
                                                         backend=b),
                          nbytes, base, memory=True)
            base = ms if backend == "reference" else base
        del acts, grads
        if device == "cuda":
            torch.cuda.empty_cache()


SECTION_FUNCS = {"bandwidth": section_bandwidth, "flat": section_flat,
                 "factorized": section_factorized}


def run_section(name: str, out: Path, dry: bool) -> None:
    """Child process: run one timing section, write its rows to out/section_<name>.json."""
    sys.path.insert(0, str(ROOT))
    import torch

    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
    if dry:
        torch.set_num_threads(2)
    bw_file = out / "section_bandwidth.json"
    copy_gbps = json.loads(bw_file.read_text()).get("copy_gbps") if bw_file.exists() else None
    SECTION_FUNCS[name](Rows(out / f"section_{name}.json", device, dry, copy_gbps))


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


def section_commands(name: str, args, out: Path) -> list[list[str]]:
    py = sys.executable
    if name == "build":
        if args.dry_run:
            return []
        # The in-place build runs only if pip fails or leaves no loadable CUDA extension in
        # the source tree (which the timing and test processes import).
        return [[py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                [py, "-c", CHECK_EXTENSION],
                [py, "setup.py", "build_ext", "--inplace"],
                [py, "-c", CHECK_EXTENSION]]
    if name == "tests":
        runs = []
        for files, select in TEST_RUNS:
            present = [f for f in files if (ROOT / f).exists()]
            # The dry run only collects (TRITON_INTERPRET=1 there, so it checks the commands).
            opts = ["--collect-only"] if args.dry_run else ["--maxfail=10"]
            opts += ["-k", select] if select else []
            if present:
                runs.append([py, "-m", "pytest", *present, "-q", *opts, "-p", "no:cacheprovider"])
        return runs
    cmd = [py, str(Path(__file__).resolve()), "--section", name, "--out", str(out)]
    return [cmd + (["--dry-run"] if args.dry_run else [])]


def write_table(out: Path, status: dict, dry: bool) -> str:
    sys.path.insert(0, str(ROOT))
    from bench.timing import format_table

    rows = []
    for name in SECTIONS:
        f = out / f"section_{name}.json"
        if f.exists():
            rows += json.loads(f.read_text())["rows"]
    title = "# GPU check" + (" (dry run on the CPU: tiny sizes, not timings)" if dry else "")
    lines = [title, "", "Sections: " + ", ".join(f"{k}: {v}" for k, v in status.items()),
             "", "x vs torch = torch baseline ms / this ms (same case, same run). GB/s counts "
             "the input bytes each op must read (grass: the selected entries only); "
             "% copy BW is against the measured clone bandwidth.", ""]
    text = "\n".join(lines) + (format_table(rows, COLUMNS) if rows else "(no timings)") + "\n"
    (out / "gpu_table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes, reference/cpu/triton-interpreter backends")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT, else bench/results/)")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds for all sections together")
    parser.add_argument("--section", choices=sorted(SECTION_FUNCS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.section:
        run_section(args.section, out, args.dry_run)
        return

    for stale in out.glob("section_*.json"):
        stale.unlink()
    log = Log(out / "gpu_log.txt")
    deadline = time.monotonic() + args.budget
    env = child_env(args.dry_run)
    log(f"gpu_check {'(dry run) ' if args.dry_run else ''}python {sys.version.split()[0]}, "
        f"budget {args.budget:.0f} s, output {out}")
    run_command([sys.executable, "-c", VERSIONS], env, 60, log)
    status = {}
    for name in SECTIONS:
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
        # pytest exits 5 when a selection holds no test (e.g. no CUDA cases in a file).
        failed = [c for c in codes if c not in (0, 5)]
        if name == "build" and codes[-1] == 0:
            failed = []  # the last check passed
        status[name] = "ok" if not failed else ", ".join(
            "timed out" if c == 124 else f"exit {c}" for c in failed)
        write_table(out, status, args.dry_run)
    table = write_table(out, status, args.dry_run)
    log("\n" + table)
    log(f"wrote {out / 'gpu_table.md'} and {out / 'gpu_log.txt'}")


if __name__ == "__main__":
    main()
