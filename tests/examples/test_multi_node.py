"""The launches of docs/guides/multi-node.md, on the CPU with gloo, each against the run of
two plain processes on one node, bit for bit: the guide's ``torchrun`` line with two agents
(two "nodes" of one process on 127.0.0.1) and a process killed (SIGKILL) after a checkpoint,
which torchrun restarts and which resumes (MoCo v2 and v3), and the Slurm script
(``examples/multi_node.sbatch``) on a one-machine Slurm cluster."""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import slurm_cluster
from example_runner import EXAMPLES, checkpoint, differences, free_port, losses, run_2p
from test_resume_distributed import V2, V3

pytestmark = pytest.mark.xdist_group("multi_node")

SBATCH = EXAMPLES / "multi_node.sbatch"
GUIDE = EXAMPLES.parent / "docs" / "guides" / "multi-node.md"
LONGER = ["--epochs", "3"]  # 9 steps: time to kill a process after the first checkpoint
FINAL = ("model", "key_encoder", "queue", "optimizer", "rng", "step")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, list[str]], Path]:
    """The run of 2 plain processes on one node, never interrupted, made once per script."""
    made: dict[str, Path] = {}

    def get(script: str, flags: list[str]) -> Path:
        if script not in made:
            made[script] = tmp_path_factory.mktemp("plain") / "run"
            run_2p(script, *flags, *LONGER, "--output-dir", str(made[script]))
        return made[script]

    return get


def guide_launch(script: str, flags: list[str], out: Path, port: int) -> tuple[dict, list]:
    """The guide's torchrun line (its bash block with ``--rdzv-id RUN``), for 2 nodes of 1
    process on 127.0.0.1: its environment and its command, ``script`` and the tests' small
    ``flags`` in place of the guide's ImageNet ones."""
    blocks = re.findall(r"^```bash\n(.*?)^```", GUIDE.read_text(), re.S | re.M)
    (line,) = [b for b in blocks if "--rdzv-id RUN" in b]
    argv = shlex.split(line.replace("\\\n", " "))
    env = dict(a.split("=", 1) for a in argv if re.fullmatch(r"[A-Z_]+=\S*", a))
    argv = [a for a in argv if not re.fullmatch(r"[A-Z_]+=\S*", a)]
    values = {"--nnodes": "2", "--nproc-per-node": "1", "--rdzv-endpoint": f"127.0.0.1:{port}",
              "--rdzv-id": f"test{port}", "--output-dir": str(out)}  # fmt: skip
    argv = [values.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
    at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    assert argv[at] == "examples/moco_v2.py" and argv[at + 1 : at + 3] == [
        "--data",
        "/data/imagenet",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *argv[1:at]]
    return env, [*torchrun, str(EXAMPLES / script), *argv[at + 3 :], *flags]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
            ):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


