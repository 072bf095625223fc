"""LARS against a step written out by hand in float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from momentum_contrast.optim import LARS


def reference_lars_steps(params, grads_per_step, lr, wd, momentum, eta):  # type: ignore[no-untyped-def]
    """MoCo v3's LARS, written from its description, one parameter at a time."""
    params = [p.clone() for p in params]
    mus = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            d = g.clone()
            if p.dim() > 1:
                d = d + wd * p
                pn, dn = float(p.norm()), float(d.norm())
                q = eta * pn / dn if pn > 0 and dn > 0 else 1.0
                d = d * q
            mus[i] = momentum * mus[i] + d
            params[i] = p - lr * mus[i]
    return params


def test_matches_the_hand_written_reference_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6,), (3, 2, 2, 2), (5,), (4, 4)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    params[0].zero_()  # a zero matrix: ||p|| = 0 on the first step, trust ratio 1
    params[3].zero_()  # a zero 1-D parameter: no adaptation at all
    params[4].zero_()  # a zero matrix with a zero gradient: both norms 0, trust ratio 1
    steps = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(4)]
    steps[0][4].zero_()
    live = [p.clone().requires_grad_() for p in params]
    opt = LARS(live, lr=0.3, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.001)
    for i, grads in enumerate(steps):
        for p, grad in zip(live, grads, strict=True):
            p.grad = grad.clone()
        opt.step()
        if i == 0:  # the zero-norm branch: ratio 1 (0 or NaN without it)
            torch.testing.assert_close(live[0].detach(), -0.3 * steps[0][0], rtol=0, atol=0)
            assert torch.equal(live[4].detach(), torch.zeros(4, 4, dtype=torch.float64))
    expected = reference_lars_steps(params, steps, 0.3, 1e-2, 0.9, 0.001)
    for got, want in zip(live, expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)
    assert expected[0].abs().min() > 0  # the zero matrix moved (ratio 0 would leave it at 0)


def test_zero_weight_matrix_uses_ratio_one_and_1d_gets_no_decay() -> None:
    w = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = LARS([w, b], lr=1.0, weight_decay=0.5, momentum=0.0)
    w.grad = torch.ones(3, 3, dtype=torch.float64)
    b.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    assert torch.equal(w.detach(), -torch.ones(3, 3, dtype=torch.float64))  # ||p|| = 0: ratio 1
    assert torch.equal(b.detach(), torch.ones(3, dtype=torch.float64))  # no decay on 1-D


def test_float16_norms_above_its_range_still_scale() -> None:
    """The norms were taken in float16: a gradient norm above 65504 was inf, the ratio 0, and
    the matrix never moved."""
    g = torch.Generator().manual_seed(0)
    w64 = torch.randn(64, 64, generator=g, dtype=torch.float64)
    grad64 = 3000 * torch.randn(64, 64, generator=g, dtype=torch.float64)  # norm about 192,000
    w, grad = w64.half().requires_grad_(), grad64.half()
    opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = grad.clone()
    opt.step()
    exact = w64.half().double()
    expected = exact - 0.001 * exact.norm() / grad.double().norm() * grad.double()
    assert not torch.equal(w.detach(), exact.half())  # it moved
    torch.testing.assert_close(w.detach().double(), expected, rtol=2e-3, atol=2e-3)


def test_settings_after_lr_are_keyword_only() -> None:
    """``LARS(params, 0.1, 0.9)``, written as for SGD(params, lr, momentum), made 0.9 the
    weight decay."""
    with pytest.raises(TypeError, match="positional argument"):
        LARS([torch.zeros(2, 2, requires_grad=True)], 0.1, 0.9)  # type: ignore[misc]
    assert LARS([torch.zeros(2, 2, requires_grad=True)], 0.1).defaults["lr"] == 0.1


def test_defaults_and_bad_arguments() -> None:
    opt = LARS([torch.zeros(2, requires_grad=True)])
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["trust_coefficient"] == 0.001
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got -1"):
        LARS([torch.zeros(2, requires_grad=True)], weight_decay=-1)


