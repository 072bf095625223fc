"""SplitBatchNorm against ordinary BatchNorm applied to each split; conversion."""

from __future__ import annotations

import copy
from typing import cast

import pytest
import torch
import torchvision
from torch import nn

from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
from momentum_contrast.norm import SplitBatchNorm, convert_split_batchnorm

f64 = torch.float64


@pytest.mark.parametrize(
    ("bn_cls", "shape"),
    [(nn.BatchNorm2d, (12, 5, 4, 3)), (nn.BatchNorm1d, (12, 5)), (nn.BatchNorm1d, (12, 5, 7))],
)
@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_training_equals_batchnorm_per_split(
    bn_cls: type[nn.modules.batchnorm._BatchNorm], shape: tuple[int, ...], splits: int
) -> None:
    torch.manual_seed(0)
    reference = bn_cls(5, momentum=0.3).to(f64)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2)
        reference.bias.uniform_(-1, 1)
        cast(torch.Tensor, reference.running_mean).uniform_(-1, 1)  # (typed Tensor | None)
        cast(torch.Tensor, reference.running_var).uniform_(0.5, 2)
    split_bn = convert_split_batchnorm(copy.deepcopy(reference), splits)
    assert isinstance(split_bn, SplitBatchNorm)
    x = torch.randn(*shape, dtype=f64) * 3 + 1
    y = split_bn(x)
    parts = [copy.deepcopy(reference) for _ in range(splits)]
    expected = torch.cat([bn(chunk) for bn, chunk in zip(parts, x.chunk(splits), strict=True)])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    mean_of = lambda name: torch.stack([getattr(bn, name) for bn in parts]).mean(0)  # noqa: E731
    torch.testing.assert_close(split_bn.running_mean, mean_of("running_mean"), rtol=0, atol=1e-12)
    torch.testing.assert_close(split_bn.running_var, mean_of("running_var"), rtol=0, atol=1e-12)
    assert int(cast(torch.Tensor, split_bn.num_batches_tracked)) == 1
    # gradients flow to the shared affine parameters as in the separate BatchNorms
    y.square().sum().backward()
    sum(bn(c).square().sum() for bn, c in zip(parts, x.chunk(splits), strict=True)).backward()
    torch.testing.assert_close(
        split_bn.weight.grad, sum(bn.weight.grad for bn in parts), rtol=0, atol=1e-9
    )


def test_momentum_none_keeps_the_cumulative_average_of_the_splits() -> None:
    # nn.BatchNorm's momentum=None: running = running + (x_t - running) / t. The update is
    # linear, so the mean of S separate BatchNorms' statistics is the split one's
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3, momentum=None).to(f64)
    split_bn = convert_split_batchnorm(copy.deepcopy(reference), 2)
    parts = [copy.deepcopy(reference) for _ in range(2)]
    for _ in range(3):
        x = torch.randn(8, 3, 2, 2, dtype=f64) * 2 + 1
        split_bn(x)
        for bn, chunk in zip(parts, x.chunk(2), strict=True):
            bn(chunk)
    for name in ("running_mean", "running_var"):
        expected = torch.stack([getattr(bn, name) for bn in parts]).mean(0)
        torch.testing.assert_close(getattr(split_bn, name), expected, rtol=0, atol=1e-12)
    assert int(cast(torch.Tensor, split_bn.num_batches_tracked)) == 3


def test_eval_equals_batchnorm() -> None:
    reference = nn.BatchNorm2d(4).to(f64)
    reference(torch.randn(8, 4, 3, 3, dtype=f64))  # non-trivial running statistics
    split_bn = convert_split_batchnorm(copy.deepcopy(reference), 4).eval()
    reference.eval()
    x = torch.randn(6, 4, 3, 3, dtype=f64)  # in eval, any batch size
    torch.testing.assert_close(split_bn(x), reference(x), rtol=0, atol=0)


def test_convert_keeps_state_dict_mode_and_grad_flags() -> None:
    model = torchvision.models.resnet18()
    model(torch.randn(4, 3, 32, 32))  # move the running statistics
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_split_batchnorm(model, 2)
    assert converted is model
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 20 and all(isinstance(m, SplitBatchNorm) for m in bns)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not model.training and not model.get_parameter("layer1.0.bn1.weight").requires_grad


def test_convert_keeps_the_objects_an_optimizer_and_a_sharing_hold() -> None:
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, shared)  # one BatchNorm, twice
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    assert convert_split_batchnorm(model, 2) is model
    assert model[1] is model[2] is shared and isinstance(shared, SplitBatchNorm)
    assert shared.num_splits == 2
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    model(torch.randn(4, 3, 2, 2)).pow(3).sum().backward()
    before = shared.weight.detach().clone()
    optimizer.step()  # the optimizer built before the conversion trains the converted model
    assert not torch.equal(shared.weight, before)
    alone = nn.BatchNorm1d(3)
    assert convert_split_batchnorm(alone, 3) is alone and isinstance(alone, SplitBatchNorm)


