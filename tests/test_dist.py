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
    tree = [t, (1.5, 3)]
    assert dist.sum_tree(tree) is tree
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


def _sum_tree_rank(rank: int, port: int, out) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    dist.reset()
    big = torch.arange(70_000, dtype=torch.float32) * (rank + 1)  # past SMALL_SUM: the reduce-scatter path
    got = dist.sum_tree([[torch.full((2, 2), rank + 1.0), big, 0.25 * (rank + 1)], (7 * rank + 1, [rank])])
    out.put((rank, got[0][0].tolist(), bool(torch.equal(got[0][1], big * 3 / (rank + 1))), got[0][2], got[1]))
    dist.reset()


def test_sum_tree_adds_every_leaf_over_two_ranks_and_keeps_the_structure():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sum_tree_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, small, big_ok, scalar, rest in res:
        assert small == [[3.0, 3.0], [3.0, 3.0]] and big_ok and scalar == 0.75, (rank, small, big_ok, scalar)
        assert rest == (9, [1]) and isinstance(rest[0], int) and isinstance(rest[1][0], int)
