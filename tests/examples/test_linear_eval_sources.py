"""linear_eval.py --pretrained takes every kind of checkpoint momentum_contrast.convert
reads: the MoCo authors' (built from the released files' key names and shapes) and plain
backbone state dicts; bad files get one-line errors naming what is wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torchvision
from example_runner import TINY, V3, V12, damage, import_examples, run, run_2p_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_convert_official import official, official_v3_vit_small

FLAGS = [
    "--device", "cpu", "--batch-size", "16", "--epochs", "1", "--workers", "0",
    "--shapes-train", "64", "--shapes-val", "32", "--image-size", "64",
]  # fmt: skip


def test_the_authors_v2_checkpoint_is_evaluated(tmp_path: Path) -> None:
    torch.save(official("moco_v2_resnet50"), src := tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    result = run("linear_eval.py", *FLAGS, "--pretrained", str(src))
    assert "top-1" in result.stdout and "backbone unchanged" in result.stdout


def test_a_plain_state_dict_needs_arch_and_then_runs(tmp_path: Path) -> None:
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "fc." not in k}
    torch.save(state, src := tmp_path / "resnet18.pth")
    refused = run("linear_eval.py", *FLAGS, "--pretrained", str(src), check=False)
    assert refused.returncode != 0
    assert "does not name its architecture: pass --arch" in refused.stderr
    result = run("linear_eval.py", *FLAGS, "--arch", "resnet18", "--pretrained", str(src))
    assert "top-1" in result.stdout


def test_bad_files_get_one_line_errors(tmp_path: Path) -> None:
    torch.save(official("moco_v2_resnet50"), v2 := tmp_path / "v2.pth.tar")
    torch.save({"0.weight": torch.zeros(3, 3)}, head := tmp_path / "head.pth")
    (text := tmp_path / "notes.txt").write_text("not a checkpoint")
    for name, folder_bit in (("crc.pth.tar", False), ("folder.pth.tar", True)):
        (tmp_path / name).write_bytes(v2.read_bytes())  # torch.load reads either silently
        damage(tmp_path / name, folder_bit=folder_bit)
    for extra, expected in (
        (["--pretrained", str(tmp_path / "crc.pth.tar")], "fails its CRC-32 check"),
        (["--pretrained", str(tmp_path / "folder.pth.tar")], "is marked as a folder"),
        (["--arch", "resnet18", "--pretrained", str(v2)], "does not fit --arch resnet18: "),
        (["--arch", "resnet18", "--pretrained", str(head)], "holds no backbone"),
        (["--pretrained", str(text)], "is not a PyTorch checkpoint"),
        (["--pretrained", str(tmp_path / "missing.pt")], "no such checkpoint file"),
        (["--arch", "nosuchnet", "--pretrained", str(v2)], "--arch nosuchnet does not work"),
        (  # found out before the training, not when the result is written
            ["--arch", "resnet18", "--pretrained", str(v2), "--output-dir", str(text / "out")],
            f"--output-dir {text / 'out'}: cannot write there",
        ),
    ):
        result = run("linear_eval.py", *FLAGS, *extra, check=False)
        assert result.returncode != 0, extra
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_pretrained_is_parsed_as_a_flag(tmp_path: Path) -> None:
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "fc." not in k}
    torch.save(state, src := tmp_path / "resnet18.pth")
    missing = str(tmp_path / "missing.pt")
    no_value = run("linear_eval.py", *FLAGS, "--pretrained", check=False)
    assert no_value.returncode != 0 and "Traceback" not in no_value.stderr
    assert no_value.stderr.strip() == "error: argument --pretrained: expected one argument"
    for twice in (["--pretrained", missing, "--pretrained", str(src)],
                  [f"--pretrained={missing}", f"--pretrained={src}"]):  # fmt: skip
        shown = run("linear_eval.py", *FLAGS, "--arch", "resnet18", *twice, "--print-config")
        assert json.loads(shown.stdout)["pretrained"] == str(src)  # the last, as it loads
    folder = run("linear_eval.py", *FLAGS, "--pretrained", str(tmp_path), check=False)
    assert folder.returncode != 0
    assert (
        folder.stderr.strip()
        == f"error: --pretrained {tmp_path} is a directory, not a checkpoint file"
    )


def test_a_vit_is_evaluated_with_the_heads_its_checkpoint_records(tmp_path: Path) -> None:
    run("moco_v3.py", *V3, "--arch", "vit_tiny", "--max-steps", "1", "--output-dir", str(tmp_path))
    (path,) = tmp_path.glob("checkpoint_*.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["num_heads"] == 3  # vit_tiny: 3 heads, recorded beside the weights
    result = run("linear_eval.py", *TINY[:-4], "--epochs", "1", "--pretrained", str(path))
    assert "top-1" in result.stdout and "backbone unchanged" in result.stdout
    del ckpt["num_heads"]  # as written up to version 0.2.0
    torch.save(ckpt, old := tmp_path / "old.pt")
    refused = run(
        "linear_eval.py", *TINY[:-4], "--epochs", "1", "--pretrained", str(old), check=False
    )
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "number of attention heads is not recorded" in refused.stderr


def test_the_authors_vit_small_is_built_with_12_heads() -> None:
    import_examples()
    import linear_eval

    ckpt, _ = official_v3_vit_small()  # the authors' ViT-S: arch "vit_small", 12 heads
    state, heads = linear_eval.pretrained_backbone(ckpt, "official_v3", True, "vit_small")
    assert heads == 12 and "conv_proj.weight" in state


def test_a_torchvision_vit_is_evaluated_with_its_heads(tmp_path: Path) -> None:
    """Any ViT's head count is recorded (not only the scripts' own vit_*); a torchvision
    name fixes it, so a checkpoint without the record is still evaluated."""
    flags = [*TINY, "--epochs", "2", "--queue-size", "64", "--shuffle-splits", "2"]
    run(
        "moco_v2.py",
        *flags,
        "--arch",
        "vit_b_32",
        "--max-steps",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    (path,) = tmp_path.glob("checkpoint_*.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["num_heads"] == 12  # vit_b_32: 12 heads
    evaluate = [*TINY[:-4], "--epochs", "1", "--pretrained"]
    result = run("linear_eval.py", *evaluate, str(path))
    assert "top-1" in result.stdout and "backbone unchanged" in result.stdout
    ckpt["num_heads"] = None  # as written up to 0.3.0 for torchvision ViTs: the name fixes 12
    import_examples()
    import linear_eval

    state, heads = linear_eval.pretrained_backbone(ckpt, "project", False, "vit_b_32", 12)
    assert heads == 12 and "conv_proj.weight" in state


def test_a_whole_classification_models_state_dict_is_evaluated(tmp_path: Path) -> None:
    """The classifier that strip_classifier removes is dropped, for any torchvision model."""
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), mb := tmp_path / "mb.pth")
    result = run("linear_eval.py", *FLAGS, "--arch", "mobilenet_v3_small", "--pretrained", str(mb))
    assert "top-1" in result.stdout and "backbone unchanged" in result.stdout
    torch.save(torchvision.models.resnet18().state_dict(), r18 := tmp_path / "r18.pth")
    small = [*FLAGS[:-2], "--image-size", "32", "--arch", "resnet18", "--pretrained", str(r18)]
    refused = run("linear_eval.py", *small, check=False)
    (line,) = refused.stderr.strip().splitlines()
    assert "of another shape (first: conv1.weight)" in line and "the CIFAR stem" in line
    # the other way, the common case: 32-px weights (a converted file records no image size)
    # evaluated at the default size had no hint
    import_examples()
    import harness

    cifar = harness.backbone("resnet18", 32, keep_classifier=True)[0]
    torch.save(cifar.state_dict(), r18_32 := tmp_path / "r18_32.pth")
    refused = run("linear_eval.py", *FLAGS, "--arch", "resnet18", "--pretrained", str(r18_32),
                  check=False)  # fmt: skip
    (line,) = refused.stderr.strip().splitlines()
    assert "of another shape (first: conv1.weight)" in line and "the CIFAR stem" in line


def test_weights_of_a_diverged_run_are_refused_before_training(tmp_path: Path) -> None:
    """They trained every epoch, then failed with "the frozen backbone changed" (NaN is not
    equal to NaN)."""
    state = torchvision.models.resnet18().state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, src := tmp_path / "diverged.pth")
    refused = run("linear_eval.py", *FLAGS, "--arch", "resnet18", "--pretrained", str(src),
                  check=False)  # fmt: skip
    (line,) = refused.stderr.strip().splitlines()
    assert "1 weights hold NaN or infinite values (first: layer2.0.conv1.weight)" in line
    assert "the pre-training diverged" in line and "epoch" not in refused.stdout


def test_the_data_defaults_to_the_checkpoints() -> None:
    """main() passes a checkpoint's args as ``trained``: a CIFAR-10 run is evaluated on it."""
    import_examples()
    import linear_eval

    trained = {"arch": "resnet18", "image_size": 32, "data": "cifar10", "data_root": "/datasets"}
    args = linear_eval.build_parser(False, trained).parse_args([])
    assert (args.data, args.data_root) == ("cifar10", "/datasets")
    assert (
        linear_eval.build_parser(False, trained).parse_args(["--data", "shapes"]).data == "shapes"
    )
    older = linear_eval.build_parser(False, {"arch": "resnet50", "image_size": 224})  # authors'
    assert (older.parse_args([]).data, older.parse_args([]).data_root) == ("shapes", "data")


