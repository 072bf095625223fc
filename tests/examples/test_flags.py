"""Flags are checked before anything is built, with a one-line error naming the flag: by
argparse (``error: argument --flag: ...``) for a flag alone, by the scripts for flags that
must fit together."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from example_runner import TINY, V12, import_examples, run

import_examples()
import linear_eval  # noqa: E402
import moco_v2  # noqa: E402
import moco_v3  # noqa: E402
from checkpoints import load_resume, resume_states  # noqa: E402
from harness import attention_heads, check_steps  # noqa: E402
from moco_v2 import validate  # noqa: E402

TRAINED = {"arch": "small_cnn", "image_size": 32}
V2_RESUME = ("moco_v2", moco_v2.MUST_MATCH, moco_v2.WARN_IF_CHANGED)  # load_resume's checks
V3_RESUME = ("moco_v3", moco_v3.MUST_MATCH, moco_v3.WARN_IF_CHANGED)
PARSERS = {
    "moco_v2": moco_v2.build_parser,
    "moco_v3": moco_v3.build_parser,
    "linear_eval": lambda: linear_eval.build_parser(False, TRAINED),
}


@pytest.mark.parametrize("script", PARSERS)
def test_every_flag_has_a_help_text(script: str) -> None:
    actions = PARSERS[script]()._actions
    assert len(actions) > 15
    assert not [a.option_strings for a in actions if not (a.help and a.help.strip())]


def v2_args(*argv: str) -> argparse.Namespace:
    return moco_v2.parse_args([*V12, *argv])


def v3_args(*argv: str) -> argparse.Namespace:
    return moco_v3.parse_args([*TINY, *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "error: argument --batch-size: must be positive, got 0"),
        (["--batch-size", "-16"], "argument --batch-size: must be positive"),
        (["--batch-size", "12", "--shuffle-splits", "8"], "--shuffle-splits 8"),
        (["--epochs", "-1"], "argument --epochs: must be positive"),
        (["--max-steps", "-3"], "argument --max-steps: must be >= 0"),
        (["--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
        (["--image-size", "4"], "--image-size 4 does not fit --arch small_cnn"),
        (["--arch", "vit_tiny", "--image-size", "36"], "use a multiple of 8"),
        (["--blur-p", "0.5", "--image-size", "8"], "23-px blur kernel"),
        (["--blur-p", "1.5"], "argument --blur-p: must be in [0, 1]"),
        (["--crop-min", "0"], "argument --crop-min: must be in (0, 1]"),
        (["--queue-size", "0"], "argument --queue-size: must be positive"),
        (["--workers", "-1"], "argument --workers: must be >= 0"),
        (["--schedule-milestones", "120,x"], "argument --schedule-milestones: invalid"),
        (["--augment-on", "tpu"], "argument --augment-on: invalid choice: 'tpu'"),
        (["--accumulate", "0"], "argument --accumulate: must be positive, got 0"),
        (["--accumulate", "3"], "--accumulate 3 does not split the 16 images per process"),
        (["--accumulate", "16"], "--accumulate 16 gives micro-batches of fewer than 2 images"),
        (
            ["--accumulate", "4", "--shuffle-splits", "8"],
            "--shuffle-splits 8 does not split the 4 images of a (micro-)batch",
        ),
        (["--seed", "-1"], "argument --seed: must be in 0..2**32 - 1, got -1"),
        (["--seed", "1" + "0" * 15], "argument --seed: must be in 0..2**32 - 1"),
    ],
)
def test_bad_flags_stop_with_an_error_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)) as stop:
        validate(v2_args(*argv), blur=v2_args(*argv).blur_p > 0)
    line = str(stop.value.code)  # what the script prints on stderr (exit status 1)
    assert line.startswith("error: ") and "\n" not in line


def test_world_size_and_device_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="--batch-size 16 does not split across 3 processes"):
        moco_v3.validate(v3_args())
    monkeypatch.setenv("WORLD_SIZE", "1")
    moco_v3.validate(v3_args())  # the tiny settings are fine
    with pytest.raises(SystemExit, match="--image-size 8 does not fit --arch small_cnn: the"):
        moco_v3.validate(v3_args("--image-size", "8"))  # v3 always blurs
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA here"):
            moco_v3.validate(v3_args("--device", "cuda"))
    with pytest.raises(SystemExit, match="argument --device: invalid choice: 'gpu0'"):
        moco_v3.validate(v3_args("--device", "gpu0"))


def test_too_small_a_batch_per_process_names_the_batch_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # one image per process: --accumulate is not to blame
    with pytest.raises(SystemExit, match=r"--batch-size 2 over 2 processes gives micro-batches"):
        moco_v3.validate(v3_args("--batch-size", "2"))


def test_fsdp_needs_a_vit_and_accumulate_counts_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SystemExit, match="--fsdp shards transformer blocks: --arch small_cnn"):
        moco_v3.validate(v3_args("--fsdp"))
    moco_v3.validate(v3_args("--fsdp", "--arch", "vit_tiny"))
    assert v3_args().fsdp is False and v3_args().accumulate == 1  # the defaults
    monkeypatch.setenv("WORLD_SIZE", "2")  # 8 images per process: 4 micro-batches of 2
    moco_v3.validate(v3_args("--accumulate", "4"))
    with pytest.raises(SystemExit, match=r"split the 8 images per process \(--batch-size 16 over"):
        moco_v3.validate(v3_args("--accumulate", "16"))


def fake_checkpoint(path: Path, epoch_length: int | None = 4, **changes: object) -> Path:
    saved = {**vars(v2_args()), **changes}
    ckpt = {"recipe": "moco_v2", "step": 1, "args": saved, "model": {}, "rng": []}
    torch.save(ckpt if epoch_length is None else {**ckpt, "steps_per_epoch": epoch_length}, path)
    return path


def test_resume_checks_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match=r"--resume /nonexistent/checkpoint\.pt is not a check"):
        load_resume(v2_args("--resume", "/nonexistent/checkpoint.pt"), *V2_RESUME)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"notes\.txt is not a checkpoint"):
        load_resume(v2_args("--resume", str(tmp_path / "notes.txt")), *V2_RESUME)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other\.pt is not a checkpoint of these scripts"):
        load_resume(v2_args("--resume", str(tmp_path / "other.pt")), *V2_RESUME)
    path = fake_checkpoint(tmp_path / "a.pt", arch="resnet18", dim=64)
    with pytest.raises(SystemExit, match=r"--arch small_cnn \(checkpoint: resnet18\), --dim 128"):
        load_resume(v2_args("--resume", str(path)), *V2_RESUME)
    with pytest.raises(SystemExit, match="is a moco_v2 checkpoint, not moco_v3"):
        load_resume(v3_args("--resume", str(path)), *V3_RESUME)
    path = fake_checkpoint(tmp_path / "b.pt", batch_size=32, epochs=5, seed=3)
    resumed = load_resume(v2_args("--resume", str(path)), *V2_RESUME)
    assert resumed is not None and resumed[1]["step"] == 1
    warning = capsys.readouterr().err
    assert "warning: resuming with changed --batch-size 16 (checkpoint: 32)" in warning
    assert "--epochs 2 (checkpoint: 5)" in warning and "--seed 0 (checkpoint: 3)" in warning
    load_resume(v2_args("--resume", str(path), "--batch-size", "32", "--epochs", "5",
                        "--seed", "3"), *V2_RESUME)  # fmt: skip
    assert "warning" not in capsys.readouterr().err
    path = fake_checkpoint(tmp_path / "c.pt", shapes_val=7, knn_bank=5)  # other images
    load_resume(v2_args("--resume", str(path)), *V2_RESUME)
    warning = capsys.readouterr().err
    assert "(checkpoint: 7)" in warning and "--knn-bank" in warning, warning


def test_a_resnet_resumed_across_the_cifar_stem_size_is_refused(tmp_path: Path) -> None:
    # at 32 px or less a ResNet has the CIFAR stem (3x3 conv1): its weights change shape
    path = fake_checkpoint(tmp_path / "r18.pt", arch="resnet18", image_size=32)
    with pytest.raises(SystemExit, match=r"--image-size 40 \(checkpoint: 32\)"):
        load_resume(v2_args("--resume", str(path), "--arch", "resnet18", "--image-size", "40"),
                    *V2_RESUME)  # fmt: skip
    resumed = load_resume(  # 32 px to 24 px: the same stem, only a warning
        v2_args("--resume", str(path), "--arch", "resnet18", "--image-size", "24"), *V2_RESUME
    )
    assert resumed is not None


def test_batch_larger_than_the_training_set(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--batch-size 128 is larger than the 64 training images"):
        check_steps(64, 128)
    assert check_steps(64, 16) == 4
    run("moco_v2.py", *V12, "--max-steps", "1", "--output-dir", str(tmp_path))
    (ckpt,) = tmp_path.glob("checkpoint_*.pt")
    result = run(
        "linear_eval.py", *TINY[:-4], "--batch-size", "128", "--pretrained", str(ckpt), check=False
    )
    assert result.returncode == 1 and "top-1" not in result.stdout
    assert "--batch-size 128 is larger than the 64 training images" in result.stderr
    out = ["--output-dir", str(tmp_path / "out")]
    pre = run("moco_v2.py", *V12, "--batch-size", "128", "--shuffle-splits", "1", *out, check=False)
    assert pre.returncode == 1
    assert "--batch-size 128 is larger than the 64 training images" in pre.stderr
    assert not (tmp_path / "out").exists()  # refused before anything: no folder with a .lock


def test_scripts_check_flags_before_building_anything() -> None:
    result = run("moco_v3.py", *TINY, "--epochs", "-2", check=False)
    assert (
        result.returncode == 1
        and result.stderr.strip() == "error: argument --epochs: must be positive, got -2"
    )
    assert "kNN" not in result.stdout


def le_args(*argv: str) -> argparse.Namespace:
    return linear_eval.parse_args([*TINY[:-4], *argv], False, TRAINED)


BAD_VALUES = [  # (flag, value, start of the message); linear_eval has no decay or temperature
    ("--lr", "nan", "argument --lr: must be positive and finite, got nan"),
    ("--lr", "inf", "argument --lr: must be positive and finite, got inf"),
    ("--weight-decay", "nan", "argument --weight-decay: must be finite and >= 0, got nan"),
    ("--weight-decay", "inf", "argument --weight-decay: must be finite and >= 0, got inf"),
    ("--temperature", "inf", "argument --temperature: must be positive and finite, got inf"),
    ("--temperature", "nan", "argument --temperature: must be positive and finite, got nan"),
    ("--device", "meta", "argument --device: invalid choice: 'meta'"),
    ("--image-size", "5000", "argument --image-size: must be in 1..4096"),
]
CASES = [
    (script, *case)
    for script in ("moco_v2", "moco_v3", "linear_eval")
    for case in BAD_VALUES
    if script != "linear_eval" or case[0] not in ("--weight-decay", "--temperature")
]


@pytest.mark.parametrize(("script", "name", "value", "message"), CASES)
def test_nan_inf_devices_and_sizes_no_script_takes(
    script: str, name: str, value: str, message: str
) -> None:
    """NaN passed `<= 0` checks and trained a NaN model; the others were tracebacks."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        if script == "moco_v2":
            validate(v2_args(name, value), blur=False)
        elif script == "moco_v3":
            moco_v3.validate(v3_args(name, value))
        else:
            linear_eval.validate(le_args(name, value))


