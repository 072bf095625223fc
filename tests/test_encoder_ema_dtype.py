"""``ema_dtype``: the key encoder itself is float32 (one source of truth) under torch.compile,
module casts, state dicts in any order of casts, outside writes, and the dtype rule."""

from __future__ import annotations

import copy
from typing import cast

import pytest
import torch
from torch import nn

from momentum_contrast import MomentumEncoder

M = 0.999


def float64_ema(start: torch.Tensor, onlines: list[torch.Tensor], m: float) -> torch.Tensor:
    """``key = m * key + (1 - m) * online``, step by step, in float64."""
    key = start.double()
    for online in onlines:
        key = m * key + (1 - m) * online.double()
    return key


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_update_equals_eager_and_float64(backend: str, device: str) -> None:
    torch.manual_seed(0)
    online = nn.Linear(64, 64).bfloat16().to(device)
    enc = MomentumEncoder(online, momentum=M, ema_dtype=torch.float32)
    eager = MomentumEncoder(online, momentum=M, ema_dtype=torch.float32)
    start = cast(nn.Linear, enc.key_encoder).weight.detach().to("cpu", copy=True)
    g = torch.Generator().manual_seed(1)
    update = torch.compile(enc.update, backend=backend)
    m, seen = torch.tensor(M, device=device), []
    for _ in range(200):
        with torch.no_grad():  # an optimizer step: 0.05 and a little noise, in bfloat16
            online.weight.add_((0.05 * torch.rand(64, 64, generator=g)).bfloat16().to(device))
        seen.append(online.weight.detach().to("cpu", copy=True))
        update(m)
        eager.update(m)
    want = float64_ema(start, seen, M)
    key = enc.key_encoder.weight
    assert key.dtype == torch.float32
    # the compiled update is the eager one, within float32 rounding
    torch.testing.assert_close(key, eager.key_encoder.weight, rtol=0, atol=1e-6)
    # both track the float64 average (float32 rounding over 200 steps: ~1e-5); a bfloat16
    # average stalls (about 0.01 off here)
    torch.testing.assert_close(key.cpu().double(), want, rtol=0, atol=2e-5)
    assert (want - start.cpu().double()).abs().mean() > 0.1  # the average moved


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_write_between_compiled_updates_is_the_new_state(backend: str) -> None:
    online = nn.Linear(8, 8).bfloat16()
    enc = MomentumEncoder(online, momentum=0.5, ema_dtype=torch.float32)
    update = torch.compile(enc.update, backend=backend)
    with torch.no_grad():
        online.weight.fill_(1.0)
    update()
    with torch.no_grad():
        cast(nn.Linear, enc.key_encoder).weight.copy_(torch.full((8, 8), 3.0))  # outside update()
        online.weight.fill_(2.0)
    update()
    want = torch.full((8, 8), 0.5 * 3.0 + 0.5 * 2.0)
    torch.testing.assert_close(enc.key_encoder.weight, want, rtol=0, atol=0)


