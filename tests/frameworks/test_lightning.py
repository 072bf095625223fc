"""docs/guides/lightning.md: its MoCo v2 and v3 LightningModules (executed from the page)
against plain loops written here, on 1 process and on 2 (DDP, gloo, CPU)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _lightning_guide import load
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from momentum_contrast import (
    KeyQueue,
    MomentumEncoder,
    cosine_momentum,
    info_nce,
    symmetric_contrastive_loss,
)

GUIDE = load("MoCoV2", "MoCoV3")
MoCoV2, MoCoV3 = GUIDE["MoCoV2"], GUIDE["MoCoV3"]
HERE = Path(__file__).resolve().parent
IN, DIM, QUEUE = 12, 8, 24  # input width, embedding width, queue size
KEY_BIAS = "0.encoder.layers.encoder_layer_0.self_attention.in_proj_bias"
UNCHANGED = "ran again with the online model unchanged"
# no logs, checkpoints, progress bars or summaries: the tests read the modules
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: no oversubscription
    yield
    torch.set_num_threads(threads)


def tiny(seed: int) -> nn.Module:
    """No BatchNorm: each sample's output is independent of its batch, so splitting a
    batch (accumulation, ranks, Shuffle-BN's permutation) changes nothing."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, DIM))


def tiny_vit(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(encoder, predictor) for the guide's ShardedMoCoV3: a one-block ViT on 16 x 16 images."""
    from torchvision.models.vision_transformer import VisionTransformer

    from momentum_contrast import strip_classifier

    torch.manual_seed(seed)
    vit, width = strip_classifier(VisionTransformer(16, 8, 1, 2, 16, 32))
    return nn.Sequential(vit, nn.Linear(width, DIM)), nn.Linear(DIM, DIM)


def views(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g), torch.randn(n, IN, generator=g)


def loader(data: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size)


def fit(module: Any, data: DataLoader, ckpt_path: str | None = None, **kwargs: Any) -> Any:
    trainer = L.Trainer(accelerator="cpu", devices=1, **QUIET, **kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def v2(seed: int = 0, **kwargs: Any) -> Any:
    return MoCoV2(tiny(seed), DIM, queue_size=QUEUE, momentum=0.9, lr=0.1, **kwargs)


def v3(seed: int = 0, **kwargs: Any) -> Any:
    torch.manual_seed(seed + 100)
    return MoCoV3(tiny(seed), nn.Linear(DIM, DIM), momentum=0.9, lr=0.01, **kwargs)


# ---- the plain loops, written independently of the guide ----


def plain_v2(start: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """MoCo v2 as in docs/guides/add-to-your-loop.md, from a copy of ``start``'s state."""
    online = copy.deepcopy(start.online)
    key = MomentumEncoder(online, momentum=0.9)
    queue = KeyQueue(QUEUE, DIM, dtype=start.queue.keys.dtype)
    queue.load_state_dict(start.queue.state_dict())
    opt = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for x_q, x_k in batches:
        k = key(x_k)
        loss = info_nce(online(x_q), k, queue.negatives(), temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        key.update()
        queue.push(k)
    return state(online, key, queue)


def plain_v3(start: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """MoCo v3 with the cosine momentum, one optimizer step per batch."""
    online, predictor = copy.deepcopy(start.online), copy.deepcopy(start.predictor)
    key = MomentumEncoder(online, momentum=0.9)
    params = [*online.parameters(), *predictor.parameters()]
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    for step, (x1, x2) in enumerate(batches):
        q1, q2 = predictor(online(x1)), predictor(online(x2))
        loss = symmetric_contrastive_loss(q1, q2, key(x1), key(x2), temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        key.update(cosine_momentum(step, len(batches), base=0.9))
    return state(online, key, None, predictor)


def state(
    online: nn.Module, key: Any, queue: Any = None, predictor: nn.Module | None = None
) -> dict[str, Any]:
    out = {
        "online": {n: p.detach().clone() for n, p in online.named_parameters()},
        "key": {n: p.detach().clone() for n, p in key.key_encoder.named_parameters()},
    }
    if queue is not None:
        out["queue"], out["ptr"] = queue.keys.clone(), queue.ptr.clone()
    if predictor is not None:
        out["predictor"] = {n: p.detach().clone() for n, p in predictor.named_parameters()}
    return out


def module_state(module: Any) -> dict[str, Any]:
    queue = getattr(module, "queue", None)
    return state(module.online, module.key_encoder, queue, getattr(module, "predictor", None))


def assert_same(a: dict[str, Any], b: dict[str, Any], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, dict):
            assert_same(x, y, atol)
        elif atol == 0:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=name)


def batches_of(data: tuple[torch.Tensor, torch.Tensor], size: int, epochs: int = 1) -> list:
    one = list(zip(data[0].split(size), data[1].split(size), strict=True))
    return one * epochs


# ---- 1. one process: the guide's modules equal the plain loops bit for bit ----


def test_one_process_equals_the_plain_loop_bit_for_bit() -> None:
    data = views(32)
    module = v2()
    want = plain_v2(module, batches_of(data, 8))
    trainer = fit(module, loader(data, 8), max_epochs=1)
    assert trainer.global_step == 4 and int(module.queue.ptr) == 32 % QUEUE
    assert_same(module_state(module), want)
    assert not torch.equal(want["key"]["0.weight"], want["online"]["0.weight"])

    module = v3()
    want = plain_v3(module, batches_of(data, 8))
    trainer = fit(module, loader(data, 8), max_epochs=1)
    assert trainer.global_step == 4
    assert_same(module_state(module), want)


# ---- 3. accumulation equals the full batch (float64: Lightning's "64-true") ----


def test_accumulation_equals_the_full_batch() -> None:
    x_q, x_k = views(32)
    data = (x_q.double(), x_k.double())
    module = v2().double()
    want = plain_v2(module, batches_of(data, 16))  # 2 steps of 16
    trainer = fit(
        module, loader(data, 8), max_epochs=1, accumulate_grad_batches=2, precision="64-true"
    )
    assert trainer.global_step == 2 and int(module.queue.ptr) == 32 % QUEUE
    assert module.queue.keys.dtype == torch.float32  # built float32: kept through the cast
    assert_same(module_state(module), want, atol=1e-12)

    module = v3(accumulate=4).double()
    want = plain_v3(module, batches_of(data, 16))
    trainer = fit(module, loader(data, 16), max_epochs=1, precision="64-true")
    assert trainer.global_step == 2
    assert_same(module_state(module), want, atol=1e-12)


# ---- 4. the update's place under accumulate_grad_batches ----


class WrongPlacement(MoCoV2):  # type: ignore[misc, valid-type]
    """The key-encoder update and the push in on_train_batch_end: once per micro-batch."""

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        L.LightningModule.optimizer_step(self, *args, **kwargs)  # no update here

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.key_encoder.update()
        self.queue.push(self._window.pop())
        self._negatives = None


def test_update_per_micro_batch_warns_and_the_guides_placement_does_not() -> None:
    data = views(32)
    with pytest.warns(RuntimeWarning, match=UNCHANGED):
        fit(
            WrongPlacement(tiny(0), DIM, queue_size=QUEUE),
            loader(data, 4),
            max_steps=3,
            accumulate_grad_batches=2,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = v2()
        fit(module, loader(data, 4), max_steps=3, accumulate_grad_batches=2)
    assert not [w for w in caught if UNCHANGED in str(w.message)]
    assert int(module.queue.ptr) == 24 % QUEUE  # 3 windows of 2 x 4 keys


# ---- 5. save and resume equal an uninterrupted run ----


def test_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # the guide's pattern: the same max_epochs, stopped by its StopAfterEpochs callback
    stop_after = load("MoCoV2", "StopAfterEpochs")["StopAfterEpochs"]
    data = views(16)
    for build in (v2, v3):
        whole = build()
        fit(whole, loader(data, 8), max_epochs=3)  # 6 steps
        first = build()
        trainer = fit(first, loader(data, 8), max_epochs=3, callbacks=[stop_after(1)])
        assert trainer.global_step == 2
        ckpt = tmp_path / f"{build.__name__}.ckpt"
        trainer.save_checkpoint(ckpt)
        resumed = build(seed=5)  # other weights (and queue): all of it must come from the file
        trainer = fit(resumed, loader(data, 8), max_epochs=3, ckpt_path=str(ckpt))
        assert trainer.global_step == 6
        assert_same(module_state(resumed), module_state(whole))
        assert_same(dict(resumed.state_dict()), dict(whole.state_dict()))


def test_resuming_v3_with_a_longer_max_epochs_changes_the_run(tmp_path: Path) -> None:
    # what the guide warns of: a first run of max_epochs=1 spans its momentum schedule over
    # 2 steps, not the 6 of the whole run
    data = views(16)
    whole = v3()
    fit(whole, loader(data, 8), max_epochs=3)
    first = v3()
    fit(first, loader(data, 8), max_epochs=1).save_checkpoint(tmp_path / "short.ckpt")
    resumed = v3(seed=5)
    fit(resumed, loader(data, 8), max_epochs=3, ckpt_path=str(tmp_path / "short.ckpt"))
    key, want = module_state(resumed)["key"], module_state(whole)["key"]
    assert any(not torch.equal(key[n], want[n]) for n in want)


# ---- 6. bf16-true: the key weights follow a float32 average ----


class RecordingV2(MoCoV2):  # type: ignore[misc, valid-type]
    """Keeps the online weights after each optimizer step (for the reference average)."""

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.seen = [
            *getattr(self, "seen", []),
            {n: p.double() for n, p in self.online.named_parameters()},
        ]


def test_bf16_true_averages_in_float32_and_resumes(tmp_path: Path) -> None:
    data = views(32)

    def build(seed: int = 0) -> Any:
        return RecordingV2(
            tiny(seed), DIM, queue_size=QUEUE, momentum=0.99, lr=0.5, ema_dtype=torch.float32
        )

    module = build()
    start = {n: p.double() for n, p in module.online.named_parameters()}  # float32, pre-cast
    key_start = {n: p.to(torch.bfloat16) for n, p in module.online.named_parameters()}
    fit(module, loader(data, 8), max_epochs=2, precision="bf16-true")  # 8 steps
    key = dict(module.key_encoder.key_encoder.named_parameters())
    assert key.keys() == start.keys() and len(module.seen) == 8
    want = dict(start)  # the float64 average of the same online weights
    for online in module.seen:
        want = {n: 0.99 * want[n] + 0.01 * online[n] for n in want}
    for name, p in key.items():
        assert p.dtype == torch.float32  # kept through the bf16-true cast
        torch.testing.assert_close(p.double(), want[name], atol=2e-6, rtol=0)
        assert not torch.equal(p.to(torch.bfloat16), key_start[name])  # and it moved
    # the cast does not reach the queue: it keeps the float32 it was built with
    assert module.queue.keys.dtype == torch.float32

    first = build()
    trainer = fit(first, loader(data, 8), max_epochs=1, precision="bf16-true")
    trainer.save_checkpoint(tmp_path / "bf16.ckpt")
    saved = torch.load(tmp_path / "bf16.ckpt", weights_only=True)["state_dict"]
    assert saved["key_encoder.key_encoder.0.weight"].dtype == torch.float32
    assert saved["queue.keys"].dtype == torch.float32
    resumed = build(seed=5)
    fit(
        resumed,
        loader(data, 8),
        max_epochs=2,
        precision="bf16-true",
        ckpt_path=str(tmp_path / "bf16.ckpt"),
    )
    assert_same(dict(resumed.state_dict()), dict(module.state_dict()))


# ---- 2. two processes: DDP (and FSDP2) equal one process with the whole batch ----


def rank_batches(data: tuple[torch.Tensor, ...], per_rank: int, world: int = 2) -> list:
    """The global batches of a one-epoch DDP run. Lightning gives each rank a
    DistributedSampler that shuffles (seed 0, epoch 0) the training set, even when the
    DataLoader does not; a step's batch is rank 0's rows, then rank 1's."""
    shares = []
    for r in range(world):
        # the sampler takes only len() of its dataset; the stubs ask for a Dataset
        sampler: DistributedSampler[int] = DistributedSampler(
            range(len(data[0])),  # type: ignore[arg-type]
            num_replicas=world,
            rank=r,
            seed=0,
        )
        sampler.set_epoch(0)
        shares.append(torch.tensor(list(sampler)).split(per_rank))
    return [
        tuple(t[torch.cat([shares[r][step] for r in range(world)])] for t in data)
        for step in range(len(shares[0]))
    ]


def test_two_processes_ddp_and_fsdp2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the two processes Lightning's own launcher would start (LOCAL_RANK set: Lightning
    # joins them instead of launching more), without torchrun's extra parent process
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.update(NODE_RANK="0", WORLD_SIZE="2", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(HERE / "lightning_ddp_worker.py"), str(tmp_path)]
    logs = [(tmp_path / f"rank{r}.log").open("w") for r in (0, 1)]
    ranks = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env={**env, "LOCAL_RANK": str(r), "RANK": str(r)},
            stdout=logs[r], stderr=subprocess.STDOUT,
        )
        for r in (0, 1)
    ]  # fmt: skip
    try:
        codes = [p.wait(timeout=240) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"rank{r}.log").read_text()[-4000:] for r in (0, 1))
    assert codes == [0, 0], output
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    data = tuple(t.double() for t in views(32))
    # v2: 4 steps of 2 x 4 rows = one process with the 8 rows of both ranks
    want = plain_v2(v2().double(), rank_batches(data, 4))
    for r in (r0, r1):
        assert r["v2_steps"] == 4
        assert_same(r["v2"], want, atol=1e-12)
    assert torch.equal(r0["v2"]["queue"], r1["v2"]["queue"])  # every rank's queue
    # DDP wrapped the LightningModule itself and skipped the names exclude_from_ddp set
    assert r0["v2_ddp"] == r1["v2_ddp"]
    assert r0["v2_ddp"]["wrapped"]
    assert {"queue.keys", "queue.ptr", "queue.length"} <= set(r0["v2_ddp"]["ignored"])
    assert not r0["v2_queue_broadcast"] and not r1["v2_queue_broadcast"]
    assert r0["control_queue_broadcast"]  # without exclude_from_ddp the queue goes out
    assert r0["v2_broadcasts"] > 0  # (the recording saw DDP's initial broadcast)

    # v3 with 2 micro-batches per rank: one process with the 16 rows of both ranks
    want = plain_v3(v3().double(), rank_batches(data, 8))
    for r in (r0, r1):
        assert r["v3_steps"] == 2
        assert_same(r["v3"], want, atol=1e-12)

    # FSDP2 (ModelParallelStrategy), float32, sharded key encoder
    encoder, predictor = tiny_vit()
    start = nn.Module()
    start.online, start.predictor = encoder, predictor
    g = torch.Generator().manual_seed(3)
    images = tuple(torch.randn(2, 32, 3, 16, 16, generator=g))
    want = plain_v3(start, rank_batches(images, 8))
    for r in (r0, r1):
        assert r["fsdp_steps"] == 2 and r["fsdp_sharded"] == "DTensor"
        for got in (r, {"fsdp": want}):  # the attention's key bias (rows 16 to 31) aside:
            # a constant added to every logit of a query leaves the softmax unchanged, so
            # its gradient is 0 up to rounding, which AdamW turns into steps of size lr
            for part in ("online", "key"):
                got["fsdp"][part][KEY_BIAS][16:32] = 0
        assert_same(r["fsdp"], want, atol=2e-6)


# ---- FSDP1 (Lightning's strategy="fsdp", GPU only there): refused at the first update ----


def test_fsdp1_wrapping_is_refused(tmp_path: Path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        module = v2()
        # as Lightning's FSDPStrategy wraps the LightningModule (use_orig_params=True)
        FullyShardedDataParallel(module, device_id=torch.device("cpu"), use_orig_params=True)
        with pytest.raises(TypeError, match=r"FSDP1 \(FullyShardedDataParallel\) is not supported"):
            module.key_encoder.update()
    finally:
        torch.distributed.destroy_process_group()
