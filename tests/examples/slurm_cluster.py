"""A one-machine Slurm cluster for the tests (Debian's ``slurm-wlm``, which ``.ci/run``
installs): munge, ``slurmctld`` and one ``slurmd`` started as root with a configuration
written into a temporary folder, stopped at the end. The node is this machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def available() -> str | None:
    """Why a cluster cannot be started here, or ``None`` if it can."""
    commands = ("munge", "munged", "slurmctld", "slurmd", "sbatch")
    missing = [c for c in commands if not shutil.which(c)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; .ci/run installs it)"
    if os.geteuid() != 0:
        return "starting Slurm's daemons needs root"
    return None


def _config(folder: Path, node: str, cpus: int) -> str:
    return "\n".join(
        [
            "ClusterName=tests",
            f"SlurmctldHost={node}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ReturnToService=2",
            "MpiDefault=none",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            f"NodeName={node} CPUs={cpus} State=UNKNOWN",
            f"PartitionName=tests Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def cluster(folder: Path) -> Iterator[dict[str, str]]:
    """Start the cluster; yield the environment in which ``sbatch`` reaches it."""
    node = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, node, os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    # a socket left by a munged that is gone refuses every credential: ask munge itself
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
        subprocess.run(["munge", "-n"], check=True, capture_output=True)
    daemons = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            daemons.append(
                subprocess.Popen(
                    [daemon, "-D", "-f", str(conf)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 60
        while True:  # the node registers as idle within a few seconds
            state = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                break
            if time.monotonic() > deadline:
                logs = "".join(p.read_text() for p in folder.glob("*.log"))
                raise RuntimeError(f"the Slurm node did not come up ({state!r}):\n{logs[-3000:]}")
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
