"""A real one-node Slurm cluster on this machine, for tests: munged, slurmctld and slurmd from Debian's slurm-wlm
and munge (.ci/run installs them), started as root with a private config, state and ports; stopped and removed
afterwards. Nothing is mocked: sbatch, squeue and the job array are Slurm's own.

    with one_node_slurm(tmp_path) as cluster:
        env = cluster.env  # SLURM_CONF pointing at the private config, for sbatch / squeue / submitit
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    conf: Path
    procs: list[subprocess.Popen]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def squeue(self, job: str) -> str:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], env=self.env, capture_output=True,
                              text=True).stdout.strip()

    def wait_done(self, job: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.squeue(job):
            assert time.monotonic() < deadline, f"slurm job {job} still queued or running: {self.squeue(job)}"
            time.sleep(1)


@contextmanager
def one_node_slurm(folder: Path, cpus: int | None = None) -> Iterator[Cluster]:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    assert not missing, f"{', '.join(missing)} missing: apt-get install slurm-wlm munge (as .ci/run does)"
    assert os.geteuid() == 0, "a private Slurm cluster needs root (CI runs as root)"
    root = folder / "slurm"
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cpus = cpus or os.cpu_count() or 1
    host = socket.gethostname()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=hw4test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    try:
        munge = subprocess.Popen(["munged", "-F", "--force", f"--key-file={key}", f"--socket={socket_path}",
                                  f"--pid-file={root / 'munge' / 'munged.pid'}",
                                  f"--seed-file={root / 'munge' / 'seed'}",
                                  f"--log-file={root / 'log' / 'munged.log'}"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(munge)
        _wait(lambda: socket_path.exists(), "munged", root)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["slurmd", "-D"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                               text=True).stdout, "slurmctld + slurmd (node idle)", root)
        yield Cluster(root, conf, procs)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(ready, what: str, root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((root / "log").glob("*.log")))
            raise AssertionError(f"{what} did not start within {timeout:.0f} s\n{logs}")
        time.sleep(0.3)
