"""What a new user meets first holds as written (issue 26): the single-device guide trains
with Shuffle-BN's split BatchNorm and uses the examples' CIFAR stem, the pre-trained
weights guide writes nothing into the reader's folder and gets a Hugging Face backbone
out, the Accelerate guide's CPU launch line really starts two processes, and the
benchmark texts say what their JSON results hold."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


@contextlib.contextmanager
def working_folder(path: Path) -> Iterator[Path]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def run_page(page: Path, folder: Path) -> dict[str, object]:
    """The page's Python blocks, in order, in one namespace, with ``folder`` as the working
    folder (as ``test_docs_snippets.py`` runs them); returns the namespace."""
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    with working_folder(folder):
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            if m.group(1) == "python":
                exec(compile(m.group(2), f"{page.relative_to(ROOT)} block {i}", "exec"), namespace)
    return namespace


# ---- docs/guides/add-to-your-loop.md: Shuffle-BN on one device, the loss, the CIFAR stem
LOOP = DOCS / "guides" / "add-to-your-loop.md"


@pytest.fixture(scope="module")
def loop_page(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return run_page(LOOP, tmp_path_factory.mktemp("loop"))


def test_loop_guide_trains_with_split_batchnorm_and_shuffled_keys(
    loop_page: dict[str, object],
) -> None:
    from momentum_contrast.norm import SplitBatchNorm

    key_encoder, model = loop_page["key_encoder"], loop_page["model"]
    assert isinstance(model, nn.Module)
    for encoder in (model, key_encoder.key_encoder):  # type: ignore[attr-defined]
        splits = [m for m in encoder.modules() if isinstance(m, SplitBatchNorm)]
        plain = [m for m in encoder.modules() if type(m) is nn.BatchNorm2d]
        assert splits and not plain, "the BatchNorm of both encoders is split, as per GPU"
    text = LOOP.read_text()
    step = next(m.group(2) for m in FENCE.finditer(text) if "for step in range" in m.group(2))
    assert "batch_shuffle(" in step and "batch_unshuffle(" in step
    loss = loop_page["loss"]
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)


def test_loop_guide_links_the_faq_on_batchnorm_and_the_rising_loss() -> None:
    text = LOOP.read_text()
    faq = (DOCS / "faq.md").read_text()
    for anchor, heading in [
        ("shuffle-bn-syncbn-or-split-bn", "## Shuffle-BN, SyncBN or split BN?"),
        ("how-do-i-train-on-a-single-gpu", "## How do I train on a single GPU?"),
        ("what-loss-value-is-normal", "## What loss value is normal?"),
    ]:
        assert f"(../faq.md#{anchor})" in text, anchor  # the strict site build checks anchors
        assert heading in faq, heading
    assert "ln(K + 1)" in text


def _examples_cifar_stems() -> list[nn.Conv2d]:
    """The first convolutions that the example scripts put in place of a ResNet's stem,
    read from their source (a line that sets ``conv1`` and ``maxpool = nn.Identity()``)."""
    stems = []
    for script in sorted((ROOT / "examples").glob("*.py")):
        for line in script.read_text().splitlines():
            if "conv1" in line and "maxpool" in line and "nn.Identity()" in line:
                call = re.search(r"nn\.Conv2d\([^)]*\)", line)
                assert call is not None, (script, line)
                stems.append(eval(call.group(0), {"nn": nn}))
    return stems


def test_loop_guide_cifar_stem_is_the_examples(loop_page: dict[str, object]) -> None:
    stems = _examples_cifar_stems()
    assert stems, "no CIFAR stem found in examples/"
    net = loop_page["cifar_resnet"]
    assert isinstance(net, nn.Module) and isinstance(net.maxpool, nn.Identity)
    ours = net.conv1
    assert isinstance(ours, nn.Conv2d)
    for theirs in stems:
        same = ("in_channels", "out_channels", "kernel_size", "stride", "padding")
        assert {a: getattr(ours, a) for a in same} == {a: getattr(theirs, a) for a in same}
        assert (ours.bias is None) == (theirs.bias is None)
    backbone = loop_page["cifar_backbone"]
    assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, 512)  # type: ignore[operator]


# ---- docs/guides/scaling-out.md: the FSDP2 block learns
SCALING = DOCS / "guides" / "scaling-out.md"


def test_scaling_out_fsdp_block_learns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The FSDP2 block's loss is not the constant ``4 T ln N`` and its gradients are not 0
    (a torchvision ViT's zero-initialised classifier as the output trained nothing)."""
    import math

    block = next(
        m.group(2) for m in FENCE.finditer(SCALING.read_text()) if "fully_shard(" in m.group(2)
    )
    port = _free_port()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    namespace: dict[str, object] = {"__name__": "docs_scaling_out"}
    torch.manual_seed(0)
    try:
        with working_folder(tmp_path):
            exec(compile(block, f"{SCALING.relative_to(ROOT)} FSDP2 block", "exec"), namespace)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    losses = [float(x) for x in re.findall(r"step \d+ loss (\S+)", capsys.readouterr().out)]
    constant = 4 * 0.2 * math.log(4)  # every output equal: T 0.2, 4 images
    assert len(losses) == 2 and all(math.isfinite(v) and abs(v - constant) > 1e-3 for v in losses)
    vit = namespace["vit"]
    assert isinstance(vit, nn.Module)
    grads = [p.grad.to_local() for p in vit.parameters() if p.grad is not None]  # type: ignore[attr-defined]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)


