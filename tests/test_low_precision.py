"""MomentumEncoder(ema_dtype=torch.float32) on bfloat16 models: the key encoder is float32, so
the average tracks a float64 one, survives state_dict, and takes any outside write as its state;
a bfloat16 key encoder without it warns that it stalls."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import no_host_sync
from torch import nn

from momentum_contrast import MomentumEncoder

M = 0.999


def bf16_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)).bfloat16()


def train_step_(online: nn.Module, step: int) -> None:
    """A small update applied in bfloat16, as an optimizer step: a steady drift + noise."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for i, p in enumerate(online.parameters()):
            drift = 1e-2 * (1 if i % 2 else -1)
            p.add_((drift + 3e-3 * torch.randn(p.shape, generator=g)).to(p.dtype))


def float64_ema(online: nn.Module, steps: range, start: dict[str, torch.Tensor]) -> None:
    """The average written out in float64 over the same bfloat16 online weights."""
    for step in steps:
        train_step_(online, step)
        for name, p in online.named_parameters():
            start[name] = M * start[name] + (1 - M) * p.detach().double()


def test_float32_average_tracks_float64_while_bfloat16_alone_stalls() -> None:
    online = bf16_model()
    shadowed = MomentumEncoder(online, momentum=M, ema_dtype=torch.float32)
    plain = MomentumEncoder(online, momentum=M)
    reference = {n: p.detach().double() for n, p in online.named_parameters()}
    initial = copy.deepcopy(reference)
    mirror = bf16_model()  # the same initial weights, stepped identically
    with pytest.warns(RuntimeWarning, match=r"torch.bfloat16, too coarse .* ema_dtype=torch.f"):
        for step in range(1000):
            train_step_(online, step)
            shadowed.update()
            plain.update()
    float64_ema(mirror, range(1000), reference)
    for name, shadow in shadowed.key_encoder.named_parameters():
        ref = reference[name]
        moved = (ref - initial[name]).abs().max()
        assert moved > 0.1  # the average did move
        assert shadow.dtype == torch.float32
        # float32 precision over 1,000 steps
        err = (shadow.double() - ref).abs().max()
        assert err < 2e-5, name
        stalled = dict(plain.key_encoder.named_parameters())[name].double()
        # bfloat16 alone stalls once (1 - m) * (online - key) is below half an ulp
        assert (stalled - ref).abs().max() > max(0.2, 1000 * err.item()), name


def test_keys_come_out_in_the_model_dtype() -> None:
    enc = MomentumEncoder(bf16_model(), ema_dtype=torch.float32)
    keys = enc(torch.randn(4, 16, dtype=torch.bfloat16))
    assert keys.dtype == torch.bfloat16 and keys.shape == (4, 8)


def test_every_floating_parameter_is_float32_from_construction() -> None:
    online = nn.Sequential(nn.Linear(4, 4).bfloat16(), nn.Linear(4, 4), nn.Linear(4, 4).half())
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    state = enc.state_dict()
    assert sorted(state) == [f"key_encoder.{i}.{w}" for i in (0, 1, 2) for w in ("bias", "weight")]
    assert all(v.dtype == torch.float32 for v in state.values())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    enc.update(0.5)
    for (name, key), p in zip(enc.key_encoder.named_parameters(), online.parameters(), strict=True):
        assert key.dtype == torch.float32, name
        before = p.detach().double() - 1.0
        torch.testing.assert_close(
            key.double(), (before + p.detach().double()) / 2, atol=4e-3, rtol=0
        )


def test_state_dict_round_trip_resumes_exactly() -> None:
    online = bf16_model()
    enc = MomentumEncoder(online, momentum=M, ema_dtype=torch.float32)
    for step in range(300):
        train_step_(online, step)
        enc.update()
    state = copy.deepcopy(enc.state_dict())
    resumed = MomentumEncoder(copy.deepcopy(online), momentum=M, ema_dtype=torch.float32)
    resumed.online = online
    resumed.load_state_dict(state)
    for step in range(300, 400):
        train_step_(online, step)
        enc.update()
        resumed.update()
    for (name, a), b in zip(enc.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    shadow = enc.key_encoder.get_parameter("0.weight")
    assert not torch.equal(shadow, shadow.to(torch.bfloat16).float())  # float32 bits in use


@pytest.mark.parametrize("how", ["in_place", "assign", "one_row", "copy", "data_swap"])
def test_key_weights_written_outside_update_are_followed(how: str) -> None:
    online = bf16_model()
    enc = MomentumEncoder(online, momentum=0.9, ema_dtype=torch.float32)
    for step in range(5):
        train_step_(online, step)
        enc.update()
    before = {n: b.clone() for n, b in enc.key_encoder.named_parameters()}
    new = {n: torch.full_like(p, 0.5) for n, p in enc.key_encoder.named_parameters()}
    if how == "in_place":
        enc.key_encoder.load_state_dict(new)
    elif how == "assign":
        enc.key_encoder.load_state_dict(new, assign=True)
    elif how == "copy":
        with torch.no_grad():
            for p in enc.key_encoder.parameters():
                p.copy_(torch.full_like(p, 0.5))
    elif how == "data_swap":
        for p in enc.key_encoder.parameters():
            p.data = torch.full_like(p, 0.5)
    else:
        with torch.no_grad():
            enc.key_encoder.get_parameter("0.weight")[3].fill_(0.5)
    train_step_(online, 99)
    enc.update()
    for name, p in online.named_parameters():
        start = before[name].double()
        if how != "one_row":
            start = torch.full_like(start, 0.5)
        elif name == "0.weight":
            start[3] = 0.5
        expected = 0.9 * start + 0.1 * p.detach().double()  # the write is the new state
        got = enc.key_encoder.get_parameter(name).double()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)


def test_steady_updates_do_not_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    online = bf16_model()
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    with torch.no_grad():
        enc.key_encoder.get_parameter("0.weight").add_(1.0)  # an outside write
    with no_host_sync(monkeypatch):
        enc.update()
        enc.update(torch.tensor(0.99))
        enc.update()


def test_bad_ema_dtype_raises() -> None:
    with pytest.raises(TypeError, match=r"ema_dtype must be None or a floating torch.dtype, got"):
        MomentumEncoder(bf16_model(), ema_dtype=torch.int32)
