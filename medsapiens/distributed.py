"""Every torch.distributed call of the project: start-up and shutdown, and the collectives (rank 0
decides and broadcasts; sums and gathers for logging and evaluation).

A collective's tensors must sit on the device its backend serves: the rank's GPU under NCCL, the
CPU under gloo. Tensors here are made on `collective_device()`, and the rank's GPU is made current
before the process group starts, so the object collectives (which stage their bytes on the current
GPU under NCCL) and barriers use the right one. No other module calls a torch.distributed
collective (tests/integration/test_collectives.py holds the code to that).
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import logging
import os
import socket
import threading
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from medsapiens.errors import UserError, user_message

# How many processes an MPI launcher started (mpirun, and DeepSpeed's openmpi and mvapich runners set no RANK)
OTHER_LAUNCHERS_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
NVIDIA_DEVICE_FILES = "/dev/nvidia[0-9]*"  # one per GPU the NVIDIA driver gives this host (or container)
TORCH_THREADS = torch.get_num_threads()  # torch's own count, before `share_cores` (which a rank may run more than once)
ALLOW_CPU = "MEDSAPIENS_ALLOW_CPU"  # =1: train on the CPU of a host whose GPUs CUDA cannot use (the launchers pass it on)
# Start-up notices of DeepSpeed and torch that tell a CPU user nothing (DeepSpeed is imported later,
# lazily, by this module and its users; the filters are in place before its loggers print).
# (torch.utils.cpp_extension's: when torch.compile, train.compile=true, builds its CPU kernels)
CPU_NOTICES = {"DeepSpeed": "Setting accelerator to CPU", "torch.utils.cpp_extension": "No CUDA runtime is found"}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


for _logger, _text in CPU_NOTICES.items():
    logging.getLogger(_logger).addFilter(_DropNotice(_text))


def free_port() -> int:
    """A TCP port free on this machine right now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def use_device(device) -> torch.device:
    """Make a CUDA device the current one (kernels, caches and NCCL follow the current device);
    returns the device."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
    return device


def local_gpu() -> int:
    """This rank's GPU, its LOCAL_RANK: one this node has (a launcher asked for more ranks than GPUs)."""
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(f"local rank {local} has no GPU: this node shows {count}"
                        f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; start at most "
                        f"{count} rank(s) per node")
    return local


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU); returns (rank, world).
    The rank's GPU is made current first: NCCL binds each communicator to the current device."""
    if "RANK" not in os.environ:
        check_no_other_launcher()
    check_gpus_usable()
    import deepspeed

    # DeepSpeed's ZeRO calls a torch collective that torch now flags as deprecated, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if "RANK" not in os.environ:  # a plain single process, not started by a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    share_cores()
    cuda = torch.cuda.is_available()
    if cuda:
        use_device(f"cuda:{local_gpu()}")
    else:
        without_deepspeed_inference_all_reduce()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def without_deepspeed_inference_all_reduce() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce when it starts on a CPU.

    DeepSpeed's CPU start-up builds that op with the host's C++ compiler (48 s on a 2-core host, once per
    environment) and maps a 66 MB /dev/shm buffer per rank that it never unlinks, yet only its
    tensor-parallel inference calls it: training's collectives go through torch.distributed (gloo) either
    way. An op DeepSpeed holds incompatible is never built; its backend then has no shared-memory op.
    CPU only: DeepSpeed's CUDA accelerator has no such op, and reading its table of compatible ops there
    would probe the build of every CUDA op."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def share_cores() -> int:
    """Give this rank its share of torch's CPU threads, and return the count: torch's own count for the
    process (its physical cores, within its CPU affinity) divided by the node's ranks (LOCAL_SIZE, which
    DeepSpeed's launcher sets), at least 1.

    Left alone, each rank would take all of the node's cores: 2 CPU ranks on 2 cores trained 1.2x as
    fast with one thread each as with two (`bench/cpu_threads.py`). OMP_NUM_THREADS, when set, is the
    user's choice and stays (torchrun sets it to 1), as does the count of a process alone on its node."""
    local_ranks = int(os.environ.get("LOCAL_SIZE") or 1)
    if local_ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, TORCH_THREADS // local_ranks))
    return torch.get_num_threads()