def two_agents(script: str, flags: list[str], out: Path, *, kill: bool) -> str:
    """Run the guide's line as 2 agents; with ``kill``, SIGKILL the second agent's process
    once the first checkpoint is written. Returns both agents' output."""
    port = free_port()
    env, command = guide_launch(script, flags, out, port)
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=EXAMPLES,
        )
        for _ in range(2)
    ]
    try:
        if kill:
            deadline = time.monotonic() + 300
            while not list(out.glob("checkpoint_*.pt")):
                assert time.monotonic() < deadline and agents[1].poll() is None, "no checkpoint"
                time.sleep(0.02)
            (worker,) = [  # the second node's one process
                pid
                for pid in children(agents[1].pid)
                if script in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            ]
            os.kill(worker, signal.SIGKILL)
        outputs = [a.communicate(timeout=600)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    text = "".join(outputs)
    assert all(a.returncode == 0 for a in agents), text[-6000:]
    return text


@pytest.mark.parametrize(
    ("script", "flags"), [("moco_v2.py", V2), ("moco_v3.py", V3)], ids=["v2", "v3"]
)
def test_the_guides_torchrun_line_survives_a_killed_process(
    script: str, flags: list[str], tmp_path: Path, plain: Callable[[str, list[str]], Path]
) -> None:
    expected = plain(script, flags)
    nodes = tmp_path / "nodes"
    # killed after the first checkpoint: a --save-every one inside the first epoch (step 2 of 3)
    output = two_agents(script, [*flags, *LONGER, "--save-every", "2"], nodes, kill=True)
    assert "no checkpoint in" in output  # the guide's --resume auto, at the first start
    # torchrun saw the process die, restarted both, and they resumed
    assert "exitcode: -9" in output and "resumed from" in output, output[-6000:]
    resumed_at = int(re.findall(r"resumed from \S+ at step (\d+)", output)[0])
    assert 2 <= resumed_at < 9
    assert losses(nodes) == losses(expected) and len(losses(expected)) == 9
    done, want = checkpoint(nodes), checkpoint(expected)
    keys = [k for k in FINAL if k in want]  # v3 has no queue
    assert not differences({k: done[k] for k in keys}, {k: want[k] for k in keys})


def test_the_sbatch_script_gives_the_run_of_two_plain_processes(
    tmp_path: Path, plain: Callable[[str, list[str]], Path]
) -> None:
    if reason := slurm_cluster.available():
        pytest.skip(reason)
    expected = plain("moco_v2.py", V2)
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
        # --ntasks-per-node 2, a habit for one task per GPU: srun still starts one agent
        # (with 2 agents on the node, one of them failed in torchrun's rendezvous)
        job = subprocess.run(
            ["sbatch", "--wait", "--nodes", "1", "--ntasks-per-node", "2", "--output", str(log),
             str(SBATCH), str(EXAMPLES / "moco_v2.py"), *V2, *LONGER, "--output-dir", str(slurm)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    output = log.read_text() if log.exists() else ""
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{output[-4000:]}"
    assert "starting from scratch" in output  # the script always passes --resume auto
    assert losses(slurm) == losses(expected) and len(losses(expected)) == 9
    done, want = checkpoint(slurm), checkpoint(expected)
    assert not differences({k: done[k] for k in FINAL}, {k: want[k] for k in FINAL})


def test_an_elastic_range_goes_on_without_a_lost_node(tmp_path: Path) -> None:
    """The guide's line with ``--nnodes 1:2``: the second node (its agent and its process)
    dies after a checkpoint; the first node's agent restarts its process, the rendezvous
    completes with one node, and the run resumes in a world of one and ends. (The node at
    --rdzv-endpoint hosts the rendezvous: it is the first one here, and its loss would end
    the job.)"""
    port, out = free_port(), tmp_path / "nodes"
    env, command = guide_launch("moco_v2.py", [*V2, *LONGER, "--save-every", "2"], out, port)
    command[command.index("--nnodes") + 1] = "1:2"
    at = next(i for i, a in enumerate(command) if a.endswith("moco_v2.py"))
    command[at:at] = ["--rdzv-conf", "last_call_timeout=10"]  # how long a round waits for more
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}

    def agent() -> subprocess.Popen[str]:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=EXAMPLES)  # fmt: skip

    first, deadline = agent(), time.monotonic() + 120
    try:
        while subprocess.run(["bash", "-c", f"echo > /dev/tcp/127.0.0.1/{port}"],
                             capture_output=True).returncode:  # fmt: skip
            assert time.monotonic() < deadline and first.poll() is None, "no rendezvous"
            time.sleep(0.1)  # the first node hosts the rendezvous store
        second = agent()
        try:
            while not list(out.glob("checkpoint_*.pt")):
                assert time.monotonic() < deadline and second.poll() is None, "no checkpoint"
                time.sleep(0.02)
            for pid in [*children(second.pid), second.pid]:  # the node: its process, its agent
                os.kill(pid, signal.SIGKILL)
            lost = second.communicate(timeout=60)[0]
        finally:
            second.kill()
        output = first.communicate(timeout=600)[0]
    finally:
        first.kill()
    assert "no checkpoint in" in lost, lost[-3000:]  # it had joined the first world of two
    assert first.returncode == 0, output[-6000:]
    assert "resumed from" in output, output[-6000:]
    assert "random states of 2 processes, this run has 1" in output  # now a world of one
    assert len(losses(out)) == 9 and all(math.isfinite(v) for v in losses(out))
    assert checkpoint(out)["step"] == 9