def test_the_classifier_starts_alike_from_a_checkpoint_or_a_state_dict(tmp_path: Path) -> None:
    """The same weights as an example checkpoint and as a plain state dict, the same --seed:
    the same result. A state dict built a second model (the classifier's) first, which drew
    random numbers before the classifier's init and the augmentations."""
    import_examples()
    import harness
    import linear_eval
    from data import make_shapes

    run("moco_v2.py", *V12, "--max-steps", "1", "--output-dir", str(tmp_path / "run"))
    (path,) = (tmp_path / "run").glob("checkpoint_*.pt")
    ckpt = torch.load(path, weights_only=True)
    state, _ = linear_eval.pretrained_backbone(ckpt, "project", False, "small_cnn")
    # BatchNorm statistics of the images: after 1 step they are still the initial ones, the
    # features nearly the same for every image, and any classifier predicts one class
    features, _ = harness.backbone("small_cnn", 32)
    features.load_state_dict(state)
    for m in features.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # the average over the batch
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        features.train()((make_shapes(256, 32, seed=5)[0] / 255 - mean) / std)
    state = features.state_dict()
    ckpt["model"] = {**ckpt["model"], **{f"0.{k}": v for k, v in state.items()}}
    torch.save(ckpt, project := tmp_path / "checkpoint.pt")
    torch.save(state, plain := tmp_path / "backbone.pth")
    # a small lr: the classifier stays near its initialisation, which decides the accuracy
    flags = [*FLAGS, "--image-size", "32", "--shapes-val", "200", "--lr", "0.01", "--seed", "1",
             "--arch", "small_cnn", "--data", "shapes"]  # fmt: skip
    results = []
    for src, out in ((project, tmp_path / "a"), (plain, tmp_path / "b")):
        run("linear_eval.py", *flags, "--pretrained", str(src), "--output-dir", str(out))
        result = json.loads((out / "linear_eval.json").read_text())
        results.append({k: result[k] for k in ("top1", "top5", "images")})
    assert results[0] == results[1] and results[0]["images"] == 200, results


