"""Put on PYTHONPATH for one test job, this runs in each of its Python processes. On the rank whose
LOCAL_RANK is MEDSAPIENS_FAULT_RANK (a process started without a launcher is rank 0), the moment
DeepSpeed saves a file whose name ends with MEDSAPIENS_FAULT_FILE: `freeze` writes two thirds of it
and stops the process (SIGSTOP, as a rank stalled on a slow disk), `kill` kills the process (SIGKILL)
before it writes anything, `raise` raises a RuntimeError there (a crash: a bug or a library's error).
With MEDSAPIENS_FAULT_OOM_AT_BACKWARD=N instead, that rank's N-th backward pass raises torch's
out-of-memory error, as on a GPU too small for the micro-batch; with MEDSAPIENS_FAULT_SIGTERM_AT_BACKWARD=N,
it sends the process SIGTERM, as a scheduler's preemption landing mid-step. With MEDSAPIENS_FAULT_UNLISTED=NAME,
that rank's folder listings (`Path.glob`) leave out the entries named NAME, as a shared file system's stale
cache lists a folder to one host. With MEDSAPIENS_FAULT_STALE_PATH=PATH and MEDSAPIENS_FAULT_STALE_COPY=COPY,
that rank's `open(PATH)` opens COPY, as a host holding an older copy of a file at the same path (`pathlib`'s
reads, which call `io.open`, are left alone).
Exactly at that point, on every run: no polling, no race."""
import os

FAULTY_RANK = os.environ.get("LOCAL_RANK", "0") == os.environ.get("MEDSAPIENS_FAULT_RANK")

if os.environ.get("MEDSAPIENS_FAULT_FILE") and FAULTY_RANK:
    import signal

    import torch

    _save = torch.save

    def _faulty_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f).endswith(os.environ["MEDSAPIENS_FAULT_FILE"]):
            if os.environ["MEDSAPIENS_FAULT"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ["MEDSAPIENS_FAULT"] == "raise":
                raise RuntimeError(f"simulated crash saving {f}")
            _save(obj, f, *args, **kwargs)
            os.truncate(f, os.path.getsize(f) * 2 // 3)
            os.kill(os.getpid(), signal.SIGSTOP)
        return _save(obj, f, *args, **kwargs)

    torch.save = _faulty_save

BACKWARD_FAULTS = ("MEDSAPIENS_FAULT_OOM_AT_BACKWARD", "MEDSAPIENS_FAULT_SIGTERM_AT_BACKWARD")
if FAULTY_RANK and any(os.environ.get(name) for name in BACKWARD_FAULTS):
    import signal

    import torch

    _backward, _backwards = torch.autograd.backward, [0]
    OOM_REPORT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 39.49 GiB of which "
                  "1.10 GiB is free. Including non-PyTorch memory, this process has 38.38 GiB memory in use.")

    def _faulty_backward(*args, **kwargs):
        _backwards[0] += 1
        if str(_backwards[0]) == os.environ.get("MEDSAPIENS_FAULT_OOM_AT_BACKWARD"):
            raise torch.OutOfMemoryError(OOM_REPORT)
        if str(_backwards[0]) == os.environ.get("MEDSAPIENS_FAULT_SIGTERM_AT_BACKWARD"):
            os.kill(os.getpid(), signal.SIGTERM)
        return _backward(*args, **kwargs)

    torch.autograd.backward = _faulty_backward

if FAULTY_RANK and os.environ.get("MEDSAPIENS_FAULT_UNLISTED"):
    import pathlib

    _glob = pathlib.Path.glob

    def _stale_glob(self, pattern, *args, **kwargs):
        return (found for found in _glob(self, pattern, *args, **kwargs)
                if found.name != os.environ["MEDSAPIENS_FAULT_UNLISTED"])

    pathlib.Path.glob = _stale_glob

if FAULTY_RANK and os.environ.get("MEDSAPIENS_FAULT_STALE_PATH"):
    import builtins

    _open = builtins.open

    def _stale_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == os.environ["MEDSAPIENS_FAULT_STALE_PATH"]:
            file = os.environ["MEDSAPIENS_FAULT_STALE_COPY"]
        return _open(file, *args, **kwargs)

    builtins.open = _stale_open
