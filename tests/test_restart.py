"""torchrun --max-restarts: a run whose rank dies is restarted by torchrun and resumes its store.

Real torchrun (torch.distributed.run, --standalone, gloo on loopback) with 2 ranks and one
allowed restart; tests/restart_worker.py kills rank 1 in its third batch on the first attempt.
The restarted attempt must finish, end with store rows bit-identical to the single-process run
and the same scores, and leave no writer lease behind.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import grass
from grass.store_lock import LOCK_FILE
from test_distributed import N_TEST, N_TRAIN, TIMEOUT_S, _attributor, _data

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "restart_worker.py")


def test_torchrun_restart_resumes_the_store(tmp_path):
    single = _attributor(tmp_path / "single")
    single.cache(_data(N_TRAIN, 1))
    store, out = tmp_path / "store", tmp_path / "out.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", "1", WORKER, str(store), str(out)],
        env=env, capture_output=True, text=True, timeout=2 * TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(out)
    assert result["attempt"] == 1  # the first attempt died; the restart finished
    rows = grass.GradientStore.load(store).read(0, N_TRAIN)
    assert torch.equal(rows, single.store.read(0, N_TRAIN))
    torch.testing.assert_close(result["scores"], single.attribute(_data(N_TEST, 2)),
                               rtol=1e-5, atol=1e-6)
    assert not (store / LOCK_FILE).exists()