SETTINGS = ["lr", "weight_decay", "momentum", "trust_coefficient"]


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -0.5])
def test_non_finite_or_negative_settings_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError) as info:
        LARS([torch.zeros(2, requires_grad=True)], **{name: value})
    assert str(info.value) == f"{name} must be a finite number >= 0, got {value}"


@pytest.mark.parametrize("name", SETTINGS)
def test_parameter_group_settings_are_checked_too(name: str) -> None:
    groups: list[dict[str, Any]] = [
        {"params": [torch.zeros(2, requires_grad=True)]},
        {"params": [torch.zeros(2, requires_grad=True)], name: float("nan")},
    ]
    with pytest.raises(ValueError, match=rf"param_groups\[1\] {name} must be a finite number"):
        LARS(groups, lr=0.1)
    opt = LARS(groups[:1], lr=0.1)
    with pytest.raises(ValueError, match=rf"param_groups\[1\] {name} .* got -inf"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], name: -math.inf})
    assert len(opt.param_groups) == 1  # the bad group was not added
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], name: 0.5})
    assert opt.param_groups[1][name] == 0.5


def test_settings_must_be_real_numbers() -> None:
    with pytest.raises(TypeError, match="momentum must be a real number, got str"):
        LARS([torch.zeros(2, requires_grad=True)], momentum="0.9")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"param_groups\[0\] lr must be a real number, got bool"):
        LARS([{"params": [torch.zeros(2, requires_grad=True)], "lr": True}])


@pytest.mark.parametrize("name", SETTINGS)
def test_loaded_settings_are_checked_before_anything_is_loaded(name: str) -> None:
    """A state dict's groups meet the constructor's rules: a NaN setting is refused, and so
    is an SGD state dict (no ``trust_coefficient``), before the optimizer changes."""
    p = torch.nn.Parameter(torch.randn(3, 3))
    saved = LARS([p], lr=0.1).state_dict()
    saved["param_groups"][0][name] = float("nan")
    opt = LARS([p], lr=0.2)
    with pytest.raises(ValueError, match=rf"state_dict param_groups\[0\] {name} must be a finite"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.2 and all(math.isfinite(v) for v in opt.defaults.values())
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no trust_coefficient: not a LARS"):
        opt.load_state_dict(sgd)

    def migrate(optimizer: Any, state_dict: dict[str, Any]) -> None:  # torch's way to migrate
        for group in state_dict["param_groups"]:
            group.setdefault("trust_coefficient", 0.002)

    handle = opt.register_load_state_dict_pre_hook(migrate)  # runs before the check
    opt.load_state_dict(sgd)
    assert opt.param_groups[0]["trust_coefficient"] == 0.002 and opt.param_groups[0]["lr"] == 0.1
    handle.remove()
    good = LARS([p], lr=0.3, weight_decay=1e-6).state_dict()
    opt.load_state_dict(good)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["weight_decay"] == 1e-6


def test_a_closure_is_evaluated_with_gradients_and_its_loss_returned() -> None:
    # as torch.optim's: step(closure) re-evaluates the loss (with autograd on, even when the
    # step itself runs without it), uses the gradients it leaves and returns the loss
    weight = torch.full((3, 2), 0.5, dtype=torch.float64, requires_grad=True)
    opt = LARS([weight], lr=0.1, weight_decay=0.0, momentum=0.0, trust_coefficient=1.0)
    x = torch.ones(4, 3, dtype=torch.float64)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (x @ weight).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)  # type: ignore[arg-type]  # torch types closures as -> float
    assert isinstance(loss, torch.Tensor) and loss.requires_grad  # made with autograd on
    assert float(loss.detach()) == 12.0  # 4 rows x 2 x (3 x 0.5)
    # gradient 4 everywhere; the trust ratio ||w|| / ||g|| = 0.5 / 4 scales it to 0.5
    torch.testing.assert_close(weight.detach(), torch.full((3, 2), 0.45, dtype=torch.float64))
