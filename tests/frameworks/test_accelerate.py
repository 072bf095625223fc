"""docs/guides/accelerate.md: its code, run with Accelerate, equals the plain loop.

The container classes and step functions are the page's own (executed from the page by
``_accelerate_guide.guide()``); the plain loops are written independently. One process
here; ``test_two_processes`` launches ``_accelerate_worker.py`` on 2 gloo processes.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, cosine_momentum

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_accelerate_guide", HERE / "_accelerate_guide.py")
assert _spec is not None and _spec.loader is not None
g = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(g)

T = 0.2


class GuideMoCoV2(Protocol):
    """What the tests use of the page's ``MoCoV2`` (an ``nn.Module`` defined by running
    the page, so it has no static type of its own)."""

    online: nn.Module
    key_encoder: MomentumEncoder
    queue: KeyQueue


class GuideMoCoV3(Protocol):
    """What the tests use of the page's ``MoCoV3``."""

    base: nn.Module
    predictor: nn.Module
    key_encoder: MomentumEncoder


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """Each test gets its own Accelerator state (mixed precision, accumulation steps)."""
    g.reset_accelerate()
    yield
    g.reset_accelerate()


def v2_pair(dtype: torch.dtype, momentum: float = 0.9) -> tuple[GuideMoCoV2, nn.Module, dict]:
    """The guide's container and an independent copy of its initial online model and queue."""
    guide = g.guide()
    online = g.ln_model().to(dtype)
    moco = guide["MoCoV2"](copy.deepcopy(online), dim=16, queue_size=24, momentum=momentum)
    moco.to(dtype)
    return moco, online, copy.deepcopy(moco.queue.state_dict())


def run_v2(accelerator: Accelerator, moco: GuideMoCoV2, data: list, micro: int) -> None:
    guide = g.guide()
    model, optimizer = accelerator.prepare(moco, g.sgd(moco.online.parameters()))
    window: list[torch.Tensor] = []
    for x_q, x_k in data:
        for rows_q, rows_k in zip(x_q.chunk(micro), x_k.chunk(micro), strict=True):
            guide["train_step"](accelerator, model, optimizer, rows_q, rows_k, window)
    assert window == []


def v3_pair(dtype: torch.dtype) -> tuple[GuideMoCoV3, nn.Module, nn.Module]:
    guide = g.guide()
    base = g.ln_model().to(dtype)
    torch.manual_seed(1)
    predictor = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 16))
    predictor = predictor.to(dtype)
    moco = guide["MoCoV3"](copy.deepcopy(base), copy.deepcopy(predictor), temperature=T)
    return moco, base, predictor


def run_v3(accelerator: Accelerator, moco: GuideMoCoV3, data: list, micro: int) -> None:
    guide = g.guide()
    optimizer = g.sgd([*moco.base.parameters(), *moco.predictor.parameters()])
    model, optimizer = accelerator.prepare(moco, optimizer)
    for step, (x1, x2) in enumerate(data):
        m = cosine_momentum(step, len(data))
        guide["train_step_v3"](accelerator, model, optimizer, x1, x2, m, micro_batches=micro)


def test_v2_one_process_equals_the_plain_loop_bit_for_bit() -> None:
    moco, online, queue_state = v2_pair(torch.float32)
    data = g.batches(3, 8)
    run_v2(Accelerator(), moco, data, micro=1)
    plain_online, plain_key, plain_queue = g.plain_v2(online, queue_state, data, 0.9, T)
    assert not g.equal(moco.online, g.ln_model())  # it trained
    assert g.equal(moco.online, plain_online)
    assert g.equal(moco.key_encoder, plain_key)
    assert g.equal(moco.queue, plain_queue)
    assert int(moco.queue.ptr) == 3 * 8 % 24


def test_v3_one_process_equals_the_plain_loop_bit_for_bit() -> None:
    moco, base, predictor = v3_pair(torch.float32)
    data = g.batches(3, 8)
    run_v3(Accelerator(), moco, data, micro=1)
    plain_base, plain_predictor, plain_key = g.plain_v3(base, predictor, data, T)
    assert not g.equal(moco.key_encoder.key_encoder, g.ln_model())
    assert g.equal(moco.base, plain_base)
    assert g.equal(moco.predictor, plain_predictor)
    assert g.equal(moco.key_encoder, plain_key)


