"""MomentumEncoder.update with a 0-d tensor momentum: same numbers as a float, no host
synchronisation, fused ops, bounded temporaries, and clear errors for bad tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import SmallCNN, no_host_sync, perturb_
from torch import nn

from momentum_contrast import MomentumEncoder, _pairing, cosine_momentum


def key_params(enc: MomentumEncoder) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in enc.key_encoder.named_parameters()}


@pytest.mark.parametrize("buffers", ["own", "ema"])
def test_tensor_momentum_equals_float_momentum_and_the_formula(buffers: str) -> None:
    online = SmallCNN().double()
    by_float = MomentumEncoder(online, buffers=buffers)  # type: ignore[arg-type]
    by_tensor = MomentumEncoder(online, buffers=buffers)  # type: ignore[arg-type]
    m = torch.zeros((), dtype=torch.float64)
    for step in range(6):
        perturb_(online, seed=step)
        online.train()(torch.randn(4, 3, 8, 8, dtype=torch.float64))  # moves BN statistics
        value = cosine_momentum(step, 6, base=0.7)
        before = key_params(by_tensor)
        by_float.update(value)
        m.fill_(value)  # the same tensor, refilled each step (as before a graph replay)
        by_tensor.update(m)
        for name, p in online.named_parameters():  # the formula, written out
            expected = value * before[name] + (1 - value) * p.detach()
            got = dict(by_tensor.key_encoder.named_parameters())[name]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    for (name, a), b in zip(
        by_tensor.state_dict().items(), by_float.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15, msg=name)


def test_tensor_momentum_zero_and_one() -> None:
    online = nn.Linear(3, 2).double()
    enc = MomentumEncoder(online)
    perturb_(online)
    before = key_params(enc)
    enc.update(torch.tensor(1.0, dtype=torch.float64))
    assert all(torch.equal(p, before[n]) for n, p in enc.key_encoder.named_parameters())
    enc.update(torch.tensor(0.0))  # float32 momentum with float64 weights
    for name, p in online.named_parameters():
        assert torch.equal(dict(enc.key_encoder.named_parameters())[name], p.detach())


def test_tensor_momentum_never_synchronises_and_stays_fused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    online = nn.Sequential(*(nn.Linear(4, 4) for _ in range(10)))  # 20 parameters
    enc = MomentumEncoder(online)
    m = torch.tensor(0.99)
    with no_host_sync(monkeypatch) as rec:
        enc.update(m)
    # one multi-tensor op of each kind for the 20 parameters, none per tensor
    assert sorted(rec.ops) == ["_foreach_add_", "_foreach_mul_", "_foreach_sub", "rsub"]
    with no_host_sync(monkeypatch) as rec:
        enc.update(0.99)  # the float path is unchanged
    assert rec.ops == ["_foreach_lerp_"]


def test_temporaries_are_made_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    online = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)).double()  # 64, 8, 24, 3
    monkeypatch.setattr(_pairing, "_CHUNK_NUMEL", 30)  # the pairing cuts the groups
    enc = MomentumEncoder(online)
    perturb_(online)
    before = key_params(enc)
    seen: list[int] = []
    real_sub = torch._foreach_sub

    def recording_sub(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
        seen.append(sum(t.numel() for t in a))
        return real_sub(a, b)

    monkeypatch.setattr(torch, "_foreach_sub", recording_sub)
    enc.update(torch.tensor(0.25, dtype=torch.float64))
    assert seen == [64, 8, 27]  # a single tensor larger than a chunk goes alone
    for name, p in online.named_parameters():
        expected = 0.25 * before[name] + 0.75 * p.detach()
        torch.testing.assert_close(
            dict(enc.key_encoder.named_parameters())[name], expected, rtol=0, atol=1e-15
        )


@pytest.mark.parametrize(
    ("momentum", "error", "message"),
    [
        (torch.tensor([0.9]), ValueError, r"momentum must be a float or a 0-d tensor.*\(1,\)"),
        (torch.tensor(1), TypeError, r"floating-point tensor, got dtype torch.int64"),
        (torch.tensor(0.9, device="meta"), ValueError, r"parameters' device cpu, got meta"),
        (1.5, ValueError, r"momentum must be in \[0, 1\], got 1.5"),
        ("0.9", TypeError, r"momentum must be a real number, got str"),
    ],
)
def test_bad_momentum_is_rejected_and_nothing_changes(
    momentum: object, error: type[Exception], message: str
) -> None:
    online = nn.Linear(3, 2)
    enc = MomentumEncoder(online)
    perturb_(online)
    before = key_params(enc)
    with pytest.raises(error, match=message):
        enc.update(momentum)  # type: ignore[arg-type]
    assert all(torch.equal(p, before[n]) for n, p in enc.key_encoder.named_parameters())


def test_a_momentum_is_checked_against_the_buffers_devices_and_when_set_as_the_default() -> None:
    class OnlyBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("x", torch.ones(3))

    enc = MomentumEncoder(OnlyBuffer(), buffers="ema")  # no parameter: only buffer groups
    with pytest.raises(ValueError, match=r"momentum must be on the parameters' device cpu"):
        enc.update(torch.tensor(0.5, device="meta"))  # a meta multiply writes nothing
    online = nn.Linear(2, 2)
    enc = MomentumEncoder(online, 0.5)
    enc.momentum = 1.5  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        enc.update()
    enc.momentum = torch.tensor(0.5, device="meta")  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"momentum must be on the parameters' device cpu"):
        enc.update()


def test_cosine_momentum_at_extreme_step_counts() -> None:
    assert cosine_momentum(1e308, 1e308) == 1.0  # pi * step alone would overflow
    subnormal = 1e-320  # pi * step would lose digits: step / total must come first
    # a library built with -ffast-math, once loaded, makes the CPU read subnormals as 0 (DAZ):
    # then this number is 0 to every comparison, and total_steps=0 is rightly refused
    if subnormal > 0:
        assert cosine_momentum(subnormal, subnormal) == 1.0
    else:
        with pytest.raises(ValueError, match="total_steps must be a finite number > 0"):
            cosine_momentum(subnormal, subnormal)


@pytest.mark.parametrize("momentum", [0.9, "tensor"])
def test_ema_dtype_widens_in_fused_ops_into_one_bounded_scratch(
    monkeypatch: pytest.MonkeyPatch, momentum: object
) -> None:
    """A float32 key encoder following bfloat16 weights: the onlines are widened by one fused
    copy per chunk into views of one scratch buffer no larger than a chunk, and the result is
    the formula in float32 (the bfloat16 onlines are exact in float32)."""
    online = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)).bfloat16()  # 64, 8, 24, 3
    monkeypatch.setattr(_pairing, "_CHUNK_NUMEL", 30)
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    enc.update(1.0)  # pairs (and makes the scratch): a key kept as it is
    perturb_(online)
    before = key_params(enc)
    m = torch.tensor(0.9) if momentum == "tensor" else 0.9
    with no_host_sync(monkeypatch) as rec:
        enc.update(m)  # type: ignore[arg-type]
    per_chunk = (
        ["_foreach_copy_", "_foreach_lerp_"]
        if momentum != "tensor"
        else ["_foreach_copy_", "_foreach_sub", "_foreach_mul_", "_foreach_add_"]
    )
    assert [op for op in rec.ops if op != "rsub"] == per_chunk * 3  # 64 | 8 | 24 + 3
    scratch = [s for _, _, group in enc._pairs["parameter"].groups for s in group or []]
    assert len(scratch) == 4 and len({s.untyped_storage().data_ptr() for s in scratch}) == 1
    assert scratch[0].untyped_storage().nbytes() == 64 * 4  # the largest chunk, float32
    for name, p in online.named_parameters():
        key = dict(enc.key_encoder.named_parameters())[name]
        assert key.dtype == torch.float32
        expected = before[name] + 0.1 * (p.detach().float() - before[name])
        torch.testing.assert_close(key, expected, rtol=0, atol=1e-7)
