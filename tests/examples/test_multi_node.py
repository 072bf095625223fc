"""The launches of docs/guides/multi-node.md, on the CPU with gloo: the Slurm script
(``examples/multi_node.sbatch``) on a one-machine Slurm cluster gives the run that two
plain processes give, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_cluster
from example_runner import EXAMPLES, checkpoint, differences, free_port, losses, run_2p
from test_resume_distributed import V2

pytestmark = pytest.mark.xdist_group("multi_node")

SBATCH = EXAMPLES / "multi_node.sbatch"
STEPS = ["--max-steps", "4"]


def test_the_sbatch_script_gives_the_run_of_two_plain_processes(tmp_path: Path) -> None:
    if reason := slurm_cluster.available():
        pytest.skip(reason)
    plain = tmp_path / "plain"
    run_2p("moco_v2.py", *V2, *STEPS, "--output-dir", str(plain))
    slurm = tmp_path / "slurm"
    with slurm_cluster.cluster(tmp_path / "cluster") as env:
        env = {
            **env,
            "NPROC_PER_NODE": "2",
            "RDZV_PORT": str(free_port()),
            "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        }
        log = tmp_path / "job.log"
        job = subprocess.run(
            ["sbatch", "--wait", "--nodes", "1", "--output", str(log), str(SBATCH),
             str(EXAMPLES / "moco_v2.py"), *V2, *STEPS, "--output-dir", str(slurm)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    output = log.read_text() if log.exists() else ""
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{output[-4000:]}"
    assert "starting from scratch" in output  # the script always passes --resume auto
    assert losses(slurm) == losses(plain) and len(losses(plain)) == 4
    done, expected = checkpoint(slurm), checkpoint(plain)
    keys = ("model", "key_encoder", "queue", "optimizer", "rng", "step")
    assert not differences({k: done[k] for k in keys}, {k: expected[k] for k in keys})
