"""A torchrun worker for test_restart.py: rank 1 dies in its third batch on the first attempt;
torchrun --max-restarts restarts every rank, and the restarted run resumes the store."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # test_distributed, and bench.ranks beside tests/
from test_distributed import N_TEST, N_TRAIN, _attributor, _counting, _data  # noqa: E402

from grass import distributed  # noqa: E402
from grass.demo.digits import per_example_loss  # noqa: E402


def main(store: str, out: str) -> None:
    torch.set_num_threads(1)
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    distributed.init_torchrun("gloo")
    with distributed.leaving_group():
        rank = dist.get_rank()
        counter = [0, 0]
        loss = _counting(per_example_loss, counter, 2 if (rank, attempt) == (1, 0) else None)
        attr = _attributor(store, loss=loss)
        attr.cache(_data(N_TRAIN, 1))
        scores = attr.attribute(_data(N_TEST, 2))
        if rank == 0:
            torch.save({"attempt": attempt, "scores": scores}, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
