"""torch.compile(fullgraph=True) of the losses and of MomentumEncoder.update: one graph,
the same numbers as eager, and no recompilation when the momentum changes every step.

On the CPU the update runs with ``aot_eager`` (Dynamo's tracing and AOT autograd) and with
inductor (generated C++), the losses with ``aot_eager``; ``tests/test_gpu_steps.py``
repeats them with inductor on CUDA. ``tests/test_shadow.py`` compiles the update with
``ema_dtype`` under both backends.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from _torch_version import torch_at_least
from conftest import perturb_
from torch import nn

from momentum_contrast import (
    KeyQueue,
    MomentumEncoder,
    cosine_momentum,
    info_nce,
    symmetric_contrastive_loss,
)
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle

# Dynamo of torch 2.5 to 2.10 specialises a Python float momentum (2.13 and 2.14 do not):
# each new value recompiles the update; a tensor momentum compiles once on every supported
# torch (the test below)
FLOAT_MOMENTUM_TORCH = "2.13"
FLOAT_MOMENTUM_REASON = (
    f"torch<{FLOAT_MOMENTUM_TORCH} recompiles for each new float momentum (pass a tensor)"
)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given, then delegates."""

    def __init__(self, backend: str = "aot_eager") -> None:
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        return self.inner(gm, example_inputs)  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


