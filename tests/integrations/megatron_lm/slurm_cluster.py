"""A private one-host Slurm cluster (munged + slurmctld + slurmd on loopback) for tests.

    python tests/integrations/megatron_lm/slurm_cluster.py start /tmp/slurm   # prints `export SLURM_CONF=...`
    python tests/integrations/megatron_lm/slurm_cluster.py stop /tmp/slurm

Installs Debian's slurm-wlm and munge with apt-get when they are missing (CI machines start
bare; needs root). Everything the daemons write (config, sockets, pid files, state, logs) lives
under the given directory, on ports of its own, so it never touches a system Slurm or munge.
Settings from docs/cpu_testing.md: proctrack/linuxproc, task/none, select/cons_tres.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "sinfo", "scontrol")


def free_port() -> int:
    """A loopback port nothing listens on now (the daemons bind it when they start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None
            and not Path(f"/usr/sbin/{d}").exists()]


def install() -> None:
    """apt-get install slurm-wlm munge (about 10-40 s); raises when that is not possible."""
    if not missing():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("Slurm is not installed and cannot be installed here "
                           "(needs root and apt-get): apt-get install slurm-wlm munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


CONFIG = """\
ClusterName=momci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool
StateSaveLocation={root}/state
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost CPUs={cpus} State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def start(root: Path, timeout: float = 30.0) -> dict:
    """Start the cluster; returns the environment variables a client needs (SLURM_CONF)."""
    install()
    root = Path(root).resolve()
    for sub in ("munge", "spool", "state", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses to run as root and wants its key and directories owned by its user.
    shutil.copy("/etc/munge/munge.key", root / "munge" / "munge.key")
    os.chmod(root, 0o755)
    shutil.chown(root / "munge", "munge", "munge")
    shutil.chown(root / "munge" / "munge.key", "munge", "munge")
    os.chmod(root / "munge", 0o755)  # clients need to reach the socket
    os.chmod(root / "munge" / "munge.key", 0o600)
    m = root / "munge"
    if subprocess.run(["runuser", "-u", "munge", "--", "test", "-w", str(m)]).returncode:
        raise RuntimeError(f"user munge cannot write {m}: every parent of {root} must be "
                           f"world-traversable (e.g. a directory made with mkdtemp in /tmp)")
    subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={m}/munge.socket",
                    f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                    f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], check=True)
    conf = root / "slurm.conf"
    conf.write_text(CONFIG.format(root=root, cpus=os.cpu_count() or 1,
                                  ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run([_sbin("slurmctld"), "-f", str(conf)], env=env, check=True)
    subprocess.run([_sbin("slurmd"), "-f", str(conf), "-N", "localhost"], env=env, check=True)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                               text=True).stdout.strip()
        if state == "idle":
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.2)
    stop(root)
    raise RuntimeError(f"Slurm node did not become idle in {timeout:.0f} s (state {state!r}); "
                       f"logs in {root}/log")


def _kill_from_pidfile(pidfile: Path) -> None:
    # Read the pid before signalling: the daemon removes its pid file when it exits.
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def stop(root: Path) -> None:
    """Stop the daemons started by `start(root)`, by the pids they wrote."""
    root = Path(root).resolve()
    for pidfile in (root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid"):
        _kill_from_pidfile(pidfile)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    if sys.argv[1] == "start":
        print(f"export SLURM_CONF={start(Path(sys.argv[2]))['SLURM_CONF']}")
    else:
        stop(Path(sys.argv[2]))
