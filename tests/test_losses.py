"""Losses against the papers' equations, written out independently of the library."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import no_host_sync

from momentum_contrast import InfoNCE, SymmetricContrastiveLoss, info_nce
from momentum_contrast import symmetric_contrastive_loss as sym_loss

f64 = torch.float64


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True))


def reference_moco_loss(q, k, queue, t):  # type: ignore[no-untyped-def]
    """MoCo v1 Algorithm 1: l_pos = q·k, l_neg = q·queue, cat, /T, cross-entropy to 0."""
    q, k = unit(q), unit(k)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
    l_neg = torch.einsum("nc,kc->nk", q, queue)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / t
    per_row = -logits[:, 0] + torch.log(torch.exp(logits).sum(dim=1))
    return per_row


def reference_ctr(q, k, t):  # type: ignore[no-untyped-def]
    """MoCo v3 ctr: -log softmax of the matching key among all keys, times 2T."""
    logits = unit(q) @ unit(k).T / t  # (N, N)
    log_prob = logits.diagonal() - torch.log(torch.exp(logits).sum(dim=1))
    return -log_prob.mean() * 2 * t


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_with_queue_matches_reference(t: float) -> None:
    torch.manual_seed(0)
    q = torch.randn(8, 16, dtype=f64, requires_grad=True)
    k = torch.randn(8, 16, dtype=f64)
    queue = unit(torch.randn(40, 16, dtype=f64))
    loss = info_nce(q, k, queue, temperature=t)
    (grad,) = torch.autograd.grad(loss, q)
    q_ref = q.detach().clone().requires_grad_()
    ref = reference_moco_loss(q_ref, k, queue, t).mean()
    (grad_ref,) = torch.autograd.grad(ref, q_ref)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 4097])
def test_info_nce_any_queue_length_matches_reference_with_weighted_rows(m: int) -> None:
    # the queue path pads rows to a multiple of four: every remainder, weighted per row
    torch.manual_seed(m)
    q = torch.randn(7, 12, dtype=f64, requires_grad=True)
    k = torch.randn(7, 12, dtype=f64)
    queue = unit(torch.randn(m, 12, dtype=f64))
    weights = torch.rand(7, dtype=f64)
    loss = (info_nce(q, k, queue, temperature=0.1, reduction="none") * weights).sum()
    (grad,) = torch.autograd.grad(loss, q)
    q_ref = q.detach().clone().requires_grad_()
    ref = (reference_moco_loss(q_ref, k, queue, 0.1) * weights).sum()
    (grad_ref,) = torch.autograd.grad(ref, q_ref)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10)


def test_info_nce_gradcheck_and_repeated_backward() -> None:
    torch.manual_seed(3)
    q = torch.randn(4, 6, dtype=f64, requires_grad=True)
    k, queue = torch.randn(4, 6, dtype=f64), unit(torch.randn(9, 6, dtype=f64))
    assert torch.autograd.gradcheck(lambda x: info_nce(x, k, queue, temperature=0.5), (q,))
    loss = info_nce(q, k, queue, temperature=0.5)
    (first,) = torch.autograd.grad(loss, q, retain_graph=True)
    (second,) = torch.autograd.grad(loss, q)  # the saved tensors were not modified
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert torch.autograd.gradgradcheck(lambda x: info_nce(x, k, queue, temperature=0.5), (q,))


def test_info_nce_reductions() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(6, 8, dtype=f64), torch.randn(6, 8, dtype=f64)
    queue = unit(torch.randn(20, 8, dtype=f64))
    per_row = reference_moco_loss(q, k, queue, 0.2)
    none = info_nce(q, k, queue, temperature=0.2, reduction="none")
    assert none.shape == (6,)
    torch.testing.assert_close(none, per_row, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        info_nce(q, k, queue, temperature=0.2, reduction="sum"), per_row.sum(), rtol=0, atol=1e-10
    )


def test_info_nce_in_batch_negatives() -> None:
    torch.manual_seed(2)
    q = torch.randn(10, 8, dtype=f64, requires_grad=True)
    k = torch.randn(10, 8, dtype=f64)
    loss = info_nce(q, k, temperature=0.5, reduction="none")
    logits = unit(q) @ unit(k).T / 0.5
    expected = -(logits.diagonal() - torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(loss.sum(), q)
    (g_ref,) = torch.autograd.grad(expected.sum(), q)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_info_nce_without_normalisation_uses_raw_dot_products() -> None:
    q, k = torch.randn(4, 3, dtype=f64), torch.randn(4, 3, dtype=f64)
    neg = unit(torch.randn(5, 3, dtype=f64))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ neg.T], dim=1) / 0.1
    expected = -torch.log_softmax(logits, dim=1)[:, 0]
    got = info_nce(q, k, neg, temperature=0.1, normalize=False, reduction="none")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_uniform_scores_give_log_k_plus_one() -> None:
    # a query orthogonal to its key and to every negative scores 0 everywhere
    q = torch.tensor([[1.0, 0.0, 0.0]])
    k = torch.tensor([[0.0, 1.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0, 1.0]]).repeat(99, 1)
    assert info_nce(q, k, neg).item() == pytest.approx(math.log(100), rel=1e-6)


def test_symmetric_loss_matches_reference() -> None:
    torch.manual_seed(3)
    q1, q2 = (torch.randn(12, 8, dtype=f64, requires_grad=True) for _ in range(2))
    k1, k2 = (torch.randn(12, 8, dtype=f64) for _ in range(2))
    for t in (0.2, 1.0):
        loss = sym_loss(q1, q2, k1, k2, temperature=t)
        grads = torch.autograd.grad(loss, (q1, q2))
        ref = reference_ctr(q1, k2, t) + reference_ctr(q2, k1, t)
        grads_ref = torch.autograd.grad(ref, (q1, q2))
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_no_gradient_reaches_keys_or_negatives() -> None:
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    neg = unit(torch.randn(16, 8)).requires_grad_()
    info_nce(q, k, neg).backward()
    info_nce(q, k).backward()
    assert q.grad is not None and k.grad is None and neg.grad is None
    q2, k2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    sym_loss(q, q2, k, k2).backward()
    assert q2.grad is not None and k.grad is None and k2.grad is None


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32(amp_dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    proj = torch.nn.Linear(32, 64)
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    queue = unit(torch.randn(512, 64))
    with torch.autocast("cpu", dtype=amp_dtype):
        q, k = proj(x), proj(y)
        assert q.dtype == amp_dtype  # the encoder output really is low precision
        loss = info_nce(q, k, queue, temperature=0.01)
        loss_batch = info_nce(q, k, temperature=0.01)
        loss_sym = sym_loss(q, k, k, q, temperature=0.01)
    for value in (loss, loss_batch, loss_sym):
        assert value.dtype == torch.float32 and torch.isfinite(value)
    # identical to upcasting the same low-precision outputs outside autocast
    torch.testing.assert_close(
        loss, info_nce(q.float(), k.float(), queue, temperature=0.01), rtol=0, atol=0
    )
    loss.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


def test_modules_equal_functions() -> None:
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    neg = unit(torch.randn(9, 8))
    crit = InfoNCE(temperature=0.2, reduction="sum")
    assert torch.equal(crit(q, k, neg), info_nce(q, k, neg, temperature=0.2, reduction="sum"))
    assert InfoNCE().temperature == 0.07 and "0.07" in repr(InfoNCE())
    sym = SymmetricContrastiveLoss(temperature=0.3)
    assert torch.equal(sym(q, k, k, q), sym_loss(q, k, k, q, temperature=0.3))
    assert SymmetricContrastiveLoss().temperature == 1.0


def test_loss_modules_take_keyword_arguments_only() -> None:
    """``InfoNCE(0.2, "mean", False)`` was accepted: every argument is keyword-only, as
    in the functions (``positive_offset`` of ``SymmetricContrastiveLoss``'s call too)."""
    with pytest.raises(TypeError, match="positional argument"):
        InfoNCE(0.2, "mean", False)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional argument"):
        InfoNCE(0.2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional argument"):
        SymmetricContrastiveLoss(0.2, False)  # type: ignore[call-arg]
    crit = InfoNCE(temperature=0.5, reduction="none", normalize=False)
    assert (crit.temperature, crit.reduction, crit.normalize) == (0.5, "none", False)
    sym = SymmetricContrastiveLoss(temperature=0.2, gather=False)
    assert (sym.temperature, sym.gather) == (0.2, False)
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(TypeError, match="positional argument"):  # as the function's
        sym(q, q, k, k, 0)  # type: ignore[misc]
    assert torch.equal(
        sym(q, q, k, k, positive_offset=2),
        sym_loss(q, q, k, k, positive_offset=2, temperature=0.2, gather=False),
    )


def test_losses_do_not_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(8, 16, requires_grad=True)
    k, neg = torch.randn(8, 16), unit(torch.randn(64, 16))
    with no_host_sync(monkeypatch):
        (info_nce(q, k, neg) + info_nce(q, k) + sym_loss(q, q, k, k)).backward()


def test_info_nce_computes_in_float64_if_any_input_is() -> None:
    """The docs said float64 for float64 inputs, but only the query's dtype counted: float64
    keys and queue with a float32 query were computed in float32."""
    torch.manual_seed(0)
    q = torch.randn(6, 16, dtype=f64)
    k, queue = torch.randn(6, 16, dtype=f64), unit(torch.randn(50, 16, dtype=f64))
    want = reference_moco_loss(q.float().double(), k, queue, 0.07)  # the float32 query, exactly
    for negatives in (queue, None):
        got = info_nce(q.float(), k, negatives, reduction="none")
        assert got.dtype == f64
        if negatives is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = info_nce(q, k.float(), queue.float())  # the query float64: as before
    assert got.dtype == f64


# torch.func's first use scripts a helper of torch's own (a FutureWarning of torch 2.14)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_info_nce_with_a_queue_runs_under_torch_func_and_forward_mode_ad() -> None:
    # torch.func.grad (a functional_call loop), vmap (per-sample losses) and forward-mode AD
    # of the queue loss: the values of MoCo's cat + cross-entropy, computed by hand
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad, jvp, vmap

    torch.manual_seed(0)
    q, k = torch.randn(5, 8, dtype=f64), torch.randn(5, 8, dtype=f64)
    queue = unit(torch.randn(13, 8, dtype=f64))
    tangent = torch.randn(5, 8, dtype=f64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return info_nce(x, k, queue, temperature=0.2)

    q_ref = q.clone().requires_grad_()
    ref = reference_moco_loss(q_ref, k, queue, 0.2).mean()
    (grad_ref,) = torch.autograd.grad(ref, q_ref)
    torch.testing.assert_close(grad(loss)(q), grad_ref, rtol=0, atol=1e-10)
    value, directional = jvp(loss, (q,), (tangent,))[:2]
    torch.testing.assert_close(value, ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(directional, (grad_ref * tangent).sum(), rtol=0, atol=1e-10)
    with fwAD.dual_level():
        dual = info_nce(fwAD.make_dual(q, tangent), k, queue, temperature=0.2)
        forward_grad = fwAD.unpack_dual(dual).tangent
    torch.testing.assert_close(forward_grad, (grad_ref * tangent).sum(), rtol=0, atol=1e-10)
    per_sample = vmap(lambda a, b: info_nce(a[None], b[None], queue, temperature=0.2))(q, k)
    expected = reference_moco_loss(q, k, queue, 0.2)  # (N,)
    torch.testing.assert_close(per_sample, expected, rtol=0, atol=1e-10)
    # a transform over something else, the loss's inputs plain tensors
    scale = torch.tensor(3.0, dtype=f64)
    torch.testing.assert_close(grad(lambda s: s * loss(q))(scale), ref.detach())
    scaled = vmap(lambda s: s * loss(q))(torch.arange(3.0, dtype=f64))
    torch.testing.assert_close(scaled, torch.arange(3.0, dtype=f64) * ref.detach())
