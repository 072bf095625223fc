"""Every Python block of README.md runs as written, each on its own (a reader pastes one
block into a fresh interpreter): its own imports, its own data, the device chosen at run
time. Each block's result is then checked, not only that it ran."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def readme_python_blocks() -> list[str]:
    return [m.group(2) for m in FENCE.finditer(README.read_text()) if m.group(1) == "python"]


BLOCKS = readme_python_blocks()


def _check_drop_in(ns: dict[str, object]) -> None:
    """The MoCo v2 loop: a finite loss, (N, 128) keys, a full queue whose newest keys are
    the last batch's, a key encoder that moved, Shuffle-BN on one device."""
    from momentum_contrast import KeyQueue, MomentumEncoder
    from momentum_contrast.norm import SplitBatchNorm

    loss, k, queue, key_encoder, model = (
        ns[n] for n in ("loss", "k", "queue", "key_encoder", "model")
    )
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and math.isfinite(loss.item())
    assert loss.item() > 0
    assert isinstance(k, torch.Tensor) and k.shape == (32, 128) and not k.requires_grad
    assert isinstance(queue, KeyQueue) and len(queue) == 4096
    newest = queue.negatives().float() @ torch.nn.functional.normalize(k.float(), dim=1).T
    assert torch.allclose(newest.max(dim=0).values, torch.ones(32, device=k.device), atol=1e-5)
    assert isinstance(key_encoder, MomentumEncoder) and isinstance(model, torch.nn.Module)
    for encoder in (model, key_encoder.key_encoder):  # both normalise per 1/8, as 8 GPUs
        norms = [m for m in encoder.modules() if isinstance(m, _BatchNorm)]
        assert norms and all(isinstance(m, SplitBatchNorm) and m.num_splits == 8 for m in norms)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(model.parameters(), key_encoder.key_encoder.parameters(), strict=True)
    ]
    assert any(moved)  # the optimizer stepped and the key encoder lags behind


def _check_augment(ns: dict[str, object]) -> None:
    """Two views of the 8 images, at the block's size, finite, on the chosen device."""
    one, two, device = ns["view_1"], ns["view_2"], ns["device"]
    assert isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor)
    assert one.shape == two.shape == (8, 3, 96, 96)
    assert one.device.type == two.device.type == device
    assert torch.isfinite(one).all() and torch.isfinite(two).all()
    assert not torch.equal(one, two)  # two random views, not one twice


# a block is recognised by a name it defines; each must be checked by one of these
CHECKS: dict[str, Callable[[dict[str, object]], None]] = {
    "queue": _check_drop_in,
    "augment": _check_augment,
}


def test_readme_has_the_drop_in_and_augmentation_blocks() -> None:
    assert len(BLOCKS) >= 2, BLOCKS
    assert "info_nce" in BLOCKS[0] and "MoCoV2Augment" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_block_runs_as_written(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = BLOCKS[index]
    # runs on a CPU and on a GPU: the device is chosen at run time, never hard-coded
    assert ".cuda(" not in code and '"cuda")' not in code, code
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"readme_block{index}"}  # a fresh interpreter
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    checks = [check for name, check in CHECKS.items() if name in namespace]
    assert len(checks) == 1, f"README block {index}: give it a check in {__file__}"
    checks[0](namespace)
    assert list(tmp_path.iterdir()) == []  # nothing written into the reader's folder


def _github_slug(heading: str) -> str:
    """The anchor GitHub (and mkdocs' default toc) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_into_the_docs_resolve() -> None:
    """Every ``docs/...md#anchor`` link of README.md names a page and one of its headings."""
    links = re.findall(r"\]\((docs/[\w/.-]+\.md)(?:#([\w-]+))?\)", README.read_text())
    assert any(anchor for _, anchor in links)
    for path, anchor in links:
        page = ROOT / path
        assert page.is_file(), path
        if anchor:
            headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
            assert anchor in {_github_slug(h) for h in headings}, (path, anchor)
