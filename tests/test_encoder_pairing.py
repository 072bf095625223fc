"""MomentumEncoder never goes silently stale: whatever replaces, reloads or moves the
tensors of either model, the next update follows the models as they are now, or raises."""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from collections.abc import Iterator, MutableMapping
from typing import cast

import pytest
import torch
import torch.nn.utils.prune
from conftest import SmallCNN, perturb_
from torch import nn

from momentum_contrast import MomentumEncoder
from momentum_contrast.norm import SplitBatchNorm, convert_split_batchnorm


def fill_online(online: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(value)


def assert_key_equals_online(enc: MomentumEncoder) -> None:
    online = dict(enc.online.named_parameters())
    for name, k in enc.key_encoder.named_parameters():
        assert torch.equal(k, online[name]), name


def test_reload_with_assign_is_followed() -> None:
    online = nn.Linear(4, 4)
    enc = MomentumEncoder(online)
    enc.update()
    enc.load_state_dict(copy.deepcopy(enc.state_dict()), assign=True)  # new key tensors
    fill_online(online, 3.0)
    enc.update(0.0)
    key = cast(nn.Linear, enc.key_encoder)
    assert torch.equal(key.weight, torch.full((4, 4), 3.0))
    assert not key.weight.requires_grad  # the reloaded key encoder stays frozen


def test_online_reloaded_with_assign_is_followed() -> None:
    online = nn.Linear(4, 4)
    enc = MomentumEncoder(online)
    enc.update()
    state = {k: torch.full_like(v, 2.0) for k, v in online.state_dict().items()}
    online.load_state_dict(state, assign=True)  # new online tensors
    enc.update(0.0)
    assert torch.equal(cast(nn.Linear, enc.key_encoder).weight, torch.full((4, 4), 2.0))


def test_split_batchnorm_on_the_key_encoder_after_updates_is_followed() -> None:
    """A key encoder that computes otherwise (its own layers) is followed, with a warning."""
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    enc = MomentumEncoder(online)
    enc.update()
    convert_split_batchnorm(enc.key_encoder, 2)
    key = cast(nn.Sequential, enc.key_encoder)
    assert isinstance(key[1], SplitBatchNorm)
    with torch.no_grad():
        cast(nn.BatchNorm2d, online[1]).weight.fill_(5.0)
    with pytest.warns(RuntimeWarning, match=r"'1' \(its batch \(BatchNorm\) online, 2 sub-"):
        enc.update(0.0)
    assert torch.equal(cast(SplitBatchNorm, key[1]).weight, torch.full((4,), 5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.update(0.0)  # said once, where the pairing is made again


@pytest.mark.parametrize("updated_before", [False, True])
@pytest.mark.parametrize("convert", ["split", "sync"])
def test_a_model_converted_after_the_copy_is_said(updated_before: bool, convert: str) -> None:
    """convert_split_batchnorm (which changes the class of the same modules, tensors kept)
    or convert_sync_batchnorm (new modules, the same tensors) on the online model after the
    copy left the key encoder's BatchNorms whole-batch, silently: Shuffle-BN lost."""
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    enc = MomentumEncoder(online)
    if updated_before:
        enc.update()
    if convert == "split":
        convert_split_batchnorm(online, 2)
    else:
        assert nn.SyncBatchNorm.convert_sync_batchnorm(online) is online  # new children
    ours = "2 sub-batches (SplitBatchNorm)" if convert == "split" else "all ranks' batch"
    theirs = "its batch (BatchNorm) in the key encoder"
    message = re.escape(f"'1' ({ours}") + ".* online, " + re.escape(f"{theirs}), '3' ({ours}")
    with pytest.warns(RuntimeWarning, match=message):
        enc.update()
    if convert == "split":
        with warnings.catch_warnings():  # made an error: the assignment is undone
            warnings.simplefilter("error")
            with pytest.raises(RuntimeWarning, match="normalise otherwise"):
                enc.online = copy.deepcopy(online)
        assert enc.online is online
        convert_split_batchnorm(enc.key_encoder, 2)  # both alike: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            enc.update()


def test_models_alike_in_their_batchnorms_are_not_said_to_differ() -> None:
    """Classes of their own on each side (torch.fx's GraphModule per instance, parametrized
    modules) and layers that differ but normalise alike give no warning."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    traced = torch.fx.symbolic_trace(model)
    enc = MomentumEncoder(traced)
    assert type(enc.key_encoder) is not type(traced)  # a class of its own
    online = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1))
    both = MomentumEncoder(online)
    for side in (online, both.key_encoder):  # parametrized alike, after the copy
        nn.utils.parametrizations.weight_norm(cast(nn.Sequential, side)[0])
    both.online = online  # the parametrized weights are paired anew
    cast(nn.Sequential, both.key_encoder)[2] = nn.Identity()  # a key encoder without dropout
    convert_split_batchnorm(both.key_encoder, 1)  # one sub-batch: a plain BatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for encoder in (enc, both):
            encoder.update()
            encoder.update()


def test_replaced_key_encoder_is_followed_and_frozen() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    enc.update()
    enc.key_encoder = copy.deepcopy(online)
    perturb_(online)
    enc.update(0.0)
    assert_key_equals_online(enc)
    assert not any(p.requires_grad for p in enc.key_encoder.parameters())


def test_key_encoder_sharing_the_online_tensors_raises() -> None:
    online = nn.Linear(3, 3)
    enc = MomentumEncoder(online)
    enc.key_encoder = online  # could never lag behind: an EMA of nothing
    with pytest.raises(ValueError, match=r"shares these parameters' memory.*weight"):
        enc.update()


def test_online_moved_to_meta_raises() -> None:
    online = nn.Linear(2, 2)
    enc = MomentumEncoder(online)
    enc.update()
    online.to("meta")
    with pytest.raises(ValueError, match=r"device meta online but cpu"):
        enc.update(0.0)


def test_key_data_swapped_to_another_shape_raises() -> None:
    enc = MomentumEncoder(SmallCNN())
    enc.update()
    cast(SmallCNN, enc.key_encoder).fc.bias.data = torch.zeros(7)
    with pytest.raises(ValueError, match=r"'fc.bias' has shape \(16,\) online but \(7,\)"):
        enc.update()


@pytest.mark.filterwarnings(
    "ignore:MomentumEncoder.update\\(\\) ran again"
)  # updates stand in for steps
def test_parameter_swapped_without_registration_hooks_is_followed() -> None:
    """FSDP2 and other wrappers swap ``module._parameters[name]`` directly."""
    online = SmallCNN()
    enc = MomentumEncoder(online)
    enc.update()
    key = cast(SmallCNN, enc.key_encoder)
    key_fc_before = key.fc.weight.detach().clone()
    online.fc._parameters["weight"] = nn.Parameter(torch.full((16, 16), 4.0))
    key.conv1._parameters["weight"] = nn.Parameter(torch.zeros(8, 3, 3, 3))
    enc.update(0.5)
    torch.testing.assert_close(key.fc.weight, 0.5 * key_fc_before + 2.0)
    torch.testing.assert_close(key.conv1.weight, 0.5 * online.conv1.weight)
    enc.update(0.0)
    assert_key_equals_online(enc)


def test_rename_on_one_side_raises_even_when_tensors_are_the_same() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online)
    enc.update()
    online.head = online.fc
    del online.fc
    with pytest.raises(ValueError, match=r"'fc\.weight', 'fc\.bias'\]"):
        enc.update()


def test_buffers_replaced_on_the_key_side_are_followed() -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online, buffers="copy")
    enc.update()
    key = cast(SmallCNN, enc.key_encoder)
    key.bn1.register_buffer("running_mean", torch.zeros(8))  # a new tensor
    with torch.no_grad():
        cast(torch.Tensor, online.bn1.running_mean).fill_(1.5)
    enc.update()
    assert torch.equal(cast(torch.Tensor, key.bn1.running_mean), torch.full((8,), 1.5))


@pytest.mark.parametrize("buffers", ["copy", "ema"])
def test_a_buffer_mismatch_raises_before_anything_is_written(buffers: str) -> None:
    online = SmallCNN()
    enc = MomentumEncoder(online, buffers=buffers)  # type: ignore[arg-type]
    key = cast(SmallCNN, enc.key_encoder)
    before = {k: v.clone() for k, v in key.state_dict().items()}
    perturb_(online)
    online.bn1.register_buffer("running_mean", torch.zeros(3))  # reshaped online only
    with pytest.raises(ValueError, match=r"buffer 'bn1.running_mean' has shape \(3,\) online"):
        enc.update()
    for name, value in key.state_dict().items():  # the parameters were not averaged either
        assert torch.equal(value, before[name]), name


def test_online_setter_repairs_and_never_registers() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    enc = MomentumEncoder(a)
    enc.update()
    enc.online = b
    assert enc.online is b
    assert list(enc.state_dict()) == ["key_encoder.weight", "key_encoder.bias"]
    assert "online" not in dict(enc.named_children())
    enc.update(0.0)
    assert torch.equal(cast(nn.Linear, enc.key_encoder).weight, b.weight)
    enc.online = nn.DataParallel(a)  # unwrapped like the constructor's argument
    assert enc.online is a


def test_online_setter_rejects_a_model_that_does_not_match() -> None:
    a = nn.Linear(2, 2)
    enc = MomentumEncoder(a)
    with pytest.raises(ValueError, match=r"'weight' has shape \(3, 2\) online"):
        enc.online = nn.Linear(2, 3)
    assert enc.online is a  # unchanged after the failed assignment
    with pytest.raises(TypeError, match=r"online must be an nn\.Module, got str"):
        enc.online = "model"  # type: ignore[assignment]
    enc.update(0.0)
    assert torch.equal(cast(nn.Linear, enc.key_encoder).weight, a.weight)


def two_layers() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


@pytest.mark.parametrize("how", ["data_same_name", "set_same_name", "data_other_name", "swap"])
def test_memory_shared_after_the_first_update_raises(how: str) -> None:
    """Swaps that keep the parameter objects (``.data =``, ``set_``) move their memory:
    the check sees it, and refuses a key encoder living in the online model's memory."""
    online = two_layers()
    enc = MomentumEncoder(online, momentum=0.9)
    enc.update()
    before = [p.detach().clone() for p in online.parameters()]
    key = cast(nn.Sequential, enc.key_encoder)
    key_first = cast(nn.Linear, key[0])
    online_first, online_second = cast(nn.Linear, online[0]), cast(nn.Linear, online[1])
    if how == "data_same_name":
        key_first.weight.data = online_first.weight.data
    elif how == "set_same_name":
        with torch.no_grad():
            # the stubs omit set_(Tensor), which the docs and the runtime accept
            key_first.weight.set_(online_first.weight)  # type: ignore[call-overload]
    elif how == "data_other_name":
        key_first.weight.data = online_second.weight.data
    else:
        enc.key_encoder = nn.Sequential(online[1], online[0])
    with pytest.raises(ValueError, match="shares these parameters' memory"):
        enc.update()
    for p, b in zip(online.parameters(), before, strict=True):
        assert torch.equal(p, b)  # the online model was not written


def test_data_swap_to_fresh_memory_is_followed() -> None:
    online = two_layers()
    enc = MomentumEncoder(online, momentum=0.5)
    enc.update()
    key_second = cast(nn.Linear, cast(nn.Sequential, enc.key_encoder)[1])
    key_second.bias.data = torch.full((4,), 2.0)  # same object, new memory
    enc.update()
    expected = 0.5 * torch.full((4,), 2.0) + 0.5 * cast(nn.Linear, online[1]).bias.detach()
    torch.testing.assert_close(key_second.bias, expected)


def test_compiled_key_encoder_is_unwrapped_like_the_online_model() -> None:
    online = two_layers()
    enc = MomentumEncoder(online, momentum=0.0)
    enc.key_encoder = torch.compile(enc.key_encoder)  # type: ignore[assignment]
    enc.update()
    compiled = cast("torch._dynamo.eval_frame.OptimizedModule", enc.key_encoder)
    for (name, k), o in zip(
        compiled._orig_mod.named_parameters(), online.parameters(), strict=True
    ):
        assert torch.equal(k, o), name


def test_tensor_subclass_parameters_without_storage_of_their_own() -> None:
    # a wrapper subclass (as torchao's) has no storage to compare: it must still average
    from torch.testing._internal.two_tensor import TwoTensor

    online = nn.Linear(3, 3)
    online.weight = nn.Parameter(TwoTensor(torch.randn(3, 3), torch.randn(3, 3)))
    enc = MomentumEncoder(online, momentum=0.5)
    key = cast(nn.Linear, enc.key_encoder)
    before = key.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    enc.update()
    want = 0.5 * before + 0.5 * online.weight.detach()
    for part in ("a", "b"):
        got, expected = getattr(key.weight, part), getattr(want, part)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_parameter_tied_on_one_side_only_raises() -> None:
    online = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    online[1].weight = cast(nn.Linear, online[0]).weight  # tied online
    enc = MomentumEncoder(online)
    enc.update()  # tied on both sides: fine, averaged once
    key_second = cast(nn.Linear, cast(nn.Sequential, enc.key_encoder)[1])
    key_second.weight = nn.Parameter(key_second.weight.detach().clone())
    with pytest.raises(ValueError, match=r"'1.weight' is tied to another parameter on one side"):
        enc.update()


def test_a_smaller_view_swapped_in_at_the_same_address_raises() -> None:
    # (16,) -> (1,) keeps the object and the data pointer; the lerp would broadcast it
    online = nn.Linear(8, 16)
    enc = MomentumEncoder(online, momentum=0.5)
    enc.update()
    online.bias.data = online.bias.data[:1]
    with pytest.raises(ValueError, match=r"'bias' has shape \(1,\) online but \(16,\)"):
        enc.update()


def test_ties_reloaded_with_assign_stay_ties() -> None:
    online = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    online[1].weight = cast(nn.Linear, online[0]).weight
    enc = MomentumEncoder(online, momentum=0.5)
    enc.update()
    buffer = io.BytesIO()
    torch.save(enc.state_dict(), buffer)  # one storage for both names
    buffer.seek(0)
    enc.load_state_dict(torch.load(buffer, weights_only=True), assign=True)  # one memory, 2 objects
    key = cast(nn.Sequential, enc.key_encoder)
    key_first, key_second = cast(nn.Linear, key[0]), cast(nn.Linear, key[1])
    assert key_first.weight is not key_second.weight
    before = key_first.weight.detach().clone()
    online_first = cast(nn.Linear, online[0])
    with torch.no_grad():
        online_first.weight.add_(1.0)
    enc.update()  # averaged once, not twice
    expected = 0.5 * before + 0.5 * online_first.weight.detach()
    torch.testing.assert_close(key_second.weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ema_dtype", [None, torch.float32])
def test_a_model_tied_by_memory_before_it_is_wrapped_gets_a_tied_copy(
    ema_dtype: torch.dtype | None,
) -> None:
    # torch's low-memory load: a model built on meta, then load_state_dict(assign=True) of
    # tied weights: two objects, one memory, which a deepcopy would turn into two memories
    def tied() -> nn.Sequential:
        model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        model[1].weight = cast(nn.Embedding, model[0]).weight
        return model

    state = tied().bfloat16().state_dict()
    with torch.device("meta"):
        online = tied()
    online.load_state_dict(state, assign=True)
    embedding, head = cast(nn.Embedding, online[0]), cast(nn.Linear, online[1])
    assert embedding.weight is not head.weight
    assert embedding.weight.data_ptr() == head.weight.data_ptr()
    enc = MomentumEncoder(online, momentum=0.5, ema_dtype=ema_dtype)
    key = dict(enc.key_encoder.named_parameters(remove_duplicate=False))
    assert key["0.weight"] is not key["1.weight"]  # as the online model: other objects,
    assert key["0.weight"].data_ptr() == key["1.weight"].data_ptr()  # one memory
    assert key["0.weight"].dtype == (ema_dtype or torch.bfloat16)
    before = key["0.weight"].detach().float().clone()
    with torch.no_grad():
        embedding.weight.add_(1.0)  # one memory: both names moved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bfloat16 keys without ema_dtype
        enc.update()  # averaged once, not twice
    expected = 0.5 * before + 0.5 * embedding.weight.detach().float()
    atol = 1e-6 if ema_dtype else 1e-2  # a bfloat16 average rounds to 8 bits
    torch.testing.assert_close(key["1.weight"].float(), expected, rtol=0, atol=atol)
    # compiled, ties are told by object: untied on both sides, each name gets the same value
    compiled = torch.compile(enc.update, fullgraph=True, backend="inductor")
    with torch.no_grad():
        embedding.weight.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compiled(0.5)
    expected = 0.5 * expected + 0.5 * embedding.weight.detach().float()
    torch.testing.assert_close(key["0.weight"].float(), expected, rtol=0, atol=2 * atol)


def test_an_encoder_pickles_after_updates_with_gradients() -> None:
    online = nn.Linear(4, 4)
    enc = MomentumEncoder(online)
    online(torch.randn(2, 4)).sum().backward()
    enc.update()
    clone = pickle.loads(pickle.dumps(enc))
    assert torch.equal(clone.key_encoder.weight, cast(nn.Linear, enc.key_encoder).weight)
    clone.update()  # it follows its own copy of the online model


def _renamed(names: dict[str, object], old: str, new: str) -> dict[str, object]:
    """The same dict, in the same order, with one key renamed."""
    return {new if k == old else k: v for k, v in names.items()}


@pytest.mark.parametrize(
    "change",
    ["parameter", "last child", "child set to None", "pool", "which is None", "which child"],
)
def test_a_rename_keeping_every_tensor_and_its_order_is_seen(change: str) -> None:
    """The walk of every update builds no names; what names the tensors (each module's names
    of its children and of its tensors) is compared instead, so a rename that keeps every
    tensor where it was is still a mismatch, and a child set to None is no module."""
    online = SmallCNN()
    enc = MomentumEncoder(online)
    if change == "which child":  # pool set to None on both sides: a None child to move
        online._modules["pool"] = enc.key_encoder._modules["pool"] = None
    enc.update()
    if change == "which is None":  # conv1: {weight: W, bias: None} -> {weight: None, bias: W}
        weight = online.conv1.weight
        online.conv1._parameters = {"weight": None, "bias": weight}  # type: ignore[assignment]
        expected = "'conv1.bias'"
    elif change == "which child":  # {pool: None, fc: FC} -> {pool: FC, fc: None}
        online._modules.update(pool=online._modules["fc"], fc=None)
        expected = "'pool.weight'"
    elif change == "parameter":  # fc.weight -> fc.kernel, still first in fc
        online.fc._parameters = _renamed(online.fc._parameters, "weight", "kernel")  # type: ignore[assignment]
        expected = "'fc.kernel'"
    elif change == "last child":  # fc -> head, still the last child
        online._modules = _renamed(online._modules, "fc", "head")  # type: ignore[assignment]
        expected = "'head.weight'"
    elif change == "child set to None":  # no tensors there: bn2's are missing
        online._modules["bn2"] = None
        expected = "'bn2.weight'"
    else:  # a child without tensors, renamed: no tensor's name changes, nothing to say
        online._modules = _renamed(online._modules, "pool", "avgpool")  # type: ignore[assignment]
        perturb_(online)
        enc.update(0.0)
        for k, o in zip(enc.key_encoder.parameters(), online.parameters(), strict=True):
            assert torch.equal(k, o)
        return
    with pytest.raises(ValueError, match="does not match the key encoder") as err:
        enc.update()
    assert expected in str(err.value)


class _ShowsMore(nn.Module):
    """A module whose named_parameters() shows a tensor it does not register."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.__dict__["extra"] = [nn.Parameter(torch.zeros(3))]

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        for i, p in enumerate(self.__dict__["extra"]):
            yield f"{prefix}extra{i}", p


def test_a_model_with_its_own_named_walk_is_walked_by_name() -> None:
    """The walk without names reads _modules and _parameters; a module that overrides its
    named walk was then not followed (a replaced tensor kept its old pair, an added one was
    not refused)."""
    online = _ShowsMore()
    enc = MomentumEncoder(online, momentum=0.5)
    enc.update()
    online.__dict__["extra"][0] = nn.Parameter(torch.full((3,), 10.0))
    enc.update()
    assert torch.equal(enc.key_encoder.__dict__["extra"][0], torch.full((3,), 5.0))
    online.__dict__["extra"].append(nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match=r"does not have: \['extra1'\]"):
        enc.update()


def test_a_torchscript_submodule_is_followed() -> None:
    """TorchScript keeps its names in wrappers, not dicts: the walk without names raised
    KeyError."""
    online = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    enc = MomentumEncoder(online, momentum=0.5)
    enc.update()
    key = cast(nn.Sequential, enc.key_encoder)
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        online[1], key[1] = torch.jit.script(online[1]), torch.jit.script(key[1])
    before = [p.detach().clone() for p in enc.key_encoder.parameters()]
    perturb_(online)
    enc.update()
    for now, old, new in zip(key.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(now, 0.5 * old + 0.5 * new.detach(), rtol=0, atol=1e-7)


class _Children(MutableMapping[str, "nn.Module | None"]):
    """A module registry that is not a dict (insertion-ordered, as torch's)."""

    def __init__(self) -> None:
        self.held: dict[str, nn.Module | None] = {}

    def __getitem__(self, name: str) -> nn.Module | None:
        return self.held[name]

    def __setitem__(self, name: str, module: nn.Module | None) -> None:
        self.held[name] = module

    def __delitem__(self, name: str) -> None:
        del self.held[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.held)

    def __len__(self) -> int:
        return len(self.held)


def test_a_model_whose_children_are_not_in_a_dict_is_followed() -> None:
    online = nn.Module()
    online.__dict__["_modules"] = _Children()
    online.a, online.b = nn.Linear(2, 2), nn.Linear(2, 2)
    enc = MomentumEncoder(online, momentum=0.0)
    enc.update()
    online.b = nn.Linear(2, 2)  # a replaced submodule: followed
    enc.update()
    key_b, online_b = cast(nn.Linear, enc.key_encoder.b), cast(nn.Linear, online.b)
    torch.testing.assert_close(key_b.weight, online_b.weight.detach())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("whole", [False, True], ids=["submodule", "whole model"])
def test_a_model_scripted_before_construction_is_copied_and_followed(whole: bool) -> None:
    """Copied with autograd on, a ScriptModule's parameters came out as non-leaf tensors and
    the constructor failed (requires_grad_ of a non-leaf)."""
    torch.manual_seed(0)
    if whole:
        online: nn.Module = torch.jit.script(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)))
    else:
        online = nn.Sequential(torch.jit.script(nn.Linear(2, 3)), nn.Linear(3, 2))
    enc = MomentumEncoder(online, momentum=0.5)
    before = [p.detach().clone() for p in enc.key_encoder.parameters()]
    assert before and not any(p.requires_grad for p in enc.key_encoder.parameters())
    perturb_(online)
    enc.update()
    now = list(enc.key_encoder.parameters())
    for k, old, new in zip(now, before, online.parameters(), strict=True):
        torch.testing.assert_close(k, 0.5 * old + 0.5 * new.detach(), rtol=0, atol=1e-7)
    x = torch.randn(4, 2)  # the key encoder's forward runs on the averaged weights
    w1, b1, w2, b2 = now
    torch.testing.assert_close(enc(x), (x @ w1.T + b1) @ w2.T + b2)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the older weight_norm is deprecated
@pytest.mark.parametrize("reparametrize", ["prune", "weight_norm"])
def test_a_model_holding_a_computed_weight_is_refused_naming_the_cause(
    reparametrize: str,
) -> None:
    """torch.nn.utils.prune and the older weight_norm keep ``weight`` as a tensor computed
    from parameters, which copy.deepcopy refuses with torch's message about weight_norm."""
    layer = nn.Linear(4, 4)
    if reparametrize == "prune":
        torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
    else:
        layer = torch.nn.utils.weight_norm(layer)
    with pytest.raises(TypeError, match=r"online cannot be copied.*torch\.nn\.utils\.prune"):
        MomentumEncoder(nn.Sequential(layer))
    if reparametrize == "prune":  # removed: a plain parameter again, which is copied
        torch.nn.utils.prune.remove(layer, "weight")
        MomentumEncoder(nn.Sequential(layer)).update()


def test_a_module_made_its_own_descendant_fails_at_once() -> None:
    """The walk without names kept walking the cycle, its lists growing until memory ran out;
    torch's own walks raise RecursionError, as the update does now."""
    online = nn.Sequential(nn.Linear(2, 2))
    enc = MomentumEncoder(online)
    enc.update()
    online[0].back = online  # a back reference registered as a child
    key = cast(nn.Sequential, enc.key_encoder)
    key[0].back = key
    with pytest.raises(RecursionError):
        enc.update()
