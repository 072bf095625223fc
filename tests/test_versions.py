"""The torch version checks of the features that need a newer torch than the oldest
supported: one line that names the version needed and the one found."""

from __future__ import annotations

import pytest
import torch

from momentum_contrast import _versions
from momentum_contrast._versions import require_torch, torch_at_least, torch_version


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.6.0", (2, 6)), ("2.5.1+cu121", (2, 5)), ("2.10.0a0+git1234", (2, 10)), ("dev", (999, 0))],
)
def test_torch_version_reads_major_and_minor(
    monkeypatch: pytest.MonkeyPatch, version: str, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_version() == expected


def test_an_older_torch_raises_one_line_naming_both_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    assert torch_at_least("2.5") and not torch_at_least("2.6")
    with pytest.raises(RuntimeError) as caught:
        require_torch("2.6", "FSDP2 (fully_shard)")
    assert str(caught.value) == "FSDP2 (fully_shard) needs torch>=2.6, found 2.5.1"


def test_the_same_or_a_newer_torch_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("2.6.0", "2.10.1", "3.0.0"):
        monkeypatch.setattr(torch, "__version__", version)
        require_torch("2.6", "FSDP2 (fully_shard)")


def test_the_installed_torch_is_read() -> None:
    assert _versions.torch_version() == tuple(int(p) for p in torch.__version__.split(".")[:2])
