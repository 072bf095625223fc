"""KeyQueue: ring-buffer semantics, persistence, snapshots, storage dtypes."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import no_host_sync
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from momentum_contrast import KeyQueue, info_nce


def ring_buffer_reference(size: int, dim: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """A plain Python ring buffer: key number g lives in slot g % size."""
    slots: list[list[float] | None] = [None] * size
    g = 0
    for batch in batches:
        for row in batch.tolist():
            slots[g % size] = row
            g += 1
    valid = [s for s in slots if s is not None]
    return torch.tensor(valid, dtype=torch.float32).reshape(len(valid), dim)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 12),
    batch_sizes=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_holds_exactly_the_newest_keys(size: int, batch_sizes: list[int], seed: int) -> None:
    dim = 3
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, dim, generator=g) for n in batch_sizes]
    queue = KeyQueue(size, dim, init="empty", normalize=False)
    for b in batches:
        queue.push(b)
    total = sum(batch_sizes)
    assert len(queue) == min(total, size)
    assert torch.equal(queue.negatives(), ring_buffer_reference(size, dim, batches))
    # as a set: exactly the newest min(total, size) keys
    newest = torch.cat(batches)[max(total - size, 0) :]
    got = sorted(map(tuple, queue.negatives().tolist()))
    assert got == sorted(map(tuple, newest.tolist()))
    assert int(queue.ptr) == total % size


@pytest.mark.parametrize("n", [1, 3, 7, 10, 25])
def test_any_batch_size(n: int) -> None:
    queue = KeyQueue(10, 4, normalize=False)  # random init, as the papers
    pushed = [torch.randn(n, 4) for _ in range(10 // n + 3)]
    for b in pushed:
        queue.push(b)
    newest = torch.cat(pushed)[-10:]
    assert sorted(map(tuple, queue.negatives().tolist())) == sorted(map(tuple, newest.tolist()))


def test_random_init_is_full_of_unit_keys() -> None:
    queue = KeyQueue(300, 16)
    assert len(queue) == 300
    keys = queue.negatives()
    assert keys.shape == (300, 16)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(300))
    assert keys.std() > 0.1  # random, not constant


def test_empty_init_grows_from_zero() -> None:
    queue = KeyQueue(5, 2, init="empty")
    assert len(queue) == 0 and queue.negatives().shape == (0, 2)
    queue.push(torch.randn(3, 2))
    assert len(queue) == 3 and queue.negatives().shape == (3, 2)
    queue.push(torch.randn(3, 2))
    assert len(queue) == 5 and queue.negatives().shape == (5, 2)


def test_pushed_keys_are_normalised_and_detached() -> None:
    queue = KeyQueue(8, 4, init="empty")
    keys = (5 * torch.randn(8, 4)).requires_grad_()
    queue.push(keys)
    torch.testing.assert_close(queue.negatives().norm(dim=1), torch.ones(8))
    torch.testing.assert_close(
        queue.negatives(), keys.detach() / keys.detach().norm(dim=1, keepdim=True)
    )
    assert not queue.keys.requires_grad


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 6, generator=g) for n in (4, 7, 9, 2, 11, 5, 13)]
    start = KeyQueue(17, 6)
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    a = KeyQueue(17, 6)
    a.load_state_dict(start_state)
    for b in batches[:3]:
        a.push(b)
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    assert set(saved) == {"keys", "ptr", "length"}

    resumed = KeyQueue(17, 6, init="empty")  # fresh object, different contents
    resumed.load_state_dict(saved)
    assert len(resumed) == 17
    for b in batches[3:]:
        resumed.push(b)
    reference = KeyQueue(17, 6)
    reference.load_state_dict(start_state)
    for b in batches:
        reference.push(b)
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_empty_queue_length_survives_state_dict() -> None:
    queue = KeyQueue(10, 3, init="empty")
    queue.push(torch.randn(4, 3))
    resumed = KeyQueue(10, 3, init="empty")
    resumed.load_state_dict(queue.state_dict())
    assert len(resumed) == 4
    assert torch.equal(resumed.negatives(), queue.negatives())


def test_negatives_snapshot_backpropagates_after_push() -> None:
    torch.manual_seed(0)
    queue = KeyQueue(64, 8, dtype=torch.float64)
    q = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 8, dtype=torch.float64)
    negatives = queue.negatives()
    frozen = negatives.clone()
    loss = info_nce(q, k, negatives, temperature=0.2)
    queue.push(torch.randn(32, 8, dtype=torch.float64))  # overwrites half the queue
    assert not torch.equal(queue.negatives(), frozen)
    loss.backward()
    q_ref = q.detach().clone().requires_grad_()
    info_nce(q_ref, k, frozen, temperature=0.2).backward()
    assert q.grad is not None and q_ref.grad is not None
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_storage(dtype: torch.dtype) -> None:
    full = KeyQueue(4096, 128)
    half = KeyQueue(4096, 128, dtype=dtype)
    assert half.keys.dtype == dtype
    assert half.keys.nbytes * 2 == full.keys.nbytes
    half.push(torch.randn(256, 128))
    q, k = torch.randn(256, 128), torch.randn(256, 128)
    loss = info_nce(q, k, half.negatives(), temperature=0.2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = info_nce(q, k, half.negatives().float(), temperature=0.2)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_half_precision_keys_normalise_without_overflow() -> None:
    queue = KeyQueue(8, 128, init="empty")
    keys = torch.full((2, 128), 30000.0, dtype=torch.float16)  # squares past 65,504
    queue.push(keys)
    norms = queue.negatives().norm(dim=1)  # the two keys pushed
    torch.testing.assert_close(norms, torch.ones(2), rtol=1e-6, atol=0)


def test_push_and_negatives_do_not_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = KeyQueue(100, 8)
    empty = KeyQueue(100, 8, init="empty")
    keys = torch.randn(30, 8)
    with no_host_sync(monkeypatch):
        for q in (queue, empty):
            q.push(keys)
            q.push(keys[:7])
            q.negatives()
            q.push(torch.randn(250, 8))


@pytest.mark.parametrize("cast", ["to(bfloat16)", "half()", "to(meta, float16)"])
def test_a_cast_of_the_parent_module_keeps_the_queue_dtype(cast: str) -> None:
    # Lightning's precision="bf16-true" does module.to(torch.bfloat16): the queue keeps the
    # dtype it was built with (and its keys), and still follows device moves
    parent = nn.Module()
    parent.online = nn.Linear(4, 4)
    parent.queue = KeyQueue(size=8, dim=4, dtype=torch.float32)
    keys = parent.queue.keys.clone()
    if cast == "to(bfloat16)":
        parent.to(torch.bfloat16)
    elif cast == "half()":
        parent.half()
    else:
        parent.to("meta", torch.float16)
    assert parent.online.weight.dtype != torch.float32  # the module itself was cast
    assert parent.queue.keys.dtype == torch.float32
    if cast.startswith("to(meta"):
        assert parent.queue.keys.device.type == "meta" and parent.queue.ptr.device.type == "meta"
    else:
        assert torch.equal(parent.queue.keys, keys)
        parent.queue.push(torch.randn(2, 4, dtype=parent.online.weight.dtype))
        assert parent.queue.keys.dtype == torch.float32


def test_a_bfloat16_queue_stays_bfloat16_through_a_float_cast() -> None:
    queue = KeyQueue(size=8, dim=4, dtype=torch.bfloat16)
    queue.float()
    assert queue.keys.dtype == torch.bfloat16


def test_a_load_that_does_not_fit_loads_nothing() -> None:
    """torch copied ptr and length, then refused the keys: a 5-row queue then said it held 8
    keys; a strict=False load could set a length above the size."""
    queue = KeyQueue(5, 3, init="empty")
    queue.push(torch.randn(2, 3))
    keys, ptr = queue.keys.clone(), int(queue.ptr)
    ok = {"keys": torch.zeros(5, 3), "ptr": torch.tensor(0), "length": torch.tensor(5)}
    for bad, said in (
        (KeyQueue(8, 3).state_dict(), "keys of shape (8, 3), not (5, 3), length 8, not an int"),
        ({**ok, "ptr": torch.tensor(5)}, "ptr 5, not an int in [0, 4]"),
        ({"length": torch.tensor(9)}, "length 9, not an int in [0, 5]"),
        ({**ok, "length": torch.tensor([5, 5])}, "length [5, 5], not an int in [0, 5]"),
        # a float pointer was cut to an int (2.7 -> 2), a NaN one a bare ValueError
        ({**ok, "ptr": torch.tensor(2.7)}, "ptr 2.7"),
        ({**ok, "ptr": torch.tensor(float("nan"))}, "ptr nan, not an int in [0, 4]"),
        ({**ok, "length": torch.tensor(True)}, "length True, not an int in [0, 5]"),
        # not tensors: an AttributeError ('int' object has no attribute 'shape')
        ({**ok, "ptr": 3}, "ptr of type int, not a tensor"),
        ({**ok, "keys": [[0.0] * 3] * 5}, "keys of type list, not a tensor"),
        # a queue not yet full writes its next key at row `length`: this one wrote over a key
        # and left a zero row among the negatives
        ({**ok, "ptr": torch.tensor(4), "length": torch.tensor(3)}, "ptr 4 with length 3"),
    ):
        with pytest.raises(RuntimeError, match=re.escape(said)):
            queue.load_state_dict(bad, strict=False)
        assert (len(queue), int(queue.length), int(queue.ptr)) == (2, 2, ptr)
        assert torch.equal(queue.keys, keys)
    parent = nn.Module()
    parent.queue = queue
    with pytest.raises(RuntimeError, match=r"KeyQueue 'queue\.': keys of shape \(4, 3\)"):
        parent.load_state_dict({"queue." + k: v[:4] if k == "keys" else v for k, v in ok.items()})
    queue.load_state_dict(ok)  # one that fits
    assert (len(queue), int(queue.ptr)) == (5, 0) and not queue.keys.any()


def test_random_start_follows_the_default_device_and_is_the_same_everywhere() -> None:
    """The initial keys come from a CPU generator of their own with a fixed seed, then go
    to the default device (a meta-device build stays on meta); the global stream is not
    drawn from."""
    state = torch.get_rng_state()
    first = KeyQueue(16, 4)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(KeyQueue(16, 4).keys, first.keys)  # another seed: the same keys
    with torch.device("meta"):
        assert KeyQueue(16, 4).keys.device.type == "meta"