def test_v2_accumulation_equals_the_full_batch() -> None:
    """gradient_accumulation_steps=2, two micro-batches of 4 per step: the step on 8."""
    moco, online, queue_state = v2_pair(torch.float64)
    data = g.batches(3, 8, dtype=torch.float64)
    run_v2(Accelerator(gradient_accumulation_steps=2), moco, data, micro=2)
    plain_online, plain_key, plain_queue = g.plain_v2(online, queue_state, data, 0.9, T)
    assert g.max_diff(moco.online, plain_online) < 1e-12
    assert g.max_diff(moco.key_encoder, plain_key) < 1e-12
    assert g.max_diff(moco.queue, plain_queue) < 1e-12  # keys in the full batch's order
    assert torch.equal(moco.queue.ptr, plain_queue.ptr)
    assert g.max_diff(moco.online, g.ln_model().double()) > 1e-3  # it trained


def test_v3_micro_batches_with_no_sync_equal_the_full_batch() -> None:
    moco, base, predictor = v3_pair(torch.float64)
    data = g.batches(3, 8, dtype=torch.float64)
    run_v3(Accelerator(), moco, data, micro=2)
    plain_base, plain_predictor, plain_key = g.plain_v3(base, predictor, data, T)
    assert g.max_diff(moco.base, plain_base) < 1e-12
    assert g.max_diff(moco.predictor, plain_predictor) < 1e-12
    assert g.max_diff(moco.key_encoder, plain_key) < 1e-12
    assert g.max_diff(moco.base, g.ln_model().double()) > 1e-3


def test_update_outside_sync_gradients_warns_and_the_guide_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = [(x_q[:4], x_k[:4]) for x_q, x_k in g.batches(6, 8)]  # 6 micro-batches: 3 windows

    # wrong: update and push at every micro-batch
    moco, _, _ = v2_pair(torch.float32)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(moco, g.sgd(moco.online.parameters()))
    with pytest.warns(RuntimeWarning, match="ran again with the online model unchanged"):
        for x_q, x_k in data:
            with accelerator.accumulate(model):
                loss, k = model(x_q, x_k)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                moco.key_encoder.update()
                moco.queue.push(k)

    # the guide's train_step: one update and one push per optimizer step, no warning
    moco, _, _ = v2_pair(torch.float32)
    updates = []
    update = moco.key_encoder.update

    def counted(*a: Any) -> None:  # count them
        updates.append(1)
        update(*a)

    monkeypatch.setattr(moco.key_encoder, "update", counted)
    model, optimizer = accelerator.prepare(moco, g.sgd(moco.online.parameters()))
    window: list[torch.Tensor] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for x_q, x_k in data[:4]:  # 2 windows
            g.guide()["train_step"](accelerator, model, optimizer, x_q, x_k, window)
    assert len(updates) == 2
    assert int(moco.queue.ptr) == 16 % 24  # two pushes of a window's 8 keys


def _record_dtype(module: nn.Module, seen: list[torch.dtype]) -> None:
    module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))


def test_bf16_keys_are_computed_under_autocast_in_the_guides_order() -> None:
    """mixed_precision="bf16" on the CPU: the key encoder, built before prepare() in the
    container, computes in bfloat16, as an explicit torch.autocast would; called outside
    the prepared forward and outside accelerator.autocast() it would compute in float32."""
    guide = g.guide()
    accelerator = Accelerator(mixed_precision="bf16")
    x_q, x_k = g.batches(1, 8)[0]

    moco, _, _ = v2_pair(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = copy.deepcopy(moco.key_encoder.key_encoder)(x_k)
    assert expected.dtype == torch.bfloat16
    seen: list[torch.dtype] = []
    _record_dtype(moco.key_encoder.key_encoder, seen)
    model, _ = accelerator.prepare(moco, g.sgd(moco.online.parameters()))
    _, k = model(x_q, x_k)  # the container's forward, as train_step calls it
    assert seen == [torch.bfloat16]
    assert k.dtype == torch.float32  # Accelerate converts the outputs of the forward
    assert torch.equal(k, expected.float())
    assert moco.key_encoder(x_k).dtype == torch.float32  # outside the prepared forward

    moco3, _, _ = v3_pair(torch.float32)
    seen.clear()
    _record_dtype(moco3.key_encoder.key_encoder, seen)
    optimizer3 = g.sgd([*moco3.base.parameters(), *moco3.predictor.parameters()])
    model3, optimizer3 = accelerator.prepare(moco3, optimizer3)
    guide["train_step_v3"](accelerator, model3, optimizer3, x_q, x_k, 0.99)
    assert seen == [torch.bfloat16, torch.bfloat16]  # both views' keys, under autocast
    assert moco3.key_encoder(x_q).dtype == torch.float32  # without accelerator.autocast()

    # the other order: a model prepared alone, its MomentumEncoder built after prepare(),
    # copies the autocast-patched forward: its keys then depend on the order of two lines
    prepared = accelerator.prepare(g.ln_model())
    late = MomentumEncoder(prepared)
    assert "forward" in vars(late.key_encoder)  # Accelerate's patch, deep-copied
    seen.clear()
    _record_dtype(cast(nn.Sequential, late.key_encoder)[3], seen)
    assert late(x_q).dtype == torch.float32 and seen == [torch.bfloat16]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _guide_cpu_launch() -> list[str]:
    """The guide's line for 2 CPU processes, ``torchrun --nproc-per-node 2 train.py`` (with
    ``Accelerator(cpu=True)``, as the worker builds it), up to the script: the line a user
    runs is the one tested. torchrun is run as this interpreter's module."""
    page = (HERE.parents[1] / "docs" / "guides" / "accelerate.md").read_text()
    line = re.search(r"^`(torchrun --nproc-per-node 2 train\.py)`$", page, re.M)
    assert line is not None, "docs/guides/accelerate.md: the CPU launch line is gone"
    argv = shlex.split(line.group(1))
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:-1]]