def check_gpus_usable() -> None:
    """Refuse to start on a host whose NVIDIA GPUs CUDA cannot use (a driver older than this torch's CUDA, a
    torch built without CUDA, a GPU fallen off the bus): the rank would train on the CPU, and beside ranks on
    GPUs it would wait out the timeout on gloo while they use NCCL. ALLOW_CPU=1 asks for the CPU, as does
    CUDA_VISIBLE_DEVICES= (empty) in a process started without a launcher (DeepSpeed's sets that variable)."""
    if torch.cuda.is_available() or os.environ.get(ALLOW_CPU) == "1" or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return
    gpus = glob.glob(NVIDIA_DEVICE_FILES)
    if not gpus:
        return
    try:
        torch.cuda.init()
        reason = "it sees no GPU"
    except Exception as exc:  # noqa: BLE001 - torch's reason, whichever error carries it
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    raise UserError(f"{socket.gethostname()} has {len(gpus)} NVIDIA GPU(s) ({NVIDIA_DEVICE_FILES}) that CUDA cannot "
                    f"use ({reason}): the run would train on the CPU; mend the driver or install a torch for its CUDA, "
                    f"or set {ALLOW_CPU}=1 to train on the CPU")


def check_no_other_launcher() -> None:
    """Without RANK, a process trains alone as rank 0 of one: refuse one that an MPI launcher started as
    one of several (each would train alone, all in one run directory)."""
    for name in OTHER_LAUNCHERS_WORLD_SIZE:
        if os.environ.get(name, "1").strip() not in ("", "0", "1"):
            raise UserError(f"this process is one of {os.environ[name]} started by an MPI launcher, which sets no RANK "
                            f"({name}): each would train alone as rank 0; start the ranks with `medsapiens launch` "
                            "(DeepSpeed's own ssh launcher, or --slurm)")


@contextlib.contextmanager
def distributed_job(timeout_s: int):
    """Initialise torch.distributed, run the body, end with `shutdown()`. On an error this rank
    leaves without the final barrier (another rank may sit in a collective this one will never join,
    and the launcher stops the others as soon as one exits with an error), but not without ending
    its process group: see `leave()`."""
    init_distributed(timeout_s)
    try:
        yield
    except BaseException:
        leave()
        raise
    shutdown()


def shutdown() -> None:
    """End cleanly: ZeRO-3 on CPU aborts at exit without a final barrier and group teardown."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


LEAVE_WAIT_S = 10.0


def leave() -> None:
    """End the process group on an error, without a barrier, before Python's exit.

    A process group left to the interpreter's exit outlives it: gloo's worker threads drop their
    last collective's tensors (its Python objects) after the collective is done, and a thread that
    asks for the GIL once Python is finalising is ended by it mid-destructor (C++ `terminate called
    without an active exception`, SIGABRT: exit -6 instead of the error's status, in about one
    failed start in six). Destroying the group joins those threads first. Destroying waits for this
    rank's own collectives in flight, which no peer may ever join: after LEAVE_WAIT_S the rank leaves
    anyway, as it used to.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    ended = threading.Event()

    def end() -> None:
        with contextlib.suppress(Exception):  # the error on its way out is the one to report
            dist.destroy_process_group()
        ended.set()

    threading.Thread(target=end, name="medsapiens-leave", daemon=True).start()
    ended.wait(LEAVE_WAIT_S)


