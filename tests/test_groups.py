"""``group=``: every collective of the library over a sub-group (a data-parallel group of a
DP x TP or HSDP job), on 2 gloo processes (one group per rank) and on 4 (groups {0, 1} and
{2, 3}). The references are single-process computations on the group's rows only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist_workers import destroy_in_process, global_tensor, launch

import momentum_contrast.distributed as mcd
from momentum_contrast import KeyQueue, symmetric_contrastive_loss

pytestmark = pytest.mark.xdist_group("groups")
ROWS, DIM, QUEUE = 3, 4, 16


def groups_of(world: int) -> list[list[int]]:
    return [[r] for r in range(world)] if world == 2 else [[0, 1], [2, 3]]


def rank_rows(seed: int, r: int) -> torch.Tensor:
    """Rank ``r``'s rows; rank ``r`` passes ``r + ROWS`` of them (unequal on purpose)."""
    return global_tensor(seed, 4 * (ROWS + 4), DIM)[r * (ROWS + 4) : r * (ROWS + 4) + ROWS + r]


def scenario_groups() -> dict[str, Any]:
    world, me = dist.get_world_size(), dist.get_rank()
    mine = next(g for g in groups_of(world) if me in g)
    subgroups = [dist.new_group(g) for g in groups_of(world)]  # every rank makes every group
    # this rank's own group: new_group's NON_GROUP_MEMBER (-100) is for the others
    group = cast(dist.ProcessGroup, subgroups[groups_of(world).index(mine)])
    out: dict[str, Any] = {"members": mine, "rank": mcd.rank(group)}
    out["world"] = mcd.world_size(group)
    out["sizes"] = mcd.gather_sizes(10 + me, group=group)
    out["gathered"] = mcd.concat_all_gather(rank_rows(1, me), group=group)
    x = rank_rows(2, me)
    shuffled, idx = mcd.batch_shuffle(x, torch.Generator().manual_seed(me), group=group)
    out["shuffled"] = shuffled
    keys = mcd.batch_unshuffle(shuffled * 2, idx, group=group)
    out["unshuffled"] = keys
    if mcd.world_size(group) > 1:  # (alone, a gather is x.detach(): an alias of the keys)
        mcd.concat_all_gather(keys, group=group).add_(100.0)  # takes the attached gather
    out["regathered"] = mcd.concat_all_gather(keys, group=group)  # a new gather, unharmed
    # a DP x TP job's tensor-parallel peers (ranks r and r + 2 of world 4, in other groups)
    # pass the same batch: a generator seeded alike gives them the same Shuffle-BN rows;
    # their own seeds (each group's rank 0 draws) give them other rows
    tp_batch = global_tensor(20, 8, DIM)[4 * mine.index(me) : 4 * mine.index(me) + 4]
    out["tp_alike"] = mcd.batch_shuffle(tp_batch, torch.Generator().manual_seed(7), group=group)[0]
    torch.manual_seed(100 + me)
    out["tp_own_seeds"] = mcd.batch_shuffle(tp_batch, group=group)[0]
    torch.manual_seed(me)  # every rank its own seed: the initial keys are still everyone's
    queue = KeyQueue(QUEUE, DIM, dtype=torch.float64)
    out["initial"] = queue.negatives()
    queue.push(keys, group=group)  # reuses the unshuffle's gather
    out["queue"] = queue.keys.clone()
    with mcd.assume_equal_batches():  # one row each: equal batches inside the group
        out["equal"] = mcd.concat_all_gather(rank_rows(3, me)[:1], group=group)
    q1, q2, k1, k2 = (rank_rows(10 + i, me)[:2] for i in range(4))
    out["loss"] = symmetric_contrastive_loss(q1, q2, k1, k2, temperature=0.5, group=group)
    # another group's object (this rank is not in it): refused before any collective, where
    # the loss was the local one and the queue skipped rank 0's keys with torch's warning
    other = cast(dist.ProcessGroup, subgroups[1 - groups_of(world).index(mine)])  # -100 here
    fresh = KeyQueue(QUEUE, DIM, dtype=torch.float64)
    calls = {
        "loss": lambda: symmetric_contrastive_loss(q1, q2, k1, k2, group=other),
        "push": lambda: fresh.push(keys, group=other),
        "gather": lambda: mcd.concat_all_gather(keys, group=other),
        "sizes": lambda: mcd.gather_sizes(1, group=other),
        "shuffle": lambda: mcd.batch_shuffle(x, group=other),
    }
    out["refused"] = {}
    for name, call in calls.items():
        try:
            call()
            out["refused"][name] = "no error"
        except ValueError as e:
            out["refused"][name] = str(e)
    with mcd.assume_equal_batches():
        try:
            mcd.concat_all_gather(keys, group=other)
            out["refused"]["equal gather"] = "no error"
        except ValueError as e:
            out["refused"]["equal gather"] = str(e)
    out["fresh"] = fresh.negatives()
    # a sub-group with NCCL only: a gloo twin made by its members alone would put torch's
    # count of groups out of step across ranks (later groups hang), so it is refused; one
    # with a gloo backend beside NCCL carries the host exchange itself
    real = dist.get_backend
    for backend in ("nccl", "cpu:gloo,cuda:nccl", "undefined"):
        dist.get_backend = lambda g=None, b=backend: b if g is group else real(g)  # type: ignore[misc]
        try:
            out[backend] = mcd.gather_sizes(20 + me, group=group)
        except ValueError as e:
            out[backend] = str(e)
        finally:
            dist.get_backend = real  # type: ignore[assignment]
    return out


