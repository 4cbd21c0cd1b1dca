"""Several processes under torchrun: the one place that talks to the process group.

Every function works unchanged in a single process, where the collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Hashable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .files import LockHeld, exclusive_lock

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)


def is_distributed() -> bool:
    """Whether this process belongs to an initialised process group (``torch.distributed``)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 when it is the only process."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes there are; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process speaks for all of them: it alone writes files, logs and prints."""
    return rank() == 0


# torchrun's own wait for the nodes of a rendezvous (its c10d join_timeout).
RENDEZVOUS_TIMEOUT = 600.0


class RendezvousError(ConnectionError):
    """The processes did not all meet at the rendezvous endpoint in time."""


def setup_distributed(rendezvous_timeout: float = RENDEZVOUS_TIMEOUT) -> torch.device:
    """Join the torchrun process group if there is one; the device this process runs on.

    Raises:
        RendezvousError: naming the endpoint (``MASTER_ADDR:MASTER_PORT``), when not every process
            has joined within ``rendezvous_timeout`` seconds: a world that cannot form fails, not hangs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        _join(rendezvous_timeout)
        if rank() == 0 and _restarts_share_a_stale_store():
            print("warning: a group torchrun restarts may hang or fail on the failed group's addresses left in the "
                  "store they share (pytorch#135712): run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set",
                  file=sys.stderr, flush=True)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _join(rendezvous_timeout: float) -> None:
    endpoint = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        # The rendezvous init_process_group makes, with a timeout of its own: the group's timeout is
        # its collectives', which must allow for an evaluation on one process while others wait.
        with _native_stderr_silenced():
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(seconds=rendezvous_timeout)))
        # (Wrapped as init_process_group wraps the store it makes itself.)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.PrefixStore("default_pg", store),
                                rank=rank, world_size=world_size)  # fmt: skip
    except (dist.DistNetworkError, dist.DistStoreError) as error:
        raise RendezvousError(f"rendezvous at {endpoint}: not every process joined within {rendezvous_timeout:g} s "
                              f"({(str(error).splitlines() or [type(error).__name__])[0]})") from None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    # c10d's C++ code logs every failed attempt to reach the endpoint on the process's stderr, at a
    # level read from the environment when torch starts: silenced, for the one error said after them.
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def describe_world() -> str:
    """One line: the nodes, the processes, the backend and the host of rank 0 (collective)."""
    hosts = gather_objects(socket.gethostname())
    # torchrun's agents are its nodes; without torchrun, the hosts are.
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", len(set(hosts))))
    backend = dist.get_backend() if is_distributed() else "no process group"
    return f"world: {nodes} node(s), {world_size()} process(es), {backend}, rank 0 on {hosts[0]}"


def _restarts_share_a_stale_store() -> bool:
    # torchrun --max-restarts K sets TORCHELASTIC_MAX_RESTARTS; its workers use the agent's store,
    # shared across restarts without a prefix per attempt, unless the variable turns the sharing off.
    return os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def mean_over_processes(value: Tensor) -> Tensor:
    """``value`` averaged over the processes (collective); every process gets the same tensor."""
    if not is_distributed():
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / world_size()


def gather_objects(value: T) -> list[T]:
    """Every process's ``value`` (picklable), in rank order (collective)."""
    if not is_distributed():
        return [value]
    parts: list[T | None] = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def hosts_by_value(value: H) -> dict[H, list[str]]:
    """Each value the processes hold (picklable), with the hosts of the processes that hold it, in
    rank order (collective)."""
    hosts: dict[H, list[str]] = {}
    for host, held in gather_objects((socket.gethostname(), value)):
        if host not in hosts.setdefault(held, []):
            hosts[held].append(host)
    return hosts


def main_process_decides(value: T) -> T:
    """The main process's ``value`` (picklable), on every process (collective): for choices all must make alike."""
    if not is_distributed():
        return value
    decision = [value]
    dist.broadcast_object_list(decision, src=0)
    return decision[0]


def any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true where it is true on any process (collective): for a stop that one process's
    signal asks of all of them, and a choice only the main process's clock makes."""
    if not is_distributed():
        return flags
    values = torch.tensor(flags, dtype=torch.int32, device=_collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in values.tolist())


# Why every process must find what the main process writes in the output directory, for messages.
ONE_SHARED_FOLDER = "the output directory must be one folder that every node shares"


@contextlib.contextmanager
def folder_held(folder: Path, *, wait: float = 0.0, error: type[Exception] = RuntimeError) -> Iterator[None]:
    """Hold the output directory ``folder`` for the block by the main process's lock on its ``.lock``
    (:func:`~.files.exclusive_lock`, taken within ``wait`` seconds), so that one run at a time writes
    there; every process must then find in the lock what the main process wrote, or the folder is
    each node's own disk rather than one they share (collective).

    Raises:
        error: on every process, in one line, where another process holds the lock or some process
            does not find it.
    """
    with contextlib.ExitStack() as held:
        refusal = holder = None
        if is_main_process():
            try:
                holder = held.enter_context(exclusive_lock(folder / ".lock", wait=wait))
            except LockHeld as lock:
                still = f" still after {wait:g} s" if wait else ""
                refusal = (f"{folder}: another run is writing there{still} ({lock.holder} holds {lock.path}): let it "
                           f"end, or use another output directory")
        refusal, holder = main_process_decides((refusal, holder))
        if refusal is None:
            refusal = _lock_missed(folder / ".lock", holder)
        if refusal is not None:
            raise error(refusal)
        yield


def _lock_missed(lock: Path, holder: str | None) -> str | None:
    """Where some processes do not find in ``lock`` the ``holder`` the main process wrote there, as
    where each node writes a folder on its own disk, the line that says so; None where all find it,
    or no lock was taken (collective)."""
    if holder is None:
        return None
    try:
        found = lock.read_text()
    except FileNotFoundError:
        found = None
    elsewhere = [host for seen, hosts in hosts_by_value(found).items() if seen != holder for host in hosts]
    if not elsewhere:
        return None
    return (f"{lock.parent}: the processes on {', '.join(elsewhere)} do not find the lock the main process holds "
            f"there ({lock}, {holder}): {ONE_SHARED_FOLDER}")


def wait_for_all() -> None:
    """Return once every process has called this (collective): a process must not exit while the main
    one still writes the checkpoint, or torchrun would stop the group midway through the write."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share_buffers(model: nn.Module) -> None:
    """Give every process the main process's buffers (batch-norm running statistics), so that all of
    them evaluate the model it saves: DDP broadcasts buffers before each forward, and each process's
    last batch then left its own."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
