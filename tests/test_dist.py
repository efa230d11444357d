"""weightsmith.dist without a launcher: the identity; its pure parts (sharding, owners) for any size."""

from __future__ import annotations

import torch

from weightsmith import dist


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.reset()
    w = dist.world()
    assert (w.rank, w.size, w.distributed, w.is_main) == (0, 1, False, True)
    t = torch.arange(6.0)
    assert dist.sum_ordered(t) is t
    assert dist.shard(10) == slice(0, 10)
    assert dist.gather_objects("x") == ["x"]
    dist.reset()


def test_shards_cover_every_item_once_in_rank_order():
    for n in (0, 1, 7, 32, 33):
        for size in (1, 2, 3, 8):
            blocks = [dist.shard(n, dist.World(rank=r, size=size)) for r in range(size)]
            assert [i for b in blocks for i in range(n)[b]] == list(range(n))
            assert max(b.stop - b.start for b in blocks) - min(b.stop - b.start for b in blocks) <= 1


def test_owners_balance_cost_and_are_deterministic():
    costs = [9.0, 1.0, 1.0, 4.0, 4.0, 1.0]
    owners = dist.assign_owners(costs, size=2)
    assert owners == dist.assign_owners(list(costs), size=2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(load) == [10.0, 10.0]
    assert dist.assign_owners(costs, size=1) == [0] * len(costs)
