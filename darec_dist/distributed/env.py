"""Process setup under torchrun (or plain python): backend, rank, device, seeds, clean teardown."""

from __future__ import annotations

import hashlib
import os
import sys
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from darec_dist.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int, local_world_size: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible")
        visible = torch.cuda.device_count()
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), at the first collective. (With one visible GPU
        # per process, as under a scheduler that sets CUDA_VISIBLE_DEVICES per task, the processes may well differ.)
        if visible > 1 and local_world_size > visible:
            raise ConfigError(f"{local_world_size} processes on this node and {visible} visible GPUs: NCCL runs one process "
                              f"per GPU; start at most {visible} (torchrun --nproc_per_node), or device=cpu")
        # A scheduler that shows each process only its own GPU (CUDA_VISIBLE_DEVICES per task) leaves one device.
        device = torch.device("cuda", local_rank % visible)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def rank_seed(seed: int, rank: int) -> int:
    return seed * 1000 + rank


def seed_everything(seed: int, rank: int) -> None:
    """Streams per rank, the same on every rerun. The trainer reseeds torch's itself: with rank 0's stream before
    it builds the dense part (the same initialisation everywhere), then with the run's seed, so that its later draws
    (RLMRec-Gen's mask positions) match across ranks."""
    random.seed(rank_seed(seed, rank))
    np.random.seed(rank_seed(seed, rank) % 2**32)
    torch.manual_seed(rank_seed(seed, rank))
    # The same seed must give the same run also with several threads per process: otherwise a gather's
    # backward (an index_put that accumulates, e.g. into the rows of a batch's distinct nodes) adds in
    # whatever order the threads finish. On CPU this cost nothing measurable; kernels without a deterministic
    # form warn instead of failing, and cuBLAS needs this workspace setting (read when CUDA first multiplies).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def distributed(device: str = "auto"):
    """Initialise the default process group from torchrun's environment; always destroy it on the way out.

    Without torchrun's variables this is a world of one, still with a (gloo or nccl)
    process group so that every code path runs the same collectives.
    """
    # Plain `python launch/train.py` is a world of one; DeepSpeed insists on these variables.
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, default)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    torch_device = pick_device(device, local_rank, int(os.environ["LOCAL_WORLD_SIZE"]))
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    # The dense heads' gradients hold subnormal floats, which x86 CPUs multiply about ten times slower
    # (seen as 20 ms weight-gradient matmuls that take 2 ms otherwise). Flushing them to zero only
    # changes magnitudes below 1e-38.
    torch.set_flush_denormal(True)
    _die_with_the_agent()
    created = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        # Collectives wait this long for a slow peer (rank 0 writing a checkpoint or the export) before failing.
        timeout = timedelta(minutes=30)
        dist.init_process_group(backend, store=_attempt_store(rank, world_size, timeout), rank=rank, world_size=world_size, timeout=timeout)
        created = True
    failed = True
    try:
        yield DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=torch_device)
        if created:
            # Leave together. A rank that tore its group down while rank 0 still wrote the run's
            # results aborted once in teardown (SIGABRT), and torchrun then reports a finished run as
            # failed (and would restart it under --max-restarts).
            dist.barrier()
        failed = False
    finally:
        if created and dist.is_initialized():
            if failed:
                _destroy_within(TEARDOWN_AFTER_ERROR_S)
            else:
                dist.destroy_process_group()


# After an error, how long the group's teardown may take. It waits for collectives still in flight (TorchRec's
# lookups start some without waiting), which peers that never join leave hanging until the 30-minute collective
# timeout: this rank would not exit, so torchrun could not stop the job (or restart it) for that long.
TEARDOWN_AFTER_ERROR_S = 30.0


def _destroy_within(seconds: float) -> None:
    """Destroy the process group, giving up after `seconds` (the process then exits with its group undestroyed)."""
    teardown = threading.Thread(target=dist.destroy_process_group, daemon=True, name="process-group-teardown")
    teardown.start()
    teardown.join(seconds)
    if teardown.is_alive():
        print(f"warning: rank {os.environ.get('RANK', 0)}: the process group did not tear down within {seconds:g} s (a "
              "collective still in flight); exiting without it", file=sys.stderr, flush=True)


