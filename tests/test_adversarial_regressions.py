"""Regressions from an adversarial pass: each once gave a silently wrong result or an
unclear crash."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from momentum_contrast import MomentumEncoder, symmetric_contrastive_loss
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle, concat_all_gather


def test_half_precision_tensor_momentum_is_refused() -> None:
    enc = MomentumEncoder(nn.Linear(3, 3))
    for dtype in (torch.bfloat16, torch.float16):  # bfloat16(0.999) == 1.0: no update
        with pytest.raises(TypeError, match="float32 or float64 tensor"):
            enc.update(torch.tensor(0.999, dtype=dtype))


def test_unshuffled_keys_swapped_through_data_are_gathered_anew() -> None:
    x = torch.randn(6, 4)
    shuffled, idx = batch_shuffle(x)
    keys = batch_unshuffle(shuffled * 2, idx)
    keys.data = torch.full((6, 4), 7.0)  # same tensor object, other memory
    assert torch.equal(concat_all_gather(keys), torch.full((6, 4), 7.0))


def test_unshuffled_keys_edited_in_place_are_gathered_anew() -> None:
    x = torch.randn(6, 4)
    shuffled, idx = batch_shuffle(x)
    keys = batch_unshuffle(shuffled, idx)
    keys.mul_(-1)
    assert torch.equal(concat_all_gather(keys), -x)


def test_batch_unshuffle_under_inference_mode() -> None:
    x = torch.randn(6, 4)
    with torch.inference_mode():
        shuffled, idx = batch_shuffle(x)
        keys = batch_unshuffle(shuffled + 1, idx)
        assert torch.equal(concat_all_gather(keys), x + 1)


def test_symmetric_loss_computes_in_float64_when_any_input_is() -> None:
    g = torch.Generator().manual_seed(0)
    q1, k1, k2 = (torch.randn(4, 8, generator=g) for _ in range(3))
    q2 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    assert symmetric_contrastive_loss(q1, q2, k1, k2).dtype == torch.float64


def test_symmetric_loss_offsets_and_temperatures() -> None:
    q, k = torch.randn(2, 8), torch.randn(6, 8)
    by_numpy = symmetric_contrastive_loss(q, q, k, k, positive_offset=np.int64(3))
    assert torch.equal(by_numpy, symmetric_contrastive_loss(q, q, k, k, positive_offset=3))
    with pytest.raises(ValueError, match="at least as many rows as q1"):
        symmetric_contrastive_loss(k, k, q, q, positive_offset=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        symmetric_contrastive_loss(q, q, q, q, temperature=float("inf"))


class ComplexScale(nn.Module):
    """A complex parameter and a complex buffer beside a real one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        self.real = nn.Parameter(torch.zeros(3))
        self.register_buffer("phase", torch.zeros(3, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.abs() + self.real


@pytest.mark.parametrize("ema_dtype", [None, torch.float32])
def test_complex_weights_are_averaged_not_copied(ema_dtype: torch.dtype | None) -> None:
    """They were copied (averaged only if floating); ema_dtype dropped their imaginary part."""
    online = ComplexScale()
    if ema_dtype is not None:
        online.real.data = online.real.data.bfloat16()
    enc = MomentumEncoder(online, buffers="ema", ema_dtype=ema_dtype)
    key = enc.key_encoder
    assert key.get_parameter("scale").dtype == key.get_buffer("phase").dtype == torch.complex64
    with torch.no_grad():
        online.scale.fill_(4 + 8j)
        online.get_buffer("phase").fill_(2j)
    enc.update(0.75)
    assert torch.equal(key.get_parameter("scale"), torch.full((3,), 1 + 2j, dtype=torch.complex64))
    assert torch.equal(key.get_buffer("phase"), torch.full((3,), 0.5j, dtype=torch.complex64))


def test_a_model_on_the_meta_device_is_not_said_to_share_memory() -> None:
    with torch.device("meta"):
        online = nn.Linear(3, 3)
    enc = MomentumEncoder(online)
    enc.update()  # raised "shares these parameters' memory": every meta address is 0
    assert enc.key_encoder.weight.device.type == "meta"
    enc.key_encoder = online  # a real sharing is still refused, by object
    with pytest.raises(ValueError, match="shares these parameters' memory"):
        enc.update()


def test_a_forward_after_the_online_model_was_cast_wider_names_the_problem() -> None:
    online = nn.Linear(4, 2).bfloat16()
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    online.double()  # wider than ema_dtype: autocast to float64 does not exist
    with pytest.raises(
        ValueError, match=r"ema_dtype torch.float32 cannot follow 'weight' \(torch.float64\)"
    ):
        enc(torch.randn(2, 4, dtype=torch.float64))


def bf16_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)).bfloat16()