@pytest.fixture(scope="session", params=[2, 4], ids=["world2", "world4"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return launch(scenario_groups, request.param, tmp_path_factory.mktemp("groups"))


def ctr(q: torch.Tensor, k: torch.Tensor, first: int, t: float) -> torch.Tensor:
    """MoCo v3's ctr written out: cross-entropy of q . k / T against rows first.., times 2T."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
    return F.cross_entropy(logits, torch.arange(len(q)) + first) * 2 * t


def test_every_collective_stays_inside_its_group(ranks: list[Any]) -> None:
    for me, got in enumerate(ranks):
        members = got["members"]
        assert got["rank"] == members.index(me) and got["world"] == len(members)
        assert got["sizes"] == [10 + r for r in members]
        want = torch.cat([rank_rows(1, r) for r in members])  # the group's rows only
        assert torch.equal(got["gathered"], want)
        assert torch.equal(got["equal"], torch.cat([rank_rows(3, r)[:1] for r in members]))
        # Shuffle-BN: rows drawn from the group's batch only, and each rank's own back
        pool = torch.cat([rank_rows(2, r) for r in members])
        assert got["shuffled"].shape == rank_rows(2, me).shape
        assert all(any(torch.equal(row, p) for p in pool) for row in got["shuffled"])
        assert torch.equal(got["unshuffled"], rank_rows(2, me) * 2)
        assert torch.equal(got["regathered"], pool * 2)
        # the queue: the same initial keys on every rank of every group (a DP x TP job's
        # tensor-parallel peers are in different groups), then the group's keys in rank order
        first = ranks[0]
        assert torch.equal(got["initial"], first["initial"])
        pushed = F.normalize(pool * 2, dim=1)
        assert torch.equal(got["queue"][: len(pushed)], pushed)
        assert torch.equal(got["queue"][len(pushed) :], first["initial"][len(pushed) :])
        # the v3 loss against the group's keys, rank = the rank in the group
        q1, q2 = rank_rows(10, me)[:2], rank_rows(11, me)[:2]
        all1 = torch.cat([rank_rows(12, r)[:2] for r in members])
        all2 = torch.cat([rank_rows(13, r)[:2] for r in members])
        offset = 2 * members.index(me)
        want_loss = ctr(q1, all2, offset, 0.5) + ctr(q2, all1, offset, 0.5)
        torch.testing.assert_close(got["loss"], want_loss, rtol=0, atol=1e-12)
        for name, message in got["refused"].items():
            assert f"(global rank {me}) is not a member of the group given" in message, name
        assert torch.equal(got["fresh"], ranks[0]["fresh"])
        assert got["cpu:gloo,cuda:nccl"] == got["undefined"] == [20 + r for r in members]
        if len(members) > 1:  # (a group of one exchanges nothing)
            assert f"the group of global ranks {members} has no gloo backend" in got["nccl"]
            assert 'backend="cpu:gloo,cuda:nccl"' in got["nccl"]
            assert "assume_equal_batches()" in got["nccl"]
        else:
            assert got["nccl"] == [20 + me]
    peers = [(0, 1)] if len(ranks) == 2 else [(0, 2), (1, 3)]  # same place, other group
    for a, b in peers:
        assert torch.equal(ranks[a]["tp_alike"], ranks[b]["tp_alike"])
    assert any(
        not torch.equal(ranks[a]["tp_own_seeds"], ranks[b]["tp_own_seeds"]) for a, b in peers
    )
    groups = {tuple(r["members"]) for r in ranks}
    if len(groups) > 1:  # each group's queue took its own group's keys: nothing crossed
        queues = [ranks[g[0]]["queue"] for g in groups]
        assert not torch.equal(queues[0], queues[1])


def _as_nccl(sub: Any, real: Any) -> Any:
    """``dist.get_backend`` that reports ``sub`` as an NCCL group."""
    return lambda g=None: "nccl" if g is sub else real(g)


def test_a_group_without_gloo_gets_one_gloo_group_that_torch_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from momentum_contrast import _collectives as c

    real = dist.get_backend
    for attempt in range(2):  # the second run follows a destroy and a new init
        init = f"file://{tmp_path / f'init{attempt}'}"
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        try:
            assert c.host_group(None) is None  # a gloo group carries host integers itself
            sub = cast(dist.ProcessGroup, dist.new_group([0]))  # rank 0 is a member
            monkeypatch.setattr(dist, "get_backend", _as_nccl(sub, real))
            made = c.host_group(sub)  # as under NCCL: a gloo group with the same ranks
            assert made is not None and made is not sub and real(made) == "gloo"
            assert c.host_group(sub) is made  # found again in torch's registry, not remade
            assert c.all_gather_host([7, 8], sub) == [[7, 8]]
            monkeypatch.setattr(dist, "get_backend", real)
        finally:
            destroy_in_process()
        assert made not in dist.distributed_c10d._world.pg_group_ranks  # gone with the rest
