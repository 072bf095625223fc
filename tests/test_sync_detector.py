"""The CPU host-sync detector used by the other tests really catches synchronisation."""

from __future__ import annotations

import pytest
import torch
from conftest import no_host_sync


@pytest.mark.parametrize(
    "sync",
    [
        lambda t: t.item(),
        lambda t: int(t),
        lambda t: float(t),
        lambda t: bool(t > 0),
        lambda t: t.tolist(),
        lambda t: t.cpu(),
        lambda t: torch.equal(t, t),
    ],
)
def test_detector_catches_host_reads(monkeypatch: pytest.MonkeyPatch, sync) -> None:  # type: ignore[no-untyped-def]
    t = torch.tensor(1.5)
    with (
        pytest.raises(AssertionError, match="host-device synchronisation"),
        no_host_sync(monkeypatch),
    ):
        sync(t)


def test_detector_allows_device_work(monkeypatch: pytest.MonkeyPatch) -> None:
    with no_host_sync(monkeypatch) as rec:
        t = torch.randn(3)
        t.mul_(2).add_(1)
    assert "mul_" in rec.ops and "add_" in rec.ops