def check_update_compiles(device: torch.device, backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model = model.to(device)
    compiled_enc, eager_enc = MomentumEncoder(model), MomentumEncoder(model)
    counter = CountingBackend(backend)
    update = torch.compile(compiled_enc.update, fullgraph=True, backend=counter)
    graphs_after: list[int] = []
    for step in range(10):
        perturb_(model, seed=step)  # the online model moves, as after an optimizer step
        m = cosine_momentum(step, 10, base=0.9)  # a new momentum every step
        update(m)
        eager_enc.update(m)
        graphs_after.append(counter.graphs)
    assert graphs_after[-1] <= 2, graphs_after  # the first call, and one with m dynamic
    assert graphs_after[2:] == [graphs_after[2]] * 8, graphs_after  # none after that
    for a, b in zip(
        compiled_enc.key_encoder.parameters(), eager_enc.key_encoder.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def check_update_compiles_with_tensor_momentum(
    device: torch.device, backend: str, eager_first: bool = True
) -> None:
    """``eager_first``: an eager update (``m = 1`` changes nothing) before the compiled ones;
    without it, the first compiled call stored the pairing and failed its own guard at
    the second (one recompilation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(device)
    model = model.double()
    compiled_enc = MomentumEncoder(model)
    if eager_first:
        compiled_enc.update(1.0)
    counter = CountingBackend(backend)
    update = torch.compile(compiled_enc.update, fullgraph=True, backend=counter)
    m = torch.zeros((), dtype=torch.float64, device=device)
    graphs_after: list[int] = []
    for step in range(8):
        perturb_(model, seed=step)
        before = [p.detach().clone() for p in compiled_enc.key_encoder.parameters()]
        value = cosine_momentum(step, 8, base=0.9)
        m.fill_(value)  # the same tensor with a new value: a graph input, not a constant
        update(m)
        graphs_after.append(counter.graphs)
        for key, old, online in zip(
            compiled_enc.key_encoder.parameters(), before, model.parameters(), strict=True
        ):
            expected = value * old + (1 - value) * online.detach()  # the formula
            torch.testing.assert_close(key, expected, rtol=0, atol=1e-14)
    # one compilation at the first call (Dynamo may restart its analysis once inside it,
    # handing the backend a second graph), then none for the seven new values
    assert graphs_after[0] <= 2 and graphs_after == [graphs_after[0]] * 8, graphs_after


# a loss, its compiled twin, and the arguments of one call
LossCall = tuple[
    Callable[..., torch.Tensor],
    Callable[..., torch.Tensor],
    tuple[torch.Tensor, ...],
    dict[str, Any],
]


def check_losses_compile(device: torch.device, backend: str) -> None:
    torch.manual_seed(0)
    counter = CountingBackend(backend)
    nce = torch.compile(info_nce, fullgraph=True, backend=counter)
    sym = torch.compile(symmetric_contrastive_loss, fullgraph=True, backend=counter)
    queue = nn.functional.normalize(torch.randn(300, 16, device=device), dim=1)
    for step in range(4):  # new data every step: no recompilation
        q1, q2 = (torch.randn(8, 16, device=device, requires_grad=True) for _ in range(2))
        k1, k2 = (torch.randn(8, 16, device=device) for _ in range(2))
        calls: tuple[LossCall, ...] = (
            (info_nce, nce, (q1, k1, queue), {"temperature": 0.2}),
            (symmetric_contrastive_loss, sym, (q1, q2, k1, k2), {"temperature": 0.2}),
        )
        for fn, compiled, args, kwargs in calls:
            got = compiled(*args, **kwargs)
            grads = torch.autograd.grad(got, (q1,))
            want = fn(*args, **kwargs)
            want_grads = torch.autograd.grad(want, (q1,))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-6)
        if step == 0:
            first = counter.graphs
    assert first == 2 and counter.graphs == 2, (first, counter.graphs)  # one graph each


@pytest.mark.skipif(not torch_at_least(FLOAT_MOMENTUM_TORCH), reason=FLOAT_MOMENTUM_REASON)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: C++ on the CPU
def test_update_compiles_fullgraph_without_recompiling(backend: str) -> None:
    check_update_compiles(torch.device("cpu"), backend)


@pytest.mark.parametrize("eager_first", [True, False])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_update_with_a_changing_tensor_momentum_compiles_once(
    backend: str, eager_first: bool
) -> None:
    check_update_compiles_with_tensor_momentum(torch.device("cpu"), backend, eager_first)


def test_losses_compile_fullgraph_and_match_eager() -> None:
    check_losses_compile(torch.device("cpu"), "aot_eager")


def test_losses_compile_fullgraph_with_dynamic_shapes() -> None:
    """``dynamic=True`` makes the temperature a symbolic float: its check must trace (it
    called ``math.isfinite``, which Dynamo cannot, and fullgraph failed) and still refuse an
    infinite one (``v < inf`` is taken as true for a symbolic float)."""
    torch.manual_seed(0)
    nce = torch.compile(info_nce, dynamic=True, fullgraph=True, backend="inductor")
    sym = torch.compile(
        symmetric_contrastive_loss, dynamic=True, fullgraph=True, backend="inductor"
    )
    queue = nn.functional.normalize(torch.randn(64, 16), dim=1)
    for n, temperature in ((8, 0.2), (6, 0.07)):  # another batch and temperature
        q1, q2, k1, k2 = (torch.randn(n, 16) for _ in range(4))
        torch.testing.assert_close(
            nce(q1, k1, queue, temperature=temperature),
            info_nce(q1, k1, queue, temperature=temperature),
        )
        torch.testing.assert_close(
            sym(q1, q2, k1, k2, temperature=temperature),
            symmetric_contrastive_loss(q1, q2, k1, k2, temperature=temperature),
        )
    for compiled in (nce, torch.compile(info_nce)):  # symbolic, or after two values
        for temperature in (0.3, 0.4):
            compiled(q1, k1, queue, temperature=temperature)
        # torch 2.5's fullgraph error names the check's line, not its message
        refused = r'temperature must be a finite number > 0|check_positive\("temperature"'
        with pytest.raises(Exception, match=refused):
            compiled(q1, k1, queue, temperature=float("inf"))


def test_shuffle_bn_compiles_once_for_every_batch_size() -> None:
    """``batch_shuffle`` passed ``generator=None`` to ``randperm`` explicitly, which made
    Dynamo specialise the batch size: graphs per size, eager past the recompile limit. (Not
    ``fullgraph``: torch 2.5's Dynamo breaks the graph where the row counts are attached.)"""
    counter = CountingBackend("aot_eager")

    def shuffled_twice(x: torch.Tensor) -> torch.Tensor:
        shuffled, idx_unshuffle = batch_shuffle(x)
        return batch_unshuffle(shuffled * 2, idx_unshuffle)

    compiled = torch.compile(shuffled_twice, dynamic=True, backend=counter)
    graphs_after: list[int] = []
    for n in (8, 6, 9, 5):
        x = torch.randn(n, 3)
        assert torch.equal(compiled(x), x * 2)
        graphs_after.append(counter.graphs)
    assert graphs_after == [graphs_after[0]] * 4, graphs_after


def test_update_compiles_fullgraph_with_inductor_after_a_key_submodule_is_swapped() -> None:
    """The re-pairing after a swap froze the new key parameters with ``requires_grad_``,
    which Dynamo cannot trace under ``fullgraph=True``; compiled, the swap is followed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    enc = MomentumEncoder(model)
    update = torch.compile(enc.update, fullgraph=True, backend="inductor")
    update(0.5)
    enc.key_encoder.add_module("1", nn.Linear(4, 2))  # a new submodule: trainable parameters
    before = [p.detach().clone() for p in enc.key_encoder.parameters()]
    update(0.5)
    for key, old, online in zip(
        enc.key_encoder.parameters(), before, model.parameters(), strict=True
    ):
        torch.testing.assert_close(key, 0.5 * old + 0.5 * online.detach(), rtol=0, atol=1e-6)
    enc.update(1.0)  # an eager update freezes what the compiled one could not
    assert not any(p.requires_grad for p in enc.key_encoder.parameters())


def test_a_compiled_update_refuses_a_key_encoder_that_is_the_online_model() -> None:
    """Compiled, no address can be read, but a key tensor that is an online one (the
    online model assigned as the key encoder) is told by object: the update would average
    the model with itself, and the key encoder would follow the query encoder exactly."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    enc = MomentumEncoder(model)
    update = torch.compile(enc.update, fullgraph=True, backend="inductor")
    update(0.5)
    enc.key_encoder = model
    with pytest.raises(Exception) as refused:
        update(0.5)
    if torch_at_least("2.13"):  # the Dynamo of torch 2.5 reports its own error instead
        assert "shares these parameters' memory with the online model" in str(refused.value)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight


@pytest.mark.parametrize("ema_dtype", [None, torch.float32])
def test_compiled_update_steps_weights_tied_by_memory_once(ema_dtype: torch.dtype | None) -> None:
    """After load_state_dict(assign=True) tied weights are two objects sharing one memory; the
    compiled pairing tells ties by object only, and the update stepped that memory twice (m**2,
    no error), where eager steps it once. Reloaded on one side only, the compiled update says
    why it cannot tell (eagerly it can)."""
    torch.manual_seed(0)
    online = _Tied() if ema_dtype is None else _Tied().bfloat16()
    enc = MomentumEncoder(online, momentum=0.5, ema_dtype=ema_dtype)
    state = enc.state_dict()  # the key encoder's two names: two objects, one memory
    assert state["key_encoder.a.weight"] is not state["key_encoder.b.weight"]
    enc.load_state_dict(copy.deepcopy(state), assign=True)  # deepcopy keeps the one memory
    with pytest.raises(Exception) as refused:  # the online model tied by object
        torch.compile(enc.update, fullgraph=True, backend="inductor")(0.5)
    if torch_at_least("2.13"):  # the Dynamo of torch 2.5 reports its own error instead
        assert "ties are told by object" in str(refused.value)
    enc.update(1.0)  # eagerly: memory ties are ties
    online.load_state_dict(copy.deepcopy(online.state_dict()), assign=True)  # a resume of both
    key = cast(_Tied, enc.key_encoder)
    assert key.a.weight is not key.b.weight and key.a.weight.data_ptr() == key.b.weight.data_ptr()
    torch._dynamo.reset()
    update = torch.compile(enc.update, fullgraph=True, backend="inductor")
    for step in range(3):
        with torch.no_grad():
            online.a.weight.add_(1.0 + step)
        old = key.a.weight.detach().clone()
        update(0.5)
        once = old + 0.5 * (online.a.weight.detach().to(old.dtype) - old)  # twice: 0.75 of it
        torch.testing.assert_close(key.a.weight.detach(), once, rtol=0, atol=1e-5)
        assert key.a.weight.data_ptr() == key.b.weight.data_ptr()  # still one memory


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("push_inside", [True, False])
def test_a_compiled_queue_step_matches_eager(backend: str, push_inside: bool) -> None:
    """The loss against ``negatives()``, then the push, before ``backward()``, as the
    reference's forward does, in one graph. Inductor elided the snapshot's copy and saved the
    queue's keys for the backward: the push in the same graph made every gradient wrong,
    silently; the push after the graph made the backward raise."""
    torch.manual_seed(0)
    eager, compiled = KeyQueue(32, 16), KeyQueue(32, 16)

    def loss_of(queue: KeyQueue, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        loss = info_nce(q, k, queue.negatives(), temperature=0.2)
        if push_inside:
            queue.push(k)
        return loss

    compiled_loss = torch.compile(loss_of, fullgraph=True, backend=backend)
    for _ in range(5):  # 40 keys: the queue wraps around
        q = torch.randn(8, 16, requires_grad=True)
        k = nn.functional.normalize(torch.randn(8, 16), dim=1)
        results = []
        for queue, fn in ((eager, loss_of), (compiled, compiled_loss)):
            loss = fn(queue, q, k)
            if not push_inside:
                queue.push(k)
            results.append((loss, *torch.autograd.grad(loss, q)))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert int(compiled.ptr) == int(eager.ptr) == 40 % 32
    torch.testing.assert_close(compiled.keys, eager.keys, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_push_compiles_fullgraph_and_matches_eager(backend: str) -> None:
    """In one process the push has nothing to gather: it read the keys' ``__dict__`` for
    the gather that ``batch_unshuffle`` attaches, which broke the graph."""
    torch.manual_seed(0)
    eager, compiled = KeyQueue(32, 16), KeyQueue(32, 16)
    push = torch.compile(compiled.push, fullgraph=True, backend=backend)
    for _ in range(5):
        k = torch.randn(8, 16)
        eager.push(k)
        push(k)
    assert int(compiled.ptr) == int(eager.ptr) == 40 % 32
    torch.testing.assert_close(compiled.keys, eager.keys, rtol=1e-6, atol=1e-7)
