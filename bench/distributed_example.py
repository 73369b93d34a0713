"""grass under torchrun: cache a digits MLP's training gradients across ranks, then score.

    torchrun --standalone --nproc-per-node 2 bench/distributed_example.py --store /tmp/digits-store
    python bench/distributed_example.py --store /tmp/digits-store      # one process, same result

Every rank trains the same model (the trainer is deterministic; the store's manifest refuses a
rank whose parameters differ), fills its shard of the store's missing rows, and joins the
all-reduced Fisher; scoring is sharded over train rows. Rerunning the same command after a
crash resumes: only the missing rows are computed, whatever the new number of processes.
On GPUs (nccl) each rank uses cuda:LOCAL_RANK; on CPUs gloo.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import grass
from grass.demo.digits import load_digits, per_example_loss


def _setup() -> torch.device:
    """Join the torchrun process group if launched by torchrun; the device of this rank."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # nccl collectives run on the current device
    if "RANK" in os.environ:  # set by torchrun / srun wrappers that export the env:// variables
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="store directory, shared by all ranks")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--k", type=int, default=256, help="features per layer (FactGraSS)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()

    device = _setup()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    task = load_digits(args.n_train, args.n_test)
    model = task.train().to(device)
    attr = grass.Attributor(model, per_example_loss, grass.FactGraSS(k=args.k), store=args.store,
                            batch_size=args.batch_size, progress=rank == 0)
    start = time.perf_counter()
    attr.cache((task.x_train, task.y_train))
    cached = time.perf_counter() - start
    values, indices = attr.top_k((task.x_test, task.y_test), args.top)
    if rank == 0:
        print(f"world size {world}: cache (missing rows + Fisher) took {cached:.2f} s; "
              f"store {attr.store}")
        for j in range(3):
            print(f"test {j}: top train rows {indices[j].tolist()}, "
                  f"scores {[round(v, 3) for v in values[j].tolist()]}")
    grass.distributed.shutdown()


if __name__ == "__main__":
    main()
