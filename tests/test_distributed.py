"""grass.distributed: real multi-process runs (gloo on 127.0.0.1, torch.multiprocessing spawn).

The single-process Attributor on the same data is the reference: a distributed cache must give
bit-identical store rows (every batch is computed the same way, only by another rank) and the
same Fisher, scores (also per layer and cosine), top-k and self-influence to fp32 rounding,
with each layer's curvature held by exactly one rank (sharded by layer). A rank killed
mid-cache, then a resume with another world size, must end identical too, computing only the
missing rows; a run with another configuration on the same store is refused on every rank.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

import grass
from bench.ranks import free_port, gloo_group, launch
from grass import distributed
from grass.demo.digits import make_mlp, per_example_loss
from grass.store import StoreError

N_TRAIN, N_TEST, BATCH, TOP = 61, 7, 4, 5  # odd sizes: shards and batches never line up
TIMEOUT_S = 90  # a hung group is killed, never waited on forever


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _attributor(store, *, seed: int = 0, loss=per_example_loss) -> grass.Attributor:
    model = make_mlp(16, 12, 5, seed=3)
    return grass.Attributor(model, loss, grass.FactGraSS(k=16), store=store, batch_size=BATCH,
                            seed=seed, progress=False)


def _results(attr: grass.Attributor, test) -> dict[str, torch.Tensor]:
    values, indices = attr.top_k(test, TOP)
    cos_values, cos_indices = attr.top_k(test, TOP, cosine=True)
    return {"scores": attr.attribute(test), "top_values": values, "top_indices": indices,
            "self_influence": attr.self_influence(),
            "layer_scores": attr.attribute(test, per_layer=True),
            "cosine": attr.attribute(test, cosine=True, per_layer=True),
            "cosine_top_values": cos_values, "cosine_top_indices": cos_indices,
            "layer_self_influence": attr.self_influence(per_layer=True),
            **{f"fisher/{n}": f for n, f in distributed.fisher(attr.store).items()}}


def _counting(loss_fn, counter: list[int], die_after: int | None):
    """loss_fn that counts the examples it sees and, after ``die_after`` batches, kills the
    process the hard way (no cleanup, no exception): what a preempted node does."""
    def loss(model, batch):
        if die_after is not None and counter[1] == die_after:
            os._exit(17)
        counter[0] += batch[0].shape[0]
        counter[1] += 1
        return loss_fn(model, batch)
    return loss


def _worker(rank: int, world: int, port: int, store: str, out: str, die: tuple[int, int] | None):
    """One rank: cache, score, save the results (rank 0) and its example count."""
    with gloo_group(rank, world, port, TIMEOUT_S):
        counter = [0, 0]
        victim, after = die if die is not None else (-1, None)
        loss = _counting(per_example_loss, counter, after if rank == victim else None)
        attr = _attributor(store, loss=loss)
        attr.cache(_data(N_TRAIN, 1))
        cached = counter[0]  # before scoring, which captures test examples too
        results = _results(attr, _data(N_TEST, 2))
        # Another configuration on the same store: refused on every rank, not only rank 0.
        try:
            _attributor(store, seed=1).cache(_data(N_TRAIN, 1))
            refused = "no"
        except StoreError as e:
            refused = str(e)
        try:
            _attributor(None).cache(_data(N_TRAIN, 1))
            in_memory = "no"
        except ValueError as e:
            in_memory = str(e)
        owned = sorted(attr._scorer_checked().owned.factors)  # curvature held on this rank
        torch.save({"examples": cached, "refused": refused, "in_memory": in_memory,
                    "results": results, "owned": owned}, os.path.join(out, f"rank{rank}.pt"))


def _launch(world: int, store, out, die=None) -> None:
    """Run ``world`` ranks of _worker; raises ProcessExitedException if one dies."""
    os.makedirs(out, exist_ok=True)
    launch(_worker, world, (world, free_port(), str(store), str(out), die), TIMEOUT_S)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run: the store rows and results every distributed run must match."""
    path = tmp_path_factory.mktemp("single") / "store"
    attr = _attributor(path)
    attr.cache(_data(N_TRAIN, 1))
    return attr.store.read(0, N_TRAIN), _results(attr, _data(N_TEST, 2))


