"""MomentumEncoder: the EMA step, its fusion, structure checks, buffers and wrappers."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import cast

import pytest
import torch
from conftest import SmallCNN, no_host_sync, perturb_
from torch import nn

from momentum_contrast import MomentumEncoder, cosine_momentum


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_update_equals_formula_in_float64() -> None:
    online = SmallCNN().double()
    enc = MomentumEncoder(online, momentum=0.9)
    perturb_(online, seed=1)
    key_before = {n: p.detach().clone() for n, p in enc.key_encoder.named_parameters()}
    enc.update()
    for name, p_online in online.named_parameters():
        expected = 0.9 * key_before[name] + 0.1 * p_online.detach()
        torch.testing.assert_close(
            dict(enc.key_encoder.named_parameters())[name], expected, rtol=0, atol=1e-15
        )
    # an explicit momentum overrides the default for this step only
    key_before = {n: p.detach().clone() for n, p in enc.key_encoder.named_parameters()}
    enc.update(0.5)
    for name, p in enc.key_encoder.named_parameters():
        online_p = dict(online.named_parameters())[name].detach()
        torch.testing.assert_close(p, 0.5 * key_before[name] + 0.5 * online_p, rtol=0, atol=1e-15)
    assert enc.momentum == 0.9


def test_update_is_in_place() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    params = list(enc.key_encoder.parameters())
    pointers = [p.data_ptr() for p in params]
    perturb_(online)
    enc.update(0.5)
    assert all(a is b for a, b in zip(params, enc.key_encoder.parameters(), strict=True))
    assert [p.data_ptr() for p in enc.key_encoder.parameters()] == pointers


def test_update_is_one_fused_op_per_dtype_group(monkeypatch: pytest.MonkeyPatch) -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    with no_host_sync(monkeypatch) as rec:
        enc.update()
    assert rec.ops == ["_foreach_lerp_"]

    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).double(), nn.Linear(4, 4))
    enc = MomentumEncoder(mixed)
    with no_host_sync(monkeypatch) as rec:
        enc.update()
    assert rec.ops == ["_foreach_lerp_", "_foreach_lerp_"]


def test_momentum_one_keeps_key_and_zero_copies_online() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    before = snapshot(enc.key_encoder)
    perturb_(online)
    enc.update(1.0)
    for name, p in enc.key_encoder.named_parameters():
        assert torch.equal(p, before[name])
    enc.update(0.0)
    for (_, p), (_, q) in zip(
        enc.key_encoder.named_parameters(), online.named_parameters(), strict=True
    ):
        assert torch.equal(p, q)


def test_key_is_frozen_and_forward_has_no_grad() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    assert all(not p.requires_grad for p in enc.key_encoder.parameters())
    assert all(p.requires_grad for p in online.parameters())
    out = enc(torch.randn(4, 3, 8, 8))
    assert out.shape == (4, 16)
    assert not out.requires_grad and out.grad_fn is None


def test_empty_parameters_on_two_devices_are_not_tied() -> None:
    online = nn.Module()  # both at address 0: no memory, nothing shared
    online.a = nn.Parameter(torch.empty(0, 4, device="meta"))
    online.b = nn.Parameter(torch.empty(0, 4))
    enc = MomentumEncoder(online)
    assert enc.key_encoder.b.device.type == "cpu"
    enc.update()


@pytest.mark.parametrize(
    "change",
    ["rename", "add", "reshape_module", "reshape_data", "remove"],
)
def test_structural_mismatch_raises(change: str) -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    enc.update()
    if change == "rename":
        online.head = online.fc
        del online.fc
        expected = "'fc."
    elif change == "add":
        online.extra = nn.Parameter(torch.zeros(3))
        expected = "extra"
    elif change == "reshape_module":
        online.fc = nn.Linear(16, 32)
        expected = "fc.weight"
    elif change == "reshape_data":
        online.fc.bias.data = torch.zeros(5)
        expected = "fc.bias"
    else:
        online.bn2 = nn.Identity()  # type: ignore[assignment]
        expected = "bn2.weight"
    with pytest.raises(ValueError, match="does not match the key encoder") as err:
        enc.update()
    assert expected in str(err.value)


def test_dtype_or_device_mismatch_names_the_problem() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    enc.double()  # key moved, online not
    with pytest.raises(ValueError, match=r"dtype torch.float32 online but torch.float64"):
        enc.update()
    online.double()  # both moved: the cached pairing is rebuilt and works
    perturb_(online)
    enc.update(0.0)
    assert torch.equal(cast(SmallCNN, enc.key_encoder).fc.weight, online.fc.weight)


def test_a_reload_with_assign_in_another_dtype_names_the_cause() -> None:
    """A bfloat16 state loaded with assign=True keeps its dtype: the error said to move the
    MomentumEncoder with the model, which is not what happened."""
    online = SmallCNN()
    enc = MomentumEncoder(online)
    state = {k: v.bfloat16() for k, v in enc.state_dict().items()}
    enc.load_state_dict(state, assign=True)
    with pytest.raises(ValueError, match=r"torch.bfloat16 in the key encoder") as err:
        enc.update()
    assert str(err.value).count("a load_state_dict with assign=True") == 1  # once, not per weight


def test_online_moved_alone_is_reported_clearly() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    enc.update()
    online.double()  # no registration happens: caught when the fused op refuses
    with pytest.raises(ValueError, match=r"dtype torch.float64 online but torch.float32"):
        enc.update()


def test_buffers_own_keeps_key_statistics() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online, buffers="own")
    online(torch.randn(8, 3, 8, 8) + 3)  # online BN statistics move
    key_stats = snapshot(enc.key_encoder)
    key_bn1 = cast(SmallCNN, enc.key_encoder).bn1
    enc.update(0.0)
    assert torch.equal(cast(torch.Tensor, key_bn1.running_mean), key_stats["bn1.running_mean"])
    assert int(cast(torch.Tensor, key_bn1.num_batches_tracked)) == 0
    enc(torch.randn(8, 3, 8, 8) - 3)  # the key encoder's own forward updates its own
    assert int(cast(torch.Tensor, key_bn1.num_batches_tracked)) == 1
    assert not torch.equal(
        cast(torch.Tensor, key_bn1.running_mean), cast(torch.Tensor, online.bn1.running_mean)
    )


def test_key_encoder_left_in_eval_mode_while_the_online_model_trains_warns() -> None:
    """A model loaded in eval mode (``from_pretrained``) and put in training mode after the
    copy gave a key encoder in eval mode: keys of frozen BatchNorm statistics, silently."""
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    encoder = MomentumEncoder(online)
    online.train()  # the loop's model.train()
    with pytest.warns(RuntimeWarning, match=r"train online but not in the key encoder: 'the m"):
        encoder.update()
    encoder.train()
    statistics = cast(torch.Tensor, encoder.key_encoder.get_buffer("1.running_mean"))
    before = statistics.clone()
    encoder(torch.randn(16, 4) + 3.0)
    assert not torch.equal(statistics, before)  # moved by the batch's statistics


def test_modules_kept_in_eval_mode_on_both_sides_stay_so_without_a_warning() -> None:
    """A BatchNorm frozen and a dropout switched off with ``.eval()`` before the copy: the
    key encoder keeps them so, and nothing warns."""
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    online[1].eval()
    online[2].eval()
    encoder = MomentumEncoder(online)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.update()
    assert [m.training for m in encoder.key_encoder.modules()] == [True, True, False, False]
    x = torch.randn(16, 4)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), online(x))  # same modes, same weights


def test_buffers_copy_copies_all_buffers() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online, buffers="copy")
    for _ in range(3):
        online(torch.randn(8, 3, 8, 8) + 3)
    enc.update(0.9)
    for (name, k), (_, o) in zip(
        enc.key_encoder.named_buffers(), online.named_buffers(), strict=True
    ):
        assert torch.equal(k, o), name
    assert int(cast(torch.Tensor, cast(SmallCNN, enc.key_encoder).bn2.num_batches_tracked)) == 3


def test_buffers_ema_averages_floats_and_copies_integers() -> None:
    online = SmallCNN().double()
    enc = MomentumEncoder(online, buffers="ema")
    for _ in range(3):
        online(torch.randn(8, 3, 8, 8, dtype=torch.float64) + 3)
    key_before = snapshot(enc.key_encoder)
    enc.update(0.75)
    for name, k in enc.key_encoder.named_buffers():
        o = dict(online.named_buffers())[name]
        if k.is_floating_point():
            expected = 0.75 * key_before[name] + 0.25 * o
            torch.testing.assert_close(k, expected, rtol=0, atol=1e-15)
        else:
            assert k.dtype == torch.long and torch.equal(k, o), name  # copied: 3, not 0.75*0+...
    assert int(cast(torch.Tensor, cast(SmallCNN, enc.key_encoder).bn1.num_batches_tracked)) == 3


def test_transformer_block() -> None:
    online = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    enc = MomentumEncoder(online, momentum=0.8)
    perturb_(online)
    before = snapshot(enc.key_encoder)
    enc.update()
    for name, p in online.named_parameters():
        expected = 0.8 * before[name] + 0.2 * p.detach()
        torch.testing.assert_close(enc.key_encoder.get_parameter(name), expected)
    x = torch.randn(2, 5, 16)
    online.eval()
    enc.eval()
    enc.update(0.0)
    torch.testing.assert_close(enc(x), online(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(idx))


def test_tied_parameters_stay_tied_and_are_averaged_once() -> None:
    online = Tied().double()
    enc = MomentumEncoder(online)
    key = cast(Tied, enc.key_encoder)
    assert key.out.weight is key.embed.weight
    before = key.embed.weight.detach().clone()
    perturb_(online)
    enc.update(0.5)
    expected = 0.5 * before + 0.5 * online.embed.weight.detach()
    torch.testing.assert_close(key.embed.weight, expected, rtol=0, atol=1e-15)
    assert key.out.weight is key.embed.weight


def test_unwraps_data_parallel_and_compile() -> None:
    model = SmallCNN()
    # torch.compile returns an OptimizedModule for a module; the stubs say a callable
    for wrapped in (
        nn.DataParallel(model),
        cast(nn.Module, torch.compile(model)),
        nn.DataParallel(model),
    ):
        enc = MomentumEncoder(wrapped)
        assert enc.online is model
        assert isinstance(enc.key_encoder, SmallCNN)
        perturb_(model)
        enc.update(0.0)
        # (mypy's loop inference widens model to Module after the `is` check above)
        key, online = cast(SmallCNN, enc.key_encoder), cast(SmallCNN, model)
        assert torch.equal(key.conv1.weight, online.conv1.weight)


def test_state_dict_holds_only_the_key_encoder_and_round_trips() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    perturb_(online)
    enc.update(0.3)
    state = enc.state_dict()
    assert set(state) == {f"key_encoder.{k}" for k in online.state_dict()}
    assert len(list(enc.parameters())) == len(list(online.parameters()))
    restored = MomentumEncoder(SmallCNN())
    restored.load_state_dict(copy.deepcopy(state))
    for k, v in restored.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_update_and_forward_do_not_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    online = SmallCNN()
    x = torch.randn(4, 3, 8, 8)
    for mode in ("own", "copy", "ema"):
        enc = MomentumEncoder(online, buffers=mode)  # type: ignore[arg-type]
        with no_host_sync(monkeypatch):
            enc.update()
            enc(x)
            enc.update(0.5)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 10) == pytest.approx(0.99, abs=1e-15)
    assert cosine_momentum(10, 10) == pytest.approx(1.0, abs=1e-15)
    assert cosine_momentum(5, 10, base=0.9, final=0.98) == pytest.approx(0.94, abs=1e-15)
    values = [cosine_momentum(s / 4, 25, base=0.996) for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    for step in (0.5, 3.25, 17.0):
        expected = 1 - 0.5 * (1 + math.cos(math.pi * step / 25)) * (1 - 0.99)
        assert cosine_momentum(step, 25) == pytest.approx(expected, abs=1e-15)