def test_the_protocol_is_the_checkpoints_unless_asked(tmp_path: Path) -> None:
    """A state dict always got the v1/v2 protocol (lr 30, steps), a v3 backbone's too: the
    protocol is now a flag whose default is the checkpoint's recipe."""
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "fc." not in k}
    torch.save(state, src := tmp_path / "resnet18.pth")
    torch.save(official("moco_v2_resnet50"), v2 := tmp_path / "moco_v2.pth.tar")
    flags = [f for f in FLAGS if f not in ("--epochs", "1")]  # the protocol's own epochs
    for extra, protocol, lr in (
        (["--arch", "resnet18", "--pretrained", str(src)], "v1v2", 30.0),
        (["--arch", "resnet18", "--pretrained", str(src), "--protocol", "v3"], "v3", 0.1),
        (["--pretrained", str(v2), "--protocol", "v3", "--lr", "0.2"], "v3", 0.2),
        (["--pretrained", str(v2)], "v1v2", 30.0),
    ):
        shown = json.loads(run("linear_eval.py", *flags, *extra, "--print-config").stdout)
        assert (shown["protocol"], shown["lr"]) == (protocol, lr), extra
    wrong = run("linear_eval.py", *FLAGS, "--pretrained", str(src), "--protocol", "v2", check=False)
    assert wrong.returncode != 0 and "argument --protocol: invalid choice: 'v2'" in wrong.stderr


def test_a_plain_vit_state_dict_is_evaluated_with_num_heads(tmp_path: Path) -> None:
    """A ViT's state dict records no head count, and linear_eval had no way to give one."""
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", depth=4, num_heads=3, img_size=64, patch_size=8, num_classes=0
    )
    torch.save(vit.state_dict(), src := tmp_path / "vit_tiny.pth")
    flags = [*FLAGS, "--arch", "vit_tiny", "--pretrained", str(src)]
    for extra, expected in (
        ([], "number of attention heads is not recorded"),
        (["--num-heads", "5"], "num_heads must divide the ViT's width 192, got 5"),
        (["--num-heads", "3", "--arch", "resnet18"], "--num-heads applies to vit_tiny"),
    ):
        refused = run("linear_eval.py", *flags, *extra, check=False)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode != 0 and len(lines) == 1 and expected in lines[0], lines
    result = run("linear_eval.py", *flags, "--num-heads", "3", "--output-dir", str(tmp_path))
    assert "backbone unchanged" in result.stdout
    assert json.loads((tmp_path / "linear_eval.json").read_text())["images"] == 32  # all held out


def test_two_processes_say_the_result_once(tmp_path: Path) -> None:
    """Every rank evaluates the whole held-out split with the same classifier (DDP): each
    printed the result line."""
    run("moco_v2.py", *V12, "--max-steps", "1", "--output-dir", str(tmp_path / "pre"))
    (ckpt,) = (tmp_path / "pre").glob("checkpoint_*.pt")
    out = tmp_path / "eval"
    ranks = run_2p_ranks("linear_eval.py", *FLAGS, "--pretrained", str(ckpt), "--output-dir",
                         str(out))  # fmt: skip
    said = [line for stdout, _ in ranks for line in stdout.splitlines() if "top-1" in line]
    assert len(said) == 1 and "linear evaluation of" in said[0] and said[0] in ranks[0][0]
    result = json.loads((out / "linear_eval.json").read_text())
    assert f"top-1 {result['top1']:.1f}%" in said[0] and result["images"] == 32