def _check_run(out, world: int, single) -> list[dict]:
    rows, expected = single
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    for rank in ranks:
        assert rank["refused"].startswith("rank 0: the store at")
        assert "config.seed" in rank["refused"]
        assert "store must be a directory" in rank["in_memory"]
        for name, value in expected.items():
            if name.startswith("fisher/"):  # a rank computes only the layers it owns
                assert (name in rank["results"]) == (name[7:] in rank["owned"]), name
                if name not in rank["results"]:
                    continue
            got = rank["results"][name]
            assert got.shape == value.shape, name
            if name.endswith("top_indices"):
                assert torch.equal(got, value)
            else:
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=name)
    # Each layer's curvature lives on exactly one rank.
    owned = [name for rank in ranks for name in rank["owned"]]
    assert sorted(owned) == sorted(name[7:] for name in expected if name.startswith("fisher/"))
    return ranks


def test_layer_owners_balance_k_squared():
    layers = {"a": 64, "b": 16, "c": 16, "d": 16, "e": 16, "f": 32, "g": 32}
    owners = distributed.layer_owners(layers, 2)
    loads = [sum(k * k for n, k in layers.items() if owners[n] == r) for r in range(2)]
    assert loads == [4096, 3072]  # a | f, g, b..e: the best split of 7168
    assert distributed.layer_owners(layers, 1) == dict.fromkeys(layers, 0)
    spread = distributed.layer_owners({"x": 8, "y": 8}, 3)
    assert sorted(spread.values()) == [0, 1]  # a third rank owns nothing


def test_split_partitions_rows_in_balanced_contiguous_shards():
    ranges = [(0, 3), (7, 8), (10, 20), (25, 26)]
    rows = [i for a, b in ranges for i in range(a, b)]
    for parts in (1, 2, 3, 5, 20):
        shards = [distributed.split(ranges, parts, r) for r in range(parts)]
        got = [i for shard in shards for a, b in shard for i in range(a, b)]
        assert got == rows
        sizes = [sum(b - a for a, b in shard) for shard in shards]
        assert max(sizes) - min(sizes) <= 1
    assert distributed.split([], 3, 1) == []


def test_two_ranks_match_single_process(tmp_path, single):
    _launch(2, tmp_path / "store", tmp_path / "out")
    ranks = _check_run(tmp_path / "out", 2, single)
    store = grass.GradientStore.load(tmp_path / "store")
    assert torch.equal(store.read(0, N_TRAIN), single[0])  # same batches, same bits
    assert sorted(os.listdir(tmp_path / "store" / "progress")) == ["rank0.json", "rank1.json"]
    assert sum(r["examples"] for r in ranks) <= N_TRAIN + BATCH  # one batch may straddle shards


def test_killed_rank_resumes_with_another_world_size(tmp_path, single):
    path = tmp_path / "store"
    with pytest.raises(ProcessExitedException, match="exit code 17"):
        _launch(2, path, tmp_path / "killed", die=(1, 3))  # rank 1 dies in its 4th batch
    missing = grass.GradientStore.load(path).missing()
    n_missing = sum(b - a for a, b in missing)
    assert 0 < n_missing < N_TRAIN  # rank 1 wrote 3 batches before it died
    _launch(3, path, tmp_path / "resumed")
    ranks = _check_run(tmp_path / "resumed", 3, single)
    # Only missing rows were computed (plus partial batches at shard edges), not the store.
    assert n_missing <= sum(r["examples"] for r in ranks) <= n_missing + 3 * BATCH
    assert torch.equal(grass.GradientStore.load(path).read(0, N_TRAIN), single[0])