class BatchNormPlusOne(nn.BatchNorm2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + 1  # behaviour a conversion would silently drop


def test_subclasses_with_their_own_behaviour_are_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), BatchNormPlusOne(4))
    with pytest.raises(
        TypeError, match=r"not other BatchNorms or subclasses.*\['2 \(BatchNormPlusOne\)'\]"
    ):
        convert_split_batchnorm(model, 2)
    assert type(model[1]) is nn.BatchNorm2d  # nothing was converted
    norm = nn.BatchNorm2d(4)
    torch.nn.utils.parametrize.register_parametrization(norm, "weight", nn.Identity())
    with pytest.raises(TypeError, match=r"model \(ParametrizedBatchNorm2d\)"):
        convert_split_batchnorm(norm, 2)


def test_other_batchnorms_are_refused_not_left_unsplit() -> None:
    """SyncBatchNorm (one process: plain batch statistics) and a lazy BatchNorm were left
    as they were: the model trained with whole-batch statistics, no split, no error."""
    for other in (nn.SyncBatchNorm(4), nn.LazyBatchNorm2d()):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), other, nn.BatchNorm2d(4))
        with pytest.raises(TypeError, match=rf"\['1 \({type(other).__name__}\)'\]"):
            convert_split_batchnorm(model, 2)
        assert type(model[2]) is nn.BatchNorm2d  # nothing was converted
    split = convert_split_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), 2)
    assert convert_split_batchnorm(split, 4) is split  # SplitBatchNorm itself is fine


def test_a_second_conversion_sets_the_new_number_of_splits() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    assert convert_split_batchnorm(model, 2) is model
    assert convert_split_batchnorm(model, 4) is model
    assert cast(SplitBatchNorm, model[0]).num_splits == 4


def test_single_device_shuffle_bn() -> None:
    """batch_shuffle + SplitBatchNorm: per-sample outputs depend on who shares the split."""
    torch.manual_seed(0)
    net = convert_split_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 4)
    x = torch.randn(16, 3, 5, 5)
    plain = net(x)
    shuffled, idx = batch_shuffle(x)
    out = batch_unshuffle(net(shuffled), idx)
    assert out.shape == plain.shape
    assert not torch.allclose(out, plain)  # different sub-batches, different statistics
    net.eval()
    torch.testing.assert_close(batch_unshuffle(net(shuffled), idx), net(x))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"divisible by num_splits=3, got 10 rows.*drop_last"):
        SplitBatchNorm(4, 3)(torch.randn(10, 4, 2, 2))
    # one value per channel in a sub-batch: nn.BatchNorm's error showed the reshaped (1, S * C)
    for shape in ((4, 3), (8, 512, 1, 1)):
        with pytest.raises(ValueError, match=r"num_splits=\d sub-batches must hold more than one"):
            SplitBatchNorm(shape[1], shape[0])(torch.randn(shape))
    SplitBatchNorm(3, 4)(torch.randn(4, 3, 1, 2))  # two values per channel: normalised
    with pytest.raises(ValueError, match=r"num_splits must be >= 1, got 0"):
        convert_split_batchnorm(nn.BatchNorm2d(3), 0)
    with pytest.raises(ValueError, match=r"\(N, C, \*\), got shape \(4,\)"):
        SplitBatchNorm(4, 2)(torch.randn(4))


@pytest.mark.parametrize("shape", [(12, 5, 4, 3), (12, 5), (12, 5, 7), (8, 3, 2, 2, 2)])
def test_output_and_gradient_bit_identical_to_a_batchnorm_per_split(
    shape: tuple[int, ...],
) -> None:
    """In float32 too, exactly what separate BatchNorms give, gradients included; a
    channels_last input stays channels_last (a copy to another layout cost the query
    encoder's training pass about a fifth on the CPU)."""
    torch.manual_seed(1)
    bn = SplitBatchNorm(shape[1], 4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    parts = [kind[len(shape)](shape[1]) for _ in range(4)]
    for part in parts:
        part.load_state_dict(bn.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    y = bn(x)
    want = torch.cat([part(c) for part, c in zip(parts, x.chunk(4), strict=True)])
    assert torch.equal(y, want)
    g = torch.randn(*shape)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x, g)[0])
    if len(shape) == 4:
        last = x.detach().contiguous(memory_format=torch.channels_last)
        assert bn(last).is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(bn(last), bn(x.detach()))  # another kernel: not bit for bit


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: C++ on the CPU
def test_compiles_to_one_graph_and_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(2)
    eager = SplitBatchNorm(6, 3)
    compiled_bn = copy.deepcopy(eager)
    compiled = torch.compile(compiled_bn, fullgraph=True, backend=backend)
    for _ in range(2):
        x = torch.randn(9, 6, 4, 4, requires_grad=True)
        y, want = compiled(x), eager(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(want)
        got_grad, want_grad = (torch.autograd.grad(out, x, g)[0] for out in (y, want))
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_bn.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_bn.running_var, eager.running_var)