# ---- docs/guides/pretrained-weights.md: a temporary folder, Hugging Face backbones
WEIGHTS = DOCS / "guides" / "pretrained-weights.md"


def test_pretrained_weights_guide_writes_nothing_into_the_working_folder(tmp_path: Path) -> None:
    import transformers

    namespace = run_page(WEIGHTS, tmp_path)
    assert list(tmp_path.iterdir()) == [], "the guide's blocks wrote into the working folder"
    out = namespace["out"]
    assert isinstance(out, Path) and not out.exists()  # its temporary folder, removed
    assert isinstance(namespace["vit"], transformers.ViTModel)
    assert isinstance(namespace["classifier"], transformers.ViTForImageClassification)


def test_pretrained_weights_guide_names_the_hugging_face_prefixes() -> None:
    """The prefixes the guide names are where the state dicts hold the base model."""
    import transformers

    from momentum_contrast import MomentumEncoder, moco_v2_head, strip_classifier

    text = WEIGHTS.read_text()
    names = (
        "0.model.",
        "online.0.model.",
        "key_encoder.0.model.",
        "key_encoder.key_encoder.0.model.",
    )
    for prefix in names:
        assert f"`{prefix}`" in text or f'"{prefix}"' in text, prefix
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    backbone, width = strip_classifier(transformers.ViTForImageClassification(config))
    online = nn.Sequential(backbone, moco_v2_head(width))
    container = nn.Module()
    container.online = online
    container.key_encoder = MomentumEncoder(online)
    base = set(transformers.ViTModel(config, add_pooling_layer=False).state_dict())
    states = [
        ("0.model.", online.state_dict()),
        ("key_encoder.0.model.", container.key_encoder.state_dict()),
        ("online.0.model.", container.state_dict()),
        ("key_encoder.key_encoder.0.model.", container.state_dict()),
    ]
    for prefix, state in states:
        assert {k[len(prefix) :] for k in state if k.startswith(prefix)} == base, prefix


# ---- docs/guides/accelerate.md: the CPU launch lines
ACCELERATE = DOCS / "guides" / "accelerate.md"
PROBE = """import json, os
from accelerate import Accelerator

accelerator = Accelerator({cpu})
report = {{"num_processes": accelerator.num_processes, "type": str(accelerator.distributed_type)}}
with open(f"rank{{os.environ.get('RANK', 'none')}}.json", "w") as f:
    json.dump(report, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(line: str, script_body: str, folder: Path) -> list[dict[str, object]]:
    """Run the guide's ``line`` as written (its ``train.py`` a probe that reports what its
    ``Accelerator`` sees), on the CPU; the reports of every process it started."""
    (folder / "train.py").write_text(script_body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PET_MASTER_PORT"] = str(_free_port())  # torchrun's --master-port, not on the line
    argv = shlex.split(line)
    while "=" in argv[0]:  # VAR=value before the command
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    tools = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"],
    }
    done = subprocess.run(
        [*tools[argv[0]], *argv[1:]], cwd=folder, env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-2000:])
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def _inline_line(text: str, command: str) -> str:
    """The guide's line (an inline code span alone or in a sentence) that contains ``command``."""
    found = [c for c in re.findall(r"`([^`\n]+)`", text) if command in c and c.endswith("train.py")]
    assert found, f"docs/guides/accelerate.md: no `{command} ... train.py` line"
    return str(found[0])


