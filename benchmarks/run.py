"""The benchmark suite: every MoCo piece next to reference-style code, in one process.

    python benchmarks/run.py --device cpu            # what any CI-sized machine can run
    python benchmarks/run.py --device cuda           # the GPU targets (H100/H200)
    python benchmarks/run.py --device cpu --only ema,losses --out runs/bench.json

Sections: ``bandwidth`` (device copy bandwidth, for the floors), ``ema`` (momentum update
of ResNet-50 and ViT-B/16 parameter sets; on CUDA also captured in a CUDA graph),
``queue`` (``KeyQueue.push``), ``losses`` (``info_nce`` with N 256, D 128 and K 16,384 on
the CPU / 65,536 on CUDA, with peak extra memory on CUDA; ``symmetric_contrastive_loss``
with N 1,024) and ``step`` (a full MoCo v2 step against a backbone-only step: the share
of the MoCo machinery). Prints a table, writes JSON (default ``runs/bench-<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pieces
import torch
from common import copy_bandwidth_gbs, machine

SECTIONS = ("ema", "queue", "losses", "step")
TARGETS = {  # (piece prefix, implementation, column, bound, device): the targets
    "cuda": [
        ("EMA update", "MomentumEncoder.update()", "x floor", ("<=", 2.5)),
        ("EMA update", "MomentumEncoder.update() in a CUDA graph", "x floor", ("<=", 1.5)),
        ("info_nce", "info_nce", "vs reference", (">=", 3.0)),
        ("MoCo v2 step", "library step", "machinery % of backbone", ("<=", 2.0)),
    ],
    "cpu": [
        ("EMA update", "MomentumEncoder.update()", "vs reference", (">=", 2.0)),
        ("info_nce", "info_nce", "vs reference", (">=", 1.0)),
    ],
}


def check_targets(rows: list[dict[str, object]], device: str) -> list[dict[str, object]]:
    verdicts = []
    for prefix, impl, column, (op, bound) in TARGETS[device]:
        for row in rows:
            if str(row["piece"]).startswith(prefix) and row["implementation"] == impl:
                value = float(row[column])  # type: ignore[arg-type]
                met = value <= bound if op == "<=" else value >= bound
                verdicts.append(
                    {"piece": row["piece"], "implementation": impl, "measure": column,
                     "target": f"{op} {bound}", "measured": round(value, 3), "met": met}
                )  # fmt: skip
    return verdicts


def table(rows: list[dict[str, object]]) -> str:
    columns = ["piece", "implementation", "ms", "vs reference", "x floor", "peak extra MB",
               "machinery % of backbone"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.get(c) for c in columns]
        lines.append("| " + " | ".join(
            "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells
        ) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    p.add_argument("--out", default=None, help="JSON path (default runs/bench-<device>.json)")
    args = p.parse_args(argv)
    if unknown := set(args.only.split(",")) - set(SECTIONS):
        p.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_gbs(device)
    print(f"{machine()}\ncopy bandwidth {bandwidth:,.0f} GB/s", flush=True)
    sections = {
        "ema": lambda: pieces.ema(device, bandwidth),
        "queue": lambda: pieces.queue_push(device),
        "losses": lambda: pieces.contrastive_losses(device),
        "step": lambda: pieces.v2_step(device),
    }
    rows: list[dict[str, object]] = []
    for name in args.only.split(","):
        new = sections[name]()
        rows += new
        print(table(new), flush=True)
    verdicts = check_targets(rows, args.device)
    print("\n" + table(rows) + "\n")
    for v in verdicts:
        print(f"target {v['piece']} / {v['implementation']}: {v['measure']} {v['target']}: "
              f"measured {v['measured']} -> {'MET' if v['met'] else 'MISSED'}")  # fmt: skip
    out = Path(args.out or f"runs/bench-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "copy_GBps": bandwidth, "rows": rows, "targets": verdicts}
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
