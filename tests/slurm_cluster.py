"""A real two-node Slurm cluster on this machine, for the cluster tests: munge, slurmctld and two
slurmd daemons (``slurmd -N n1``, ``-N n2``), with their configuration, state and logs in one
temporary folder. Each slurmd runs in a network namespace of its own, joined to the others by a
bridge, so that its jobs talk to the other node's over a network as between machines; where
namespaces cannot be made (no CAP_NET_ADMIN, no iproute2), the nodes share 127.0.0.1 instead. It
stops exactly the daemons it started and deletes exactly the namespaces and links it made."""

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
LOOPBACK = "127.0.0.1"


def missing_daemons() -> list[str]:
    """The programs the cluster needs that are not installed (Debian: slurm-wlm and munge)."""
    return [name for name in (*DAEMONS, "mungekey", "sbatch") if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class NodeNetwork:
    """One network namespace a node, each with a veth pair whose other end is on a bridge in this
    namespace: the nodes at 10.213.<n>.11, .12, ..., this namespace (slurmctld, the test's clients) at
    10.213.<n>.1. The interface in every node is called ``INTERFACE``. Names carry this process's id,
    so that two test sessions do not meet; :meth:`delete` removes exactly what :meth:`create` made."""

    INTERFACE = "eth0"

    def __init__(self, nodes: tuple[str, ...]) -> None:
        tag = f"dd{os.getpid()}"  # interface names: at most 15 characters
        self.bridge = f"{tag}br"
        self.namespaces = {node: f"deformable-detr-tests-{os.getpid()}-{node}" for node in nodes}
        self._host_ends = {node: f"{tag}{node}" for node in nodes}
        self._made: list[list[str]] = []  # the commands that delete what was made, in the order made
        self.host_address = ""
        self.addresses: dict[str, str] = {}

    def create(self) -> None:
        """Raises ``OSError`` (no ``ip``) or ``CalledProcessError`` (no permission, no netns) with
        nothing left behind."""
        try:
            subnet = f"10.213.{self._free_subnet()}"
            self.host_address = f"{subnet}.1"
            self._ip(["link", "add", self.bridge, "type", "bridge"], undo=["link", "del", self.bridge])
            self._ip(["addr", "add", f"{self.host_address}/24", "dev", self.bridge])
            self._ip(["link", "set", self.bridge, "up"])
            for number, (node, namespace) in enumerate(self.namespaces.items(), start=11):
                host_end = self._host_ends[node]
                self._ip(["netns", "add", namespace], undo=["netns", "del", namespace])
                # Deleting one end deletes the pair at once; a namespace's deletion frees its end later.
                self._ip(["link", "add", host_end, "type", "veth", "peer", "name", self.INTERFACE, "netns", namespace],
                         undo=["link", "del", host_end])
                self._ip(["link", "set", host_end, "master", self.bridge, "up"])
                self.addresses[node] = f"{subnet}.{number}"
                inside = ["-n", namespace]
                self._ip([*inside, "addr", "add", f"{self.addresses[node]}/24", "dev", self.INTERFACE])
                self._ip([*inside, "link", "set", self.INTERFACE, "up"])
                self._ip([*inside, "link", "set", "lo", "up"])
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        for undo in reversed(self._made):
            subprocess.run(["ip", *undo], capture_output=True, timeout=30)
        self._made.clear()

    def enter(self, node: str) -> list[str]:
        """The command prefix that runs a program in ``node``'s namespace. Not ``ip netns exec``: it
        mounts a /sys of the namespace's own, without the cgroup file systems slurmd needs."""
        return ["nsenter", f"--net=/var/run/netns/{self.namespaces[node]}", "--"]

    def _ip(self, arguments: list[str], undo: list[str] | None = None) -> None:
        result = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, f"ip {' '.join(arguments)}", stderr=result.stderr)
        if undo:
            self._made.append(undo)

    @staticmethod
    def _free_subnet() -> int:
        """A 10.213.<n>.0/24 no interface here is on (another session's bridge, say)."""
        used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True,
                              timeout=30).stdout
        start = os.getpid() % 250
        for offset in range(250):
            candidate = (start + offset) % 250 + 1
            if f" 10.213.{candidate}." not in used:
                return candidate
        raise RuntimeError("no free subnet in 10.213.0.0/16")


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
        self.network: NodeNetwork | None = None  # None: every node at 127.0.0.1
        self.without_namespaces = ""  # why the nodes share 127.0.0.1, if they do

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exception: object) -> None:
        self.stop()

    def address(self, node: str | None = None) -> str:
        """The address of ``node`` (None: slurmctld's, the test's own)."""
        if self.network is None:
            return LOOPBACK
        return self.network.host_address if node is None else self.network.addresses[node]

    def start(self, timeout: float = 60) -> None:
        try:
            self._make_network()
            munge_socket = self._start_munge()
            self._write_conf(munge_socket)
            self._controller = self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
            self._daemons.append(self._controller)
            for node in NODES:
                enter = self.network.enter(node) if self.network else []
                self._daemons.append(self._spawn([*enter, "slurmd", "-D", "-f", str(self.conf), "-N", node],
                                                 f"slurmd-{node}"))
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
        if self.network is not None:
            self.network.delete()
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

    def _make_network(self) -> None:
        network = NodeNetwork(NODES)
        try:
            network.create()
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            self.without_namespaces = f"{getattr(error, 'cmd', 'ip')}: {detail.strip()}"
            return
        self.network = network
        # gloo binds to the address the host name resolves to, 127.0.0.1 here, in every node alike: a
        # real cluster whose host names do not resolve to the nodes' network needs the same.
        self.environment["GLOO_SOCKET_IFNAME"] = NodeNetwork.INTERFACE

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
        # Each slurmd in a namespace of its own could share one port; distinct ones serve both layouts.
        nodes = "\n".join(f"NodeName={node} NodeAddr={self.address(node)} Port={free_port()} "
                          f"CPUs={self.cpus_per_node} State=UNKNOWN" for node in NODES)
        self.conf.write_text(f"""\
ClusterName=tests
SlurmctldHost=localhost({self.address()})
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

        _wait(idle, timeout, "two idle nodes", lambda: "\n".join(
            f"{name}: {self.log(name)[-1000:]}" for name in ("slurmctld", *(f"slurmd-{node}" for node in NODES))))

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
