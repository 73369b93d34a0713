"""The microbenchmark entry point users are promised: `python -m bench` (here --quick)."""

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )


def _table(text, name):
    """The rows of the markdown table after '## name' as dicts of column -> cell."""
    lines = text.split(f"## {name}\n", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_quick_tables(tmp_path):
    out = tmp_path / "tables.md"
    result = _run("--quick", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("torch ") and ", 1 threads," in text.splitlines()[0]
    assert "## factorized.table" in result.stdout  # printed as well as written
    # The profiler's status lines (kineto) are kept out of the user's terminal.
    assert "profiler_start" not in result.stderr and "USDT" not in result.stderr

    factorized = _table(text, "factorized.table")
    assert [r["layer"].split()[1] for r in factorized] == ["c_fc", "q_proj", "up_proj"]
    for row in factorized:
        columns = ("logra_torch/logra", "unfused/fact_grass", "cross-method logra_torch/fact_grass")
        for column in columns:
            ratio = float(row[column].rstrip("x"))
            assert math.isfinite(ratio) and ratio > 0, (row["layer"], column)
        # The fused kernels hold no per-example gradient: far below materialising G_i.
        assert float(row["fact_grass peak MB"]) < 4
    for row in _table(text, "factorized.path_table"):
        assert row["rule picks"] in ("factorized", "materialize")
    assert _table(text, "flat.table")


def test_bad_threads():
    result = _run("--quick", "--threads", "0", "--only", "flat")
    assert result.returncode != 0
    assert "--threads must be at least 1" in result.stderr