def follows(enc: MomentumEncoder, online: nn.Module, m: float = 0.5) -> None:
    """One update equals ``m * key + (1 - m) * online``, written out in float64."""
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.25)
    before = {n: p.double() for n, p in enc.key_encoder.named_parameters()}
    enc.update(m)
    for name, p in online.named_parameters():
        want = m * before[name] + (1 - m) * p.double()
        torch.testing.assert_close(enc.key_encoder.get_parameter(name).double(), want)


def test_a_first_pairing_in_inference_mode_does_not_break_later_updates() -> None:
    online = bf16_linear()
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    with torch.inference_mode():
        enc.update()  # the scratch was an inference tensor: every later update raised
    follows(enc, online)


@pytest.mark.parametrize("buffers", ["own", "copy"])
def test_a_buffer_two_modules_share_stays_shared_under_ema_dtype(buffers: str) -> None:
    shared = torch.randn(4, dtype=torch.bfloat16)
    online = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).bfloat16()
    for block in online:
        block.register_buffer("pos", shared)
    enc = MomentumEncoder(online, buffers=buffers, ema_dtype=torch.float32)  # type: ignore[arg-type]
    key = enc.key_encoder
    assert key.get_buffer("0.pos") is key.get_buffer("1.pos")
    assert key.get_buffer("0.pos").dtype == torch.float32
    follows(enc, online)


@pytest.mark.parametrize("ema_dtype", [None, torch.float32])
def test_a_weight_reshaped_in_place_on_both_sides_is_followed_or_refused_loudly(
    ema_dtype: torch.dtype | None,
) -> None:
    """Same memory, same size, another shape on both sides: the pairing is kept (the memo
    holds sizes, not shapes). Averaged as before, except against a scratch of the old
    shape: an error, never a silent average, and assigning ``online`` pairs anew."""
    online = nn.Linear(6, 1, bias=False).to(torch.float32 if ema_dtype is None else torch.bfloat16)
    enc = MomentumEncoder(online, ema_dtype=ema_dtype)
    enc.update()
    online.weight.data = online.weight.data.view(6)
    key = enc.key_encoder.get_parameter("weight")
    key.data = key.data.view(6)
    if ema_dtype is not None:
        before = key.detach().clone()
        with pytest.raises(RuntimeError, match="shape"):
            enc.update(0.5)
        assert torch.equal(key, before)  # nothing written
        enc.online = online
    follows(enc, online)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_weights_are_averaged() -> None:
    online = nn.Linear(2, 2)
    online.phase = nn.Parameter(torch.zeros(3, dtype=torch.complex32))
    enc = MomentumEncoder(online)
    with torch.no_grad():
        online.phase.copy_(torch.full((3,), 4 + 8j, dtype=torch.complex64))
    with pytest.warns(RuntimeWarning, match="float16, too coarse"):  # as (real, imag) halves
        enc.update(0.75)  # NotImplementedError: no ComplexHalf lerp
    want = torch.full((3,), 1 + 2j, dtype=torch.complex64)
    assert torch.equal(enc.key_encoder.get_parameter("phase").to(torch.complex64), want)


def test_every_weight_ema_dtype_cannot_follow_is_named_in_one_short_message() -> None:
    online = nn.Sequential(*(nn.Linear(4, 4) for _ in range(30))).double()
    with pytest.raises(ValueError, match=r"cannot follow '0.weight' \(torch.float64\)") as err:
        MomentumEncoder(online, ema_dtype=torch.float32)
    assert len(str(err.value)) < 400 and "Move the MomentumEncoder" not in str(err.value)
    enc = MomentumEncoder(online.float(), ema_dtype=torch.float32)
    online.double()
    with pytest.raises(ValueError, match=r"cannot follow '0.bias', '0.weight', '1.bias'") as err:
        enc.update()
    assert str(err.value).count("cannot follow") == 1 and len(str(err.value)) < 1500


def test_copies_leave_the_pairing_and_its_scratch_behind() -> None:
    import io
    import pickle

    online = nn.Linear(300, 300).bfloat16()
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    fresh = len(pickle.dumps(enc))
    enc.update()  # pairs: a 90,300-element float32 scratch
    assert len(pickle.dumps(enc)) < fresh + 10_000
    buffer = io.BytesIO()
    torch.save(enc, buffer)
    assert buffer.tell() < fresh + 10_000
    twin = copy.deepcopy(enc)
    assert twin._pairs == {} and enc._pairs
    follows(twin, twin.online)
    follows(enc, online)