class Container(nn.Module):
    """A LightningModule's layout: the model and its key encoder in one module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
        self.key_encoder = MomentumEncoder(self.model, momentum=M, ema_dtype=torch.float32)

    def step(self, i: int) -> None:
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_((1e-2 + 3e-3 * torch.randn(p.shape, generator=g)).to(p.dtype))
        self.key_encoder.update()


def test_a_container_cast_to_bf16_after_construction_round_trips() -> None:
    trained = Container().to(torch.bfloat16)  # Lightning precision="bf16-true"
    keys = dict(trained.key_encoder.key_encoder.named_parameters())
    assert all(k.dtype == torch.float32 for k in keys.values())
    assert trained.key_encoder(torch.randn(2, 16).bfloat16()).dtype == torch.bfloat16
    for i in range(50):
        trained.step(i)
    state = copy.deepcopy(trained.state_dict())
    assert state["key_encoder.key_encoder.0.weight"].dtype == torch.float32
    assert state["model.0.weight"].dtype == torch.bfloat16
    for order in ("cast, then load", "load, then cast"):
        fresh = Container()
        if order == "cast, then load":
            fresh.to(torch.bfloat16)
            fresh.load_state_dict(state)
        else:
            fresh.load_state_dict(state)
            fresh.to(torch.bfloat16)
        for name, value in fresh.state_dict().items():
            assert value.dtype == state[name].dtype, (order, name)
            assert torch.equal(value, state[name]), (order, name)
        twin = copy.deepcopy(trained)
        for i in range(50, 60):  # resume: the same steps give the same bits
            twin.step(i)
            fresh.step(i)
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, twin.state_dict()[name]), (order, name)
        key = fresh.key_encoder.key_encoder.get_parameter("0.weight")
        assert not torch.equal(key, key.bfloat16().float())  # float32 bits kept


def linear_and_norm(enc: MomentumEncoder) -> tuple[nn.Linear, nn.BatchNorm1d]:
    """``enc.key_encoder[0]`` and ``[1]``, typed, for a key encoder built on the
    ``nn.Sequential(nn.Linear, nn.BatchNorm1d)`` below."""
    key = cast(nn.Sequential, enc.key_encoder)
    return cast(nn.Linear, key[0]), cast(nn.BatchNorm1d, key[1])


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16, torch.float64])
def test_casts_of_a_parent_keep_the_key_encoder_float32_and_move_it(cast: torch.dtype) -> None:
    holder = nn.Module()
    holder.online = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    holder.key = MomentumEncoder(holder.online, ema_dtype=torch.float32)
    key_linear, key_norm = linear_and_norm(holder.key)
    exact = key_linear.weight.clone()
    holder.to(cast)
    assert holder.online[0].weight.dtype == cast
    assert key_linear.weight.dtype == torch.float32
    assert key_norm.get_buffer("running_var").dtype == torch.float32
    assert key_norm.get_buffer("num_batches_tracked").dtype == torch.long
    assert torch.equal(key_linear.weight, exact)  # no rounding on the way
    holder.to("meta")
    assert key_linear.weight.device.type == "meta"
    assert key_linear.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("params", "ema_dtype"),
    [
        (torch.bfloat16, torch.float16),  # float16 cannot hold bfloat16's range
        (torch.float16, torch.bfloat16),  # bfloat16 has fewer significant bits
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
)
def test_an_ema_dtype_narrower_than_the_parameters_is_refused(
    params: torch.dtype, ema_dtype: torch.dtype
) -> None:
    with pytest.raises(ValueError, match=rf"ema_dtype {ema_dtype} cannot follow"):
        MomentumEncoder(nn.Linear(4, 4).to(params), ema_dtype=ema_dtype)


def test_an_online_model_cast_wider_than_ema_dtype_is_refused_at_update() -> None:
    online = nn.Linear(4, 4)
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    online.double()
    match = r"ema_dtype torch.float32 cannot follow 'bias', 'weight' \(torch.float64\)"
    with pytest.raises(ValueError, match=match):
        enc.update()


def test_an_ema_dtype_wider_than_float32_over_float32_weights_is_refused() -> None:
    # no autocast runs float64 weights in float32: the forward would fail on the first batch
    with pytest.raises(ValueError, match=r"ema_dtype torch.float64 cannot follow 'weight'"):
        MomentumEncoder(nn.Linear(4, 4), ema_dtype=torch.float64)
    enc = MomentumEncoder(nn.Linear(4, 4).double(), ema_dtype=torch.float64)  # its own dtype
    assert enc(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


class KeptInFloat32(nn.Module):
    """A float32 weight first (a scale: norms and position embeddings are often kept in
    float32), then a bfloat16 layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4))
        self.linear = nn.Linear(4, 4).bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale.to(x.dtype)


def test_a_model_keeping_some_weights_in_float32_runs_in_its_narrower_dtype() -> None:
    """The forward autocast to the dtype of the first floating weight, float32 here: the
    float32 key encoder's linear layer met the bfloat16 input (a RuntimeError that did not
    name ema_dtype)."""
    torch.manual_seed(0)
    online = KeptInFloat32()
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    assert {p.dtype for p in enc.key_encoder.parameters()} == {torch.float32}
    x = torch.randn(3, 4).bfloat16()
    out = enc(x)
    assert out.dtype == torch.bfloat16
    # the float32 copies of bfloat16 weights round back exactly: the online model's output
    torch.testing.assert_close(out, online(x), rtol=0, atol=0)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_the_update_after_a_load_starts_from_what_was_loaded(
    assign: bool, saved_dtype: torch.dtype
) -> None:
    online = nn.Linear(4, 4).bfloat16()
    enc = MomentumEncoder(online, momentum=0.5, ema_dtype=torch.float32)
    enc.update()  # the pairing is built: a load must not leave it on stale tensors
    value = 1.0 + 2**-12  # below bfloat16's resolution: kept by a float32 checkpoint only
    state = {k: torch.full_like(v, value, dtype=saved_dtype) for k, v in enc.state_dict().items()}
    if assign:  # assign=True keeps the loaded tensors' dtype: load float32 ones
        state = {k: v.float() for k, v in state.items()}
    enc.load_state_dict(state, assign=assign)
    with torch.no_grad():
        online.weight.fill_(3.0)
    enc.update()
    start = value if saved_dtype == torch.float32 else 1.0
    want = torch.full((4, 4), 0.5 * start + 0.5 * 3.0)
    torch.testing.assert_close(enc.key_encoder.weight, want, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["data_copy", "data_assign", "cast_then_assign"])