def test_accelerate_guide_cpu_launch_lines_start_two_processes(tmp_path: Path) -> None:
    text = ACCELERATE.read_text()
    # the guide's line, with Accelerator(cpu=True) in the script
    line = _inline_line(text, "torchrun --nproc-per-node 2")
    assert line == "torchrun --nproc-per-node 2 train.py"
    assert "Accelerator(cpu=True)" in text
    (tmp_path / "a").mkdir()
    reports = _launch(line, PROBE.format(cpu="cpu=True"), tmp_path / "a")
    assert reports == [{"num_processes": 2, "type": "DistributedType.MULTI_CPU"}] * 2, reports
    # the same with a plain Accelerator() and the environment variable
    line = _inline_line(text, "ACCELERATE_USE_CPU=true torchrun --nproc-per-node 2")
    (tmp_path / "b").mkdir()
    reports = _launch(line, PROBE.format(cpu=""), tmp_path / "b")
    assert reports == [{"num_processes": 2, "type": "DistributedType.MULTI_CPU"}] * 2, reports


def test_accelerate_guide_warns_of_the_cpu_flag_truly(tmp_path: Path) -> None:
    """What the guide says of ``accelerate launch --num_processes 2 --cpu``: one process,
    reporting one, no error."""
    line = _inline_line(ACCELERATE.read_text(), "accelerate launch --num_processes 2 --cpu")
    reports = _launch(line, PROBE.format(cpu=""), tmp_path)
    assert reports == [{"num_processes": 1, "type": "DistributedType.NO"}], reports


# ---- benchmarks/README.md and docs/performance.md against benchmarks/results/
RESULTS = ROOT / "benchmarks" / "results"


def _section(text: str, start: str) -> str:
    """From the line holding ``start`` to the next heading."""
    begin = text.index(start)
    end = text.find("\n#", begin + 1)
    return text[begin : end if end > 0 else None]


def _us_rows(section: str) -> list[list[str]]:
    """The cells of a section's table rows that quote microseconds."""
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and " us |" in line
    ]


_MODELS = {"resnet50": "ResNet-50", "vit_b_16": "ViT-B/16"}
_PRECISIONS = {"float32": "float32", "ema_dtype": "`ema_dtype` on bfloat16"}