@pytest.mark.parametrize("script", ["moco_v2", "moco_v3", "linear_eval"])
def test_an_output_dir_that_is_a_file_is_named(script: str, tmp_path: Path) -> None:
    (file := tmp_path / "afile").write_text("")
    flags = ("--output-dir", str(file))
    with pytest.raises(SystemExit, match=f"--output-dir {re.escape(str(file))} is a file"):
        if script == "moco_v2":
            validate(v2_args(*flags), blur=False)
        elif script == "moco_v3":
            moco_v3.validate(v3_args(*flags))
        else:
            linear_eval.validate(le_args(*flags))


def test_print_config_shows_the_temperature_each_version_uses() -> None:
    assert moco_v2.parse_args(V12, version="v1").temperature == 0.07  # MoCo v1
    assert moco_v2.parse_args(V12).temperature == 0.2  # MoCo v2
    for version in ("v1", "v2"):  # the authors' CIFAR-10 demo
        assert moco_v2.parse_args(["--data", "cifar10"], version=version).temperature == 0.1
        assert (
            moco_v2.parse_args([*V12, "--temperature", "0.5"], version=version).temperature == 0.5
        )
    shown = run("moco_v1.py", *V12, "--print-config")
    assert '"temperature": 0.07' in shown.stdout


def test_a_checkpoint_without_a_recorded_temperature_resumes_quietly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Up to 0.3.0 the scripts saved --temperature as None (the paper's, resolved later)."""
    load_resume(v2_args("--resume", str(fake_checkpoint(tmp_path / "a.pt", temperature=None))),
                *V2_RESUME)  # fmt: skip
    assert "warning" not in capsys.readouterr().err


def test_a_timm_vit_gets_the_vit_recipe() -> None:
    pytest.importorskip("timm")
    args = moco_v3.parse_args(["--arch", "timm:vit_tiny_patch16_224", "--image-size", "224"])
    assert (args.optimizer, args.lr, args.warmup_epochs) == ("adamw", 5e-4, 1)  # shapes' ViTs
    args = moco_v3.parse_args(["--arch", "timm:vit_tiny_patch16_224", "--data", "/d"])
    assert (args.optimizer, args.lr, args.temperature) == ("adamw", 1.5e-4, 0.2)  # the paper's
    moco_v3.validate(moco_v3.parse_args([*TINY, "--arch", "timm:vit_tiny_patch16_224"]))
    with pytest.raises(
        SystemExit, match="--arch timm:vit_tiny_patch16_224 is not a torchvision ViT"
    ):
        moco_v3.validate(v3_args("--fsdp", "--arch", "timm:vit_tiny_patch16_224"))
    args = v3_args("--arch", "timm:vit_tiny_patch16_224", "--image-size", "224")
    *_, features = moco_v3.build(args, (torch.device("cpu"), 0, 1))
    assert not features.patch_embed.proj.weight.requires_grad  # the frozen patch projection
    assert not features.pos_embed.requires_grad  # fixed sin-cos positions
    assert attention_heads(args.arch, features) == 3


def test_v3_initialises_and_crops_as_the_authors() -> None:
    """Their ResNets start with the last BatchNorm of each residual block at zero and crop
    20-100% (--crop-min .2 in every ResNet command); their ViTs crop 8-100% and draw q, k and
    v each from its own Xavier-uniform range, other linear weights Xavier-uniform with zero
    biases, the class token from N(0, 1e-6)."""
    cpu = (torch.device("cpu"), 0, 1)
    _, _, augment, features = moco_v3.build(v3_args("--arch", "resnet18"), cpu)
    last_bns = [block.bn2.weight for block in features.modules() if hasattr(block, "bn2")]
    assert len(last_bns) == 8 and all(torch.equal(w, torch.zeros_like(w)) for w in last_bns)
    assert augment.view_one.scale == augment.view_two.scale == (0.2, 1.0)
    args = v3_args("--arch", "vit_tiny", "--image-size", "32")
    _, _, augment, vit = moco_v3.build(args, cpu)
    assert augment.view_one.scale == (0.08, 1.0)
    assert 0 < vit.class_token.abs().max() < 1e-5
    width = vit.hidden_dim  # 192
    for block in vit.encoder.layers:
        attention = block.self_attention
        for third in attention.in_proj_weight.detach().chunk(3):  # (D, D) each
            bound = (6 / (width + width)) ** 0.5
            assert 0.95 * bound < third.abs().max() <= bound  # not (6 / (4 D)) ** 0.5
        linears = [attention.out_proj, block.mlp[0], block.mlp[3]]
        for layer in linears:
            fan_out, fan_in = layer.weight.shape
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert 0.95 * bound < layer.weight.detach().abs().max() <= bound
            assert not layer.bias.any()
        assert not attention.in_proj_bias.any()


def test_linear_eval_v3_protocol_takes_the_authors_vit_lr() -> None:
    """Their ViT linear probes run at lr 3 x batch/256 (CONFIG.md), ResNets' at 0.1."""
    data = ["--data", "/d"]
    assert linear_eval.parse_args(["--protocol", "v3", *data], False, TRAINED).lr == 0.1
    vit = {"arch": "vit_small", "image_size": 224}
    assert linear_eval.parse_args(["--protocol", "v3", *data], False, vit).lr == 3.0
    assert linear_eval.parse_args([*data], True, vit).lr == 3.0  # a v3 checkpoint's recipe
    assert linear_eval.parse_args([*data, "--arch", "vit_base"], True, TRAINED).lr == 3.0
    assert linear_eval.parse_args([*data, "--lr", "0.5"], True, vit).lr == 0.5
    assert linear_eval.parse_args([*data], False, vit).lr == 30.0  # v1/v2 protocol


def test_one_process_splits_the_batchnorm_of_both_encoders() -> None:
    """As 8 GPUs normalise their own 32 queries and keys (and the authors' CIFAR demo splits
    both encoders): the queries were normalised over the whole batch."""
    from momentum_contrast.norm import SplitBatchNorm

    pieces, *_ = moco_v2.build(v2_args("--shuffle-splits", "2"), "v2", (torch.device("cpu"), 0, 1))
    for encoder in (pieces["model"], pieces["key_encoder"].key_encoder):
        norms = [
            m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        assert norms and all(isinstance(m, SplitBatchNorm) and m.num_splits == 2 for m in norms)


def test_the_other_papers_flag_is_refused_and_not_recorded() -> None:
    """``moco_v1.py --blur-p 1`` trained as ``--blur-p 0`` (v1 has no blur) and
    ``moco_v2.py --schedule-milestones 1`` as the default (v2's schedule is a cosine), while
    ``--print-config`` and the checkpoint recorded the flag, and a resume warned when it
    changed."""
    for also in ([], ["--print-config"]):  # --print-config printed it and exited 0
        with pytest.raises(SystemExit, match="--blur-p is not MoCo v1's: it has no blur"):
            moco_v2.parse_args([*V12, "--blur-p", "1", *also], version="v1")
    with pytest.raises(SystemExit, match="--schedule-milestones is not MoCo v2's: it has a cos"):
        moco_v2.parse_args([*V12, "--schedule-milestones", "1"], version="v2")
    v1, v2 = moco_v2.parse_args(V12, version="v1"), moco_v2.parse_args(V12, version="v2")
    assert (v1.blur_p, v1.schedule_milestones) == (None, "20,25")
    assert (v2.blur_p, v2.schedule_milestones) == (0.0, None)


def test_a_resume_that_changes_the_epochs_length_goes_into_another_folder(
    tmp_path: Path,
) -> None:
    """Into its own folder, the old run's checkpoints (numbered in steps of the old epochs)
    outranked the new run's, and --keep deleted the new ones; a checkpoint of 0.3.0 records
    no epoch length, and its step was read in the new epochs (epochs skipped)."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "checkpoint_0000008.pt"
    ckpt = {"step": 8, "steps_per_epoch": 4, "knn_baseline": 10.0, "rng": []}
    env, nothing = (torch.device("cpu"), 0, 1), {"load": lambda *_: None, "states": dict}

    def resume(steps_per_epoch: int, out: Path, step: int = 8) -> int:
        got = resume_states((path, {**ckpt, "step": step}), {}, env, steps_per_epoch, out,
                            **nothing)  # fmt: skip
        return int(got[0])

    assert resume(4, tmp_path / "run") == 8  # the same epochs: into its folder too
    with pytest.raises(SystemExit, match=r"epochs had 4 steps, this run's have 2 .* another"):
        resume(2, tmp_path / "run")  # whatever changed them: flags, or images added
    assert resume(2, tmp_path / "new") == 4  # two epochs of 2 steps
    assert resume(8, tmp_path / "new") == 16
    with pytest.raises(SystemExit, match=r"step 6 is within an epoch of 4 steps"):
        resume(2, tmp_path / "new", step=6)
    old = fake_checkpoint(tmp_path / "old.pt", epoch_length=None, shapes_train=128)
    with pytest.raises(SystemExit, match=r"does not record the length of its epochs"):
        load_resume(v2_args("--resume", str(old)), *V2_RESUME)
    assert load_resume(v2_args("--resume", str(old), "--shapes-train", "128"), *V2_RESUME)
    (tmp_path / "images").mkdir()  # a folder, spelled another way: the same data
    old = fake_checkpoint(tmp_path / "old2.pt", epoch_length=None, data=str(tmp_path / "images"))
    spelled = str(tmp_path / "images") + "/"
    folder = ("--data", spelled, "--arch", "small_cnn")  # (no shapes recipe: its arch given)
    assert load_resume(v2_args("--resume", str(old), *folder), *V2_RESUME)