def test_writes_no_version_counter_sees_are_the_new_state(how: str) -> None:
    online = nn.Linear(8, 8)
    holder = nn.Module()
    holder.online = online
    holder.key = MomentumEncoder(online, momentum=0.99, ema_dtype=torch.float32)
    holder.key.update()
    new = torch.randn(8, 8)
    weight = cast(nn.Linear, holder.key.key_encoder).weight
    if how == "data_copy":  # the authors' init idiom: no version counter moves
        weight.data.copy_(new)
    elif how == "data_assign":
        weight.data = new.clone()
    else:
        holder.to(torch.bfloat16)
        weight.data = new.clone()
    holder.key.update(1.0)  # m = 1: the key stays what was written
    assert torch.equal(cast(nn.Linear, holder.key.key_encoder).weight, new)


def test_a_deep_copy_follows_its_own_online_copy() -> None:
    holder = Container().to(torch.bfloat16)
    holder.step(0)
    twin = copy.deepcopy(holder)
    for i in range(1, 6):
        holder.step(i)
        twin.step(i)
    for (name, a), b in zip(holder.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr(), name


@pytest.mark.filterwarnings(
    "ignore:MomentumEncoder.update\\(\\) ran again"
)  # updates stand in for steps
def test_a_parameter_removed_from_both_models_after_construction_is_followed() -> None:
    # round 4, finding 3: a bare KeyError in update() and load_state_dict(strict=False)
    online = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).bfloat16()
    enc = MomentumEncoder(online, momentum=0.5, ema_dtype=torch.float32)
    enc.update()
    key = cast(nn.Sequential, enc.key_encoder)
    for model in (online, key):
        del model[1]._parameters["bias"]
        model[1].register_parameter("bias", None)
    with torch.no_grad():
        cast(nn.Linear, online[1]).weight.fill_(1.0)
    enc.update()
    start = cast(nn.Linear, key[1]).weight.detach().clone()
    enc.update()
    torch.testing.assert_close(key[1].weight, 0.5 * start + 0.5)
    state = {k: v for k, v in enc.state_dict().items() if k != "key_encoder.0.bias"}
    result = enc.load_state_dict(state, strict=False)
    assert result.missing_keys == ["key_encoder.0.bias"] and not result.unexpected_keys


@pytest.mark.parametrize("buffers", ["own", "ema"])
def test_a_buffer_ema_dtype_cannot_follow_is_refused_at_construction(buffers: str) -> None:
    norm = nn.BatchNorm1d(4).bfloat16()
    norm.register_buffer("running_var", torch.ones(4, dtype=torch.float64))  # cast too: refused
    match = r"ema_dtype torch.float32 cannot follow 'running_var' \(torch.float64\)"
    with pytest.raises(ValueError, match=match):
        MomentumEncoder(norm, buffers=buffers, ema_dtype=torch.float32)  # type: ignore[arg-type]


def test_an_assign_load_of_another_dtype_is_explained() -> None:
    """load_state_dict(assign=True) of a bfloat16 file puts bfloat16 key weights in place;
    the error at the next update advised moving or rebuilding the encoder."""
    online = nn.Linear(4, 4).bfloat16()
    enc = MomentumEncoder(online, ema_dtype=torch.float32)
    enc.load_state_dict({k: v.bfloat16() for k, v in enc.state_dict().items()}, assign=True)
    with pytest.raises(ValueError, match=r"assign=True, which keeps the file's dtype \(load") as e:
        enc.update()
    assert str(e.value).count("which keeps the file's dtype") == 1  # once, not per weight
    assert "'weight' has dtype torch.float32 (ema_dtype) but torch.bfloat16" in str(e.value)
    enc.load_state_dict({k: v.float() for k, v in enc.state_dict().items()}, assign=True)
    enc.update()  # float32 again: followed
    assert enc.key_encoder.weight.dtype == torch.float32