def _agent_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, a client of the agents' store (it outlives restarts); otherwise None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout)


# The attempt number this process's group agreed on (_attempt_store); None before, or outside torchrun.
_attempt: int | None = None


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the agents' store with a prefix that this attempt's processes agree on; otherwise None (env://).

    The store outlives `--max-restarts` attempts and env:// adds no prefix, so restarted ranks could read the killed
    attempt's gloo addresses and fail with "connectFullMesh ... Connection refused" (an intermittent resume failure),
    or wait on them for good. The agents' restart counts cannot name the attempt across nodes: an agent restarted
    only because another node's worker failed keeps its count (a membership change), and its rank 0 read the killed
    attempt's keys while rank 1 wrote the new ones (every multi-node restart hung). Rank 0 numbers the attempt from
    a counter in the store and answers each rank's token under that number; a rank that read the number of an
    attempt whose rank 0 is gone gets no answer to its token and reads the number again.
    """
    store = _agent_store(world_size, timeout)
    if store is None:
        return None
    if rank == 0:
        attempt = store.add("darec_dist/attempts", 1)
        store.set("darec_dist/attempt", str(attempt))
        for other in range(1, world_size):  # each rank's token back: the answer a killed attempt's rank 0 gave is not it
            here = f"darec_dist/{attempt}/here/{other}"
            store.wait([here], timeout)
            store.set(f"darec_dist/{attempt}/go/{other}", store.get(here))
    else:
        token, attempt, deadline = os.urandom(8).hex(), None, time.monotonic() + timeout.total_seconds()
        while True:
            store.wait(["darec_dist/attempt"], timeout)
            current = int(store.get("darec_dist/attempt"))
            if current != attempt:
                attempt = current
                store.set(f"darec_dist/{attempt}/here/{rank}", token)
            answer = f"darec_dist/{attempt}/go/{rank}"
            if store.check([answer]) and store.get(answer).decode() == token:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: no rank 0 of this attempt answered on torchrun's store within {timeout}")
            time.sleep(0.05)
    global _attempt
    _attempt = attempt
    return dist.PrefixStore(f"darec_dist/{attempt}", store)


def first_to_report(message: str) -> bool:
    """Whether this process prints an error `message`: under torchrun, the first of this node's processes (this attempt's)
    to meet that message does (the agents' store counts them, by its text), so an error every rank meets alike (a bad
    config) is printed once per node, not once per rank, and ranks with different errors each print theirs; outside
    torchrun, or where the agents' store cannot be reached, always.

    Not rank 0 alone: torchrun stops the other processes as soon as it sees one exit, so a rank 0 slower to meet the
    error than another was stopped before it printed (no message at all in 3 of 10 launches on 2 processes).
    """
    try:
        store = _agent_store(int(os.environ.get("WORLD_SIZE", "1")), timedelta(seconds=10))
        if store is None:
            return True
        # Per node and attempt, so that each node's log says why its job ended: the attempt the group agreed on, or
        # before the group exists (a bad config) the agent's restart count, which only its own workers share.
        attempt = _attempt if _attempt is not None else f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        node = f"{attempt}/{os.environ.get('GROUP_RANK', '0')}"
        return store.add(f"darec_dist/errors/{node}/{hashlib.sha256(message.encode()).hexdigest()[:16]}", 1) == 1
    except (RuntimeError, KeyError, ValueError):  # the store unreachable (or torchrun's variables incomplete): twice beats never
        return True


def _die_with_the_agent() -> None:
    """Under torchrun, end this worker when its agent dies: a killed agent (kill -9, a scheduler's preemption)
    otherwise leaves its workers training on, as orphans, in the run_dir a requeued job needs."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it); shared by the launch path and the tests."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_without_finalisation(code: int) -> None:
    """End a process whose distributed work is finished and whose outputs are written, skipping interpreter
    finalisation: after a finished gloo run it now and then aborts (SIGABRT, "terminate called without an active
    exception": a C++ thread still joinable at exit, about one run in twelve under load), which turned complete
    runs into failures for torchrun and the tests."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
