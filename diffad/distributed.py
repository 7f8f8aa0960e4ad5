"""Several processes under torchrun: the process-group helpers of training and ``reproduce``.

``torchrun --nproc_per_node N -m diffad train ...`` starts N processes and tells each its place
through the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). Without ``WORLD_SIZE`` (a plain ``python -m diffad``), or with one process,
nothing here does anything: :func:`process_group` yields the usual device and training runs
exactly as it always did.

Under torchrun each process takes the GPU ``cuda:LOCAL_RANK`` and talks to the others over NCCL
(gloo on the CPU). Two timeouts bound every wait, so that a rank that died or hung stops the
run with :class:`PeerLost` (a clear message) instead of leaving the others stuck:

* ``DIFFAD_DDP_TIMEOUT`` (seconds, default 300): how long a collective of the training step (the
  gradient all-reduce, the loss average) waits for the other ranks.
* ``DIFFAD_DDP_WAIT`` (seconds, default 48 hours): how long a rank waits at a point where the
  others legitimately take long: rank 0 writing a checkpoint or downloading the initial weights,
  and, in ``reproduce``, the ranks done with their categories waiting for the slowest one.
  A rank that *dies* is noticed at once all the same: its connections close.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from diffad.device import pick_device

__all__ = [
    "PeerLost", "launched", "is_distributed", "rank", "local_rank", "world_size", "is_main", "device_for",
    "init", "destroy", "process_group", "barrier", "wait_for_all", "in_turn", "all_sum", "peer_errors",
    "timeout_seconds", "TIMEOUT_ENV", "WAIT_ENV",
]

TIMEOUT_ENV = "DIFFAD_DDP_TIMEOUT"
WAIT_ENV = "DIFFAD_DDP_WAIT"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_WAIT_S = 48 * 3600.0

_wait_group = None  # a gloo group for the long waits (monitored barriers), beside the default group

# What gloo and NCCL put in the RuntimeErrors they raise when a peer is gone or silent.
_PEER_ERROR = re.compile(r"gloo|nccl|monitoredBarrier|connection (closed|reset|refused)|timed out|broken pipe|socket",
                         re.IGNORECASE)


class PeerLost(RuntimeError):
    """Another process of the run died or stopped answering: this one stops too."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def launched() -> bool:
    """Started by torchrun (or with its environment) as one of several processes."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_distributed() -> bool:
    """A process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def timeout_seconds(name: str = TIMEOUT_ENV) -> float:
    """A timeout from the environment (``DIFFAD_DDP_TIMEOUT`` or ``DIFFAD_DDP_WAIT``), else its default."""
    default = DEFAULT_TIMEOUT_S if name == TIMEOUT_ENV else DEFAULT_WAIT_S
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} takes seconds, e.g. {name}=600; got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"{name} must be positive seconds, got {value!r}")
    return seconds


def device_for(device=None) -> torch.device:
    """The device of this process: under torchrun with CUDA, ``cuda:LOCAL_RANK`` unless an index is given.

    With more processes than GPUs on a node (``reproduce`` only: DDP over NCCL needs one GPU each)
    the processes share them in turn.
    """
    device = pick_device(device)
    if launched() and device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        device = torch.device("cuda", local_rank() % count if count else local_rank())
    return device


def init(device=None, backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (once); returns this process's device.

    ``backend`` defaults to NCCL on a GPU and gloo on the CPU. A second, gloo group serves the
    long waits (:func:`wait_for_all`) whatever the backend.
    """
    global _wait_group
    device = device_for(device)
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    per_node = _env_int("LOCAL_WORLD_SIZE", 1)
    if backend == "nccl" and per_node > torch.cuda.device_count():
        raise ValueError(f"{per_node} processes on this node but {torch.cuda.device_count()} GPU(s): training one "
                         f"model over NCCL takes one GPU per process; start torchrun with --nproc_per_node "
                         f"{torch.cuda.device_count()}")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds(TIMEOUT_ENV)))
    _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds(WAIT_ENV)))
    return device


def destroy() -> None:
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


@contextmanager
def process_group(device=None, backend: str | None = None):
    """``with process_group(device) as device:``: under torchrun, the process group for the block.

    Yields this process's device. Outside torchrun, or when a group is already up (then the
    caller that made it ends it), it only yields the device. The group is ended when the block
    ends normally; after an error it is left to the process's exit (ending a group whose peer is
    gone can itself wait).
    """
    if not launched() or dist.is_initialized():
        yield device_for(device)
        return
    device = init(device, backend)
    yield device
    destroy()


def barrier() -> None:
    """All ranks meet here, within ``DIFFAD_DDP_TIMEOUT``."""
    if not is_distributed():
        return
    with peer_errors("barrier"):
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def wait_for_all(what: str = "the other ranks") -> None:
    """All ranks meet here, waiting up to ``DIFFAD_DDP_WAIT``; a rank that died is reported at once."""
    if not is_distributed():
        return
    group = _wait_group
    if group is None:  # a group made by someone else: a gloo side group for the long wait
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds(WAIT_ENV)))
    with peer_errors(f"waiting for {what}", WAIT_ENV):
        dist.monitored_barrier(group, timeout=timedelta(seconds=timeout_seconds(WAIT_ENV)), wait_all_ranks=True)


def in_turn(fn):
    """``fn()`` on every rank, rank 0 first, then the first rank of each other node, then the rest.

    For work that fills a cache (a download): one process does it per cache, the others find it done.
    """
    if not is_distributed():
        return fn()
    result = None
    for turn in (rank() == 0, rank() != 0 and local_rank() == 0, local_rank() != 0):
        if turn:
            result = fn()
        wait_for_all("a rank filling a cache")
    return result


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (in place, and returned); the tensor itself in one process."""
    if is_distributed():
        with peer_errors("all_reduce"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def is_peer_error(error: BaseException) -> bool:
    """Does this error come from the process group losing a peer (rather than from this process)?"""
    if isinstance(error, PeerLost):
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError) and bool(
        _PEER_ERROR.search(str(error)))


@contextmanager
def peer_errors(what: str = "training", env: str = TIMEOUT_ENV):
    """Turn a collective's failure inside the block into :class:`PeerLost` saying what happened."""
    try:
        yield
    except RuntimeError as error:
        if not is_distributed() or not is_peer_error(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PeerLost(
            f"rank {rank()} of {world_size()}: lost contact with another rank while {what}: it died, or did not "
            f"answer within {timeout_seconds(env):g} s ({env}); stopping this rank too. Look in the other ranks' "
            f"output for the first error. A training run resumes from its last checkpoint, with any number of "
            f"processes. ({first})"
        ) from error