def test_benchmark_update_host_texts_agree_with_the_json() -> None:
    """The afternoon's run (the code before the walk without names), and the evening's three
    runs (each cell the range of the three), as README and performance page quote them."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    performance = (DOCS / "performance.md").read_text()
    results = json.loads((RESULTS / "cpu2-2026-12-06-update_host.json").read_text())
    header = f"## Measured: 2-core CPU, torch 2.14.1, {results['machine']['date']}"
    rows = _us_rows(_section(readme, header + ", afternoon"))
    assert len(rows) == len(results["rows"]) == 4
    for row, want in zip(rows, results["rows"], strict=True):
        assert row[0].startswith(_MODELS[want["model"]])
        assert row[1] == _PRECISIONS[want["precision"]]
        for cell, us in ((row[2], want["update_us"]), (row[3], want["plain_walk_lerp_us"])):
            assert cell.endswith(" us") and abs(float(cell[:-3]) - us) <= 0.5, (row, us)
        assert f"{want['ratio']:.2f}x" in row[4], row
        assert f"{want['ratio']:.2f}x" in performance, want
    runs = json.loads((RESULTS / "cpu2-2026-12-06-update_host-names_free_walk.json").read_text())
    rows = _us_rows(_section(readme, header + ", evening"))
    assert len(runs["runs"]) == 3 and len(rows) == 4
    for i, row in enumerate(rows):
        got = [run[i] for run in runs["runs"]]
        assert row[0] == _MODELS[got[0]["model"]]
        assert row[1] == _PRECISIONS[got[0]["precision"]]
        for cell, key in ((row[2], "update_us"), (row[3], "plain_walk_lerp_us")):
            values = [g[key] for g in got]
            assert cell == f"{min(values):.0f}-{max(values):.0f} us", (row, values)
        ratios = [g["ratio"] for g in got]
        assert max(ratios) <= 1.2, got  # the target
        quoted = f"{min(ratios):.2f}x-{max(ratios):.2f}x"
        assert quoted in row[4], (row, ratios)


def test_the_current_update_host_times_are_the_newest_json_everywhere() -> None:
    """The newest three runs: each row's range of ratios, to three places in the benchmarks
    README and to two in the performance page and the home page (in its order)."""
    runs = json.loads((RESULTS / "cpu2-2026-12-07-update_host-evening.json").read_text())
    section = _section(
        (ROOT / "benchmarks" / "README.md").read_text(),
        "## Measured: 2-core CPU, torch 2.14.1, 2026-12-07, evening",
    )
    pages = [(DOCS / name).read_text() for name in ("performance.md", "index.md")]
    assert len(runs["runs"]) == 3
    for i in range(4):
        ratios = [run[i]["ratio"] for run in runs["runs"]]
        assert max(ratios) <= 1.2, ratios  # the target
        assert f"{min(ratios):.3f}x-{max(ratios):.3f}x" in section, ratios
        for page in pages:
            assert f"{min(ratios):.2f}x-{max(ratios):.2f}x" in page, ratios


def test_benchmark_ema_texts_say_which_code_they_timed() -> None:
    """The H200 EMA figures predate the per-update checks: where they are quoted, the text
    says so, and the host times it quotes are the JSON's."""
    h200 = json.loads((RESULTS / "h200-2026-11-28-ema_update.json").read_text())
    host = {(r["model"], r["variant"]): r["host ms"] for r in h200["rows"]}
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    paragraph = next(p for p in readme.split("\n\n") if "0.097 ms" in p)
    assert f"{host['resnet50', 'MomentumEncoder.update()']:.3f} ms" == "0.097 ms"
    bare = host["resnet50", "bare _foreach_lerp_ (no pairing checks)"]
    assert f"{bare:.3f} ms" in paragraph
    assert "2026-11-28" in paragraph and "almost nothing" not in readme
    check = json.loads((RESULTS / "cpu2-2026-11-30-ema.json").read_text())
    pairing = {r["ms"] for r in check["rows"] if r["implementation"] == "pairing check (host)"}
    assert {f"{ms:.2f} ms" for ms in pairing} == {"0.57 ms"} and "0.57 ms" in paragraph
    performance = _section((DOCS / "performance.md").read_text(), "## Momentum (EMA) update")
    for model in ("resnet50", "vit_b_16"):
        ms = next(
            r["ms"] for r in h200["rows"]
            if r["model"] == model and r["variant"] == "MomentumEncoder.update()"
        )  # fmt: skip
        assert f"{ms:.3f} ms" in performance, (model, ms)
    assert h200["machine"]["date"] in performance and "not been measured again" in performance


def test_readme_lists_only_pre_training_scripts_as_pre_training_loops() -> None:
    readme = (ROOT / "README.md").read_text()
    sentence = readme[readme.index("Training scripts:") : readme.index("pre-training loops")]
    scripts = re.findall(r"(\w+)\.py", sentence)
    assert scripts and "linear_eval" not in scripts, sentence


def test_checkpoints_the_docs_name_are_ones_a_default_run_keeps() -> None:
    """Every ``runs/example/checkpoint_<step>.pt`` a page names is one that the default
    ``python examples/moco_v2.py`` leaves: its last epoch's, or one of the ``--keep`` before
    (the older ones are deleted), read from the script's own ``--print-config``."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "moco_v2.py"), "--print-config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT / "examples",
    ).stdout
    config = json.loads(out[out.index("{") :])
    per_epoch = config["shapes_train"] // config["batch_size"]
    last = config["epochs"] * per_epoch
    kept = {last - i * per_epoch for i in range(config["keep"])}
    pages = [ROOT / "README.md", *DOCS.rglob("*.md"), *(ROOT / "examples").glob("*.[mp][dy]")]
    named = {
        (page.name, int(step))
        for page in pages
        for step in re.findall(r"runs/example/checkpoint_([0-9]+)\.pt", page.read_text())
    }
    assert named, "no page names a checkpoint of the default run"
    assert all(step in kept for _, step in named), (sorted(named), sorted(kept))