def test_two_processes(tmp_path: Path) -> None:
    """One launch of 2 gloo processes checks: equality with one process that sees the
    whole batch (v2 and v3, float64), the same queue on every rank, DDP leaving the queue
    alone, and save_checkpoint/load_checkpoint resuming exactly on both ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    argv = [*_guide_cpu_launch(), "--master_port", str(_free_port())]
    argv += [str(HERE / "_accelerate_worker.py"), str(tmp_path)]
    with (tmp_path / "launch.log").open("w") as log:
        launch = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            launch.wait(timeout=240)  # a hung worker ends itself after 150 s (faulthandler)
        except subprocess.TimeoutExpired:  # torchrun starts its workers in their own sessions
            for pid in [launch.pid, *(int(f.read_text()) for f in tmp_path.glob("pid*"))]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launch.wait()
    output = (tmp_path / "launch.log").read_text()[-8000:]
    assert launch.returncode == 0, output
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["world_size"] == 2 and res["ddp_wrapped"], res
        # equal to one process with the whole batch (float64)
        assert res["v2_max_diff"] < 1e-10, (rank, res)
        assert res["v3_max_diff"] < 1e-10, (rank, res)
        assert res["v2_trained"] > 1e-3 and res["v3_trained"] > 1e-3, (rank, res)
        assert res["queues_equal_across_ranks"], (rank, res)
        # exclude_from_ddp: the names reach DDP, and a forward leaves rank 1's queue alone
        assert res["ddp_ignores_queue"], (rank, res)
        assert res["sentinel_kept_with_exclude"], (rank, res)
        assert res["sentinel_overwritten_without_exclude"], (rank, res)  # the control
        # resume equals the uninterrupted run, key-encoder BatchNorm statistics included,
        # with the guide's shuffled, seedable loader
        assert res["resume_equal"], (rank, res)
        assert res["resume_first_epoch"] == 1, (rank, res)
        assert res["resume_key_buffers_equal"], (rank, res)
    # the statistics are per rank, and save_state alone gives rank 1 rank 0's
    assert results[1]["key_bn_differs_from_rank0"]
    assert not results[1]["key_buffers_restored_by_load_state_alone"]


def test_the_guides_loader_is_seedable_and_told_its_epoch() -> None:
    # what makes resume exact with shuffle=True (test_two_processes checks the result)
    page = g.GUIDE.read_text()
    assert "DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0)" in page
    assert page.count("    loader.set_epoch(epoch)  # ") == 2  # the first loop and train_epochs


def test_timm_and_hugging_face_backbones_train_in_the_guides_container() -> None:
    """strip_classifier of a timm model and of a transformers ViT (a ModelOutput model)
    gives (N, C) features that the guide's MoCoV3 and train_step_v3 train with."""
    import timm
    import transformers

    from momentum_contrast import moco_v3_predictor, moco_v3_projector, strip_classifier

    guide = g.guide()
    accelerator = Accelerator()
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32,
    )  # fmt: skip
    backbones = [
        strip_classifier(transformers.ViTForImageClassification(config)),
        strip_classifier(
            timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1)
        ),
    ]
    x1, x2 = torch.rand(2, 4, 3, 16, 16)
    for backbone, features in backbones:
        base = nn.Sequential(backbone, moco_v3_projector(features, hidden_dim=32, out_dim=8))
        moco = guide["MoCoV3"](base, moco_v3_predictor(8, hidden_dim=32))
        before = copy.deepcopy(moco.key_encoder.state_dict())
        optimizer = g.sgd([*moco.base.parameters(), *moco.predictor.parameters()])
        model, optimizer = accelerator.prepare(moco, optimizer)
        loss = guide["train_step_v3"](accelerator, model, optimizer, x1, x2, 0.9)
        assert loss.shape == () and torch.isfinite(loss)
        assert backbone(x1).shape == (4, features)
        assert moco.key_encoder(x1).shape == (4, 8)
        assert g.max_diff(moco.key_encoder.state_dict(), before) > 0  # it moved
