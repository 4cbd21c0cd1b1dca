"""A real two-node Slurm cluster on this machine, for the cluster tests: munge, slurmctld and two
slurmd daemons (``slurmd -N n1``, ``-N n2``, both at 127.0.0.1 on ports of their own), with their
configuration, state and logs in one temporary folder. It stops exactly the daemons it started."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_daemons() -> list[str]:
    """The programs the cluster needs that are not installed (Debian: slurm-wlm and munge)."""
    return [name for name in (*DAEMONS, "mungekey", "sbatch") if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """Started by :meth:`start`, stopped by :meth:`stop` (or as a context manager). ``environment`` is
    what a client (``sbatch``, ``squeue``, ``scontrol``) needs to reach it."""

    def __init__(self, cpus_per_node: int = 2) -> None:
        # Not under pytest's tmp_path: munged runs as the munge user, who cannot enter root's 0700 folders.
        self.root = Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.cpus_per_node = cpus_per_node
        self._daemons: list[subprocess.Popen] = []  # in the order started
        self._controller: subprocess.Popen | None = None
        self.environment = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exception: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        try:
            munge_socket = self._start_munge()
            self._write_conf(munge_socket)
            self._controller = self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
            self._daemons.append(self._controller)
            for node in NODES:
                self._daemons.append(self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}"))
            self._wait_for_idle_nodes(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this cluster started, by their pids, newest first."""
        if self._controller is not None and self._controller.poll() is None:
            subprocess.run(["scancel", "--user", getpass.getuser()], env=self.environment, capture_output=True, timeout=30)
            self._wait_for_no_jobs(timeout=60)
        for daemon in reversed(self._daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        self._daemons.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self, name: str) -> str:
        """A daemon's log: ``slurmctld``, ``slurmd-n1``, ``munged``, ..."""
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def run(self, *command: str, timeout: float = 60) -> str:
        """A client command's output; raises with its stderr if it fails."""
        result = subprocess.run(command, env=self.environment, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: status {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def job_field(self, job: str, field: str) -> str:
        """One ``Key=Value`` field of ``scontrol show job``."""
        for token in self.run("scontrol", "show", "job", "--oneliner", job).split():
            key, _, value = token.partition("=")
            if key == field:
                return value
        raise KeyError(f"job {job} has no field {field}")

    def _start_munge(self) -> Path:
        folder = self.root / "munge"
        folder.mkdir()
        key = folder / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        for path in (folder, key):
            shutil.chown(path, "munge", "munge")
        folder.chmod(0o755)  # slurm's clients, run as root, reach the socket in it
        munge_socket = folder / "munge.socket"
        command = ["runuser", "-u", "munge", "--", "munged", "--foreground", "--socket", str(munge_socket),
                   "--key-file", str(key), "--pid-file", str(folder / "munged.pid"),
                   "--seed-file", str(folder / "munged.seed"), "--log-file", str(folder / "munged.log")]
        self._daemons.append(self._spawn(command, "munged-stdout"))
        _wait(lambda: munge_socket.exists(), 20, "munged's socket", lambda: (folder / "munged.log").read_text())
        return munge_socket

    def _write_conf(self, munge_socket: Path) -> None:
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(exist_ok=True)
        nodes = "\n".join(f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} CPUs={self.cpus_per_node} "
                          f"State=UNKNOWN" for node in NODES)
        self.conf.write_text(f"""\
ClusterName=tests
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/state/slurmctld.pid
SlurmdPidFile={self.root}/spool/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/builtin
# Scheduling and cleanup without the production pauses: a test waits for each of them.
SchedulerParameters=sched_interval=1
MessageTimeout=10
KillWait=30
MinJobAge=300
{nodes}
PartitionName=tests Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.root / f"{log_name}.out", "wb")  # noqa: SIM115 (the daemon holds it; closed when it exits)
        with log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.environment,
                                    start_new_session=True)

    def _wait_for_idle_nodes(self, timeout: float) -> None:
        def idle() -> bool:
            result = subprocess.run(["sinfo", "--noheader", "--Node", "--format", "%N %t"], env=self.environment,
                                    capture_output=True, text=True, timeout=30)
            states = dict(line.split() for line in result.stdout.splitlines())
            return all(states.get(node) == "idle" for node in NODES)

        _wait(idle, timeout, "two idle nodes", lambda: self.log("slurmctld")[-2000:])

    def _wait_for_no_jobs(self, timeout: float) -> None:
        def none_left() -> bool:
            result = subprocess.run(["squeue", "--noheader"], env=self.environment, capture_output=True, text=True,
                                    timeout=30)
            return result.returncode == 0 and not result.stdout.strip()

        try:
            _wait(none_left, timeout, "the jobs to end", lambda: "")
        except TimeoutError:
            pass  # the daemons are stopped all the same


def _wait(condition, timeout: float, what: str, diagnosis) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s: {diagnosis()}")
        time.sleep(0.5)
