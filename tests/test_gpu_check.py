"""bench/gpu_check.py gives a verdict: its CPU dry run passes, and a run with a wrong kernel
injected (GRASS_GPU_CHECK_INJECT_FAULT=1) reports FAIL and exits non-zero. The faulty run covers
the two sections that call the faulty op (the whole dry run, twice, would be slow for CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(out: Path, fault: bool) -> tuple[int, str, dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GRASS_GPU_CHECK_INJECT_FAULT", None)
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)]
    if fault:
        env["GRASS_GPU_CHECK_INJECT_FAULT"] = "1"
        cmd += ["--sections", "attributor,factorized"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    table = (out / "gpu_table.md").read_text()
    rows = {}
    for name in ("attributor", "flat", "factorized"):
        path = out / f"section_{name}.json"
        rows[name] = json.loads(path.read_text())["rows"] if path.exists() else []
    return run.returncode, table, rows, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_dry_run_passes_and_an_injected_fault_fails(tmp_path):
    code, table, rows, log = _dry_run(tmp_path / "clean", fault=False)
    assert code == 0, log
    assert table.startswith("PASS"), table[:2000]
    checked = [r for section in rows.values() for r in section]
    assert checked and all(r["verdict"] == "ok" for r in checked), table
    assert any(r["op"] == "fact_grass" and r["impl"] == "cpu" for r in rows["factorized"])

    code, table, rows, log = _dry_run(tmp_path / "fault", fault=True)
    assert code == 1, log
    assert table.startswith("**FAIL**"), table[:2000]
    failed = {(r["op"], r["impl"]) for s in rows.values() for r in s if r["verdict"] == "FAIL"}
    # The faulty kernel rows fail; nothing else does (the reference and the other ops are
    # untouched), and the Attributor built on FactGraSS catches it end to end.
    assert ("fact_grass", "cpu") in failed and ("fact_grass", "triton") in failed, failed
    assert {op for op, _ in failed} <= {"fact_grass", "features", "scores"}, failed
    attributor_failed = [r["case"] for r in rows["attributor"] if r["verdict"] == "FAIL"]
    assert attributor_failed and all(c.startswith("FactGraSS") for c in attributor_failed)