def collective_device() -> torch.device:
    """The device a collective's tensors must be on: the rank's current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if not dist.is_initialized():
        return
    device = collective_device()
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def decide_on_rank0(check) -> None:
    """Run `check()` on rank 0 only; if it raises, every rank raises too, with rank 0's message.

    Keeps expensive or external checks (e.g. S3 HEAD requests per shard) to one rank while making
    all ranks stop together instead of hanging in a collective. Rank 0 re-raises its own error;
    the others raise a `UserError` with its message when it was one, else a RuntimeError.
    """
    failure, outcome = None, [None]
    if rank() == 0:
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - forwarded to every rank below
            failure = exc
            message = user_message(exc)
            outcome[0] = ("user", message) if message is not None else ("bug", f"{type(exc).__name__}: {exc}")
    broadcast_from_rank0(outcome)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        kind, message = outcome[0]
        raise UserError(message) if kind == "user" else RuntimeError(f"rank 0 failed: {message}")


def computed_on_rank0(compute):
    """`compute()`'s value on rank 0, given to every rank (whose own view, of a shared file system say, may
    differ); if it raises, every rank raises, as in decide_on_rank0."""
    value = [None]

    def run() -> None:
        value[0] = compute()

    decide_on_rank0(run)
    broadcast_from_rank0(value)
    return value[0]


@contextlib.contextmanager
def held_by_rank0(context):
    """Enter the context manager `context` on rank 0 only, for the body; if entering fails there,
    every rank raises (as decide_on_rank0)."""
    with contextlib.ExitStack() as stack:
        decide_on_rank0(lambda: stack.enter_context(context))
        yield


def broadcast_from_rank0(objects: list) -> None:
    """Replace the list's items in place by rank 0's."""
    if dist.is_initialized():
        dist.broadcast_object_list(objects, src=0, device=collective_device())


def check_shared_folder(folder: Path, what: str) -> None:
    """Refuse, in one line naming the ranks and hosts, a `folder` some rank does not see as rank 0 writes
    it (a folder local to each host, where the ranks' files must come together)."""
    if world_size() == 1:
        return

    def write_probe() -> str:
        name = f".shared-check-{os.urandom(8).hex()}"  # a new name: no cached lookup
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(name)
        return name

    name = computed_on_rank0(write_probe)
    probe = Path(folder) / name
    try:
        seen = probe.read_text() == name
    except OSError:
        seen = False
    try:
        check_every_rank(None if seen else "cannot see the file rank 0 wrote there", lambda ranks: (
            f"{what} {folder} is not one folder shared by every rank: {ranks}; put it on a file system every host "
            "mounts at that path"))
    finally:
        if rank() == 0:
            probe.unlink(missing_ok=True)


def this_rank() -> str:
    """This rank and its host, as a refusal names them."""
    return f"rank {rank()} on {socket.gethostname()}"


def check_every_rank(trouble: str | None, problem) -> None:
    """Refuse on every rank, in one line, `problem(the ranks and hosts with their trouble)`, unless no rank
    has `trouble` (None)."""
    failing = gather_to_rank0(None if trouble is None else f"{this_rank()} ({trouble})")

    def check() -> None:
        if missing := [who for who in failing if who]:
            raise UserError(problem(", ".join(missing)))

    decide_on_rank0(check)


def check_same_on_every_rank(values: dict[str, str], advice: str) -> None:
    """Refuse, on every rank, in one line, a job where some rank holds other `values` (what each rank read or
    resolved for itself) than rank 0, naming the ranks, hosts and values that differ, then `advice`."""
    held = gather_to_rank0((this_rank(), values))

    def check() -> None:
        reference = held[0][1]
        differ = [f"{who}: " + ", ".join(f"{name} {value} (rank 0: {reference.get(name)})"
                                        for name, value in theirs.items() if value != reference.get(name))
                  for who, theirs in held[1:] if theirs != reference]
        if differ:
            raise UserError(f"the ranks do not start alike: {'; '.join(differ)}; {advice}")

    decide_on_rank0(check)


def sum_across_ranks(values: dict[str, tuple[float, int]], names: list[str]) -> dict[str, tuple[float, int]]:
    """Sum (value_sum, count) pairs per name over ranks; names missing on a rank count as (0, 0)."""
    rows = [[float(s), c] for s, c in (values.get(n, (0.0, 0)) for n in names)]
    t = torch.tensor(rows, dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
    return {n: (float(s), int(c)) for n, (s, c) in zip(names, t.tolist(), strict=True) if c > 0}


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on at least one rank (the same answer on every rank)."""
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_to_rank0(obj):
    """A list of every rank's object on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
