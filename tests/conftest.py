"""Shared fixtures: phantom shards built once per session, running real commands, and checking the
CLI's one-line refusals.

tests/unit runs in-process; everything under tests/integration (the launcher, subprocesses,
training) is marked `slow`."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
DEMO_CONFIG = REPO / "launch" / "experiments" / "demo.yaml"
SECRET = "fake-secret-that-must-never-be-printed-8c1f"
KEY_ID = "AKIAFAKEKEYID0000042"


INTEGRATION = Path(__file__).resolve().parent / "integration"
# The session fixtures that train something. setup.cfg runs the suite on 2 pytest-xdist workers, a test file at a
# time (`--dist loadfile`); the files naming one of these run on the one worker that builds it.
SHARED_RUNS = {"head_hand_bundle": "trained models", "head_expert": "trained models", "two_rank_run": "two-rank run"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
        for fixture in SHARED_RUNS.keys() & set(item.fixturenames):
            if work_unit(item.nodeid.split("::")[0]) != SHARED_RUNS[fixture]:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture} but is not scheduled with it (work_unit): "
                                        "name it in the test file, one shared run per file")


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # A worker and every process it starts take one thread, as each of two ranks on 2 cores does: two
        # trainings side by side, each with torch's own count, took twice as long (bench/RESULTS.md, "The test
        # suite on 2 workers").
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@functools.cache
def work_unit(test_file: str) -> str:
    """What a test file is scheduled with: the shared run it names, else the file alone."""
    text = (REPO / test_file).read_text()
    return next((unit for name, unit in SHARED_RUNS.items() if re.search(rf"\b{name}\b", text)), test_file)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the files of one shared run in one unit of work. (xdist's own `loadgroup` cannot
    do it with pytest 9.2, whose node ids its marks no longer reach.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(super()._split_scope(nodeid))

    return SharedRunScheduling(config, log)


def largest_micro_batches(capsys, arch: str) -> dict[str, list[int]]:
    """`medsapiens model info`'s largest micro-batch rows for `arch` at 1024x768 with 19 head channels:
    {row: [40 GB, 80 GB, 141 GB]}."""
    from medsapiens.launch.cli import main

    assert main(["model", "info", "--arch", arch, "--img-size", "1024", "768", "--heads", "19"]) == 0
    return {line.rsplit(maxsplit=3)[0].strip(): [int(n) for n in line.split()[-3:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith(("  one GPU", "  8 GPUs"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion within `timeout` seconds; its output is kept for assertions. On a
    timeout, pytest-timeout's alarm or Ctrl-C, its whole process group is killed: DeepSpeed's runner
    with its ranks; `medsapiens launch`, whose job runs in sessions of its own, with its keeper, which
    then stops the job as for any killed launcher. `env` adds to this process's environment; a None value leaves
    that variable out."""
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {name: value for name, value in merged.items() if value is not None}
    with subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as job:
        try:
            stdout, stderr = job.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.communicate(timeout=60)  # until the job's processes, which hold its pipes, are gone
            raise
    proc = subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n")
    return proc


def one_line(code: int, stderr: str, *expected: str, by_argparse: bool = False) -> None:
    """A user's mistake: exit 2 and one `error: ...` line holding each of `expected`, no traceback
    (argparse's own: a usage line, then `PROG: error: ...`)."""
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert (": error: " in last if by_argparse else last.startswith("error: ")), last
    assert all(e in last for e in expected), last


def refused(args: list[str], *expected: str, env: dict | None = None, timeout: float = 120) -> str:
    """The CLI as a user runs it, in a new process, refusing up front; returns its stderr."""
    started = time.monotonic()
    proc = run([*CLI, *args], timeout, env=env)
    one_line(proc.returncode, proc.stderr, *expected)
    assert time.monotonic() - started < 60  # refused up front, not after DeepSpeed started
    return proc.stderr


def refused_here(capsys, args: list[str], *expected: str) -> str:
    """The same through the CLI's main in this process (its parsing, checks and exit rule, without the
    seconds a new interpreter takes to start); the refusal must come before any process group starts."""
    import torch.distributed

    from medsapiens.launch.cli import main

    started = time.monotonic()
    by_argparse = False
    try:
        code = main(args)
    except SystemExit as exc:
        code, by_argparse = exc.code, True
    stderr = capsys.readouterr().err
    one_line(code, stderr, *expected, by_argparse=by_argparse)
    assert time.monotonic() - started < 60
    assert not torch.distributed.is_initialized()
    return stderr


def cli_here(capsys, args: list[str]) -> subprocess.CompletedProcess:
    """The `medsapiens` command through its main in this process, for tests of what a command decides rather
    than of its process: each subprocess spends seconds importing torch, timm and DeepSpeed."""
    from medsapiens.launch.cli import main

    code = main(args)
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, printed.out, printed.err)


def deepspeed_module(module: str, ranks: int, args: list[str], timeout: float = 240,
                     env: dict | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --module M ...`: N CPU ranks on gloo through the real launcher."""
    return run([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", module, *args],
               timeout, env=env)


def unlisted_on(rank: int, name: str) -> dict:
    """Environment for a job whose `rank` lists no entry named `name` in any folder (tests/fault_site), as a shared
    file system's stale cache lists a folder to one host."""
    return {"PYTHONPATH": str(REPO / "tests" / "fault_site"), "MEDSAPIENS_FAULT_RANK": str(rank),
            "MEDSAPIENS_FAULT_UNLISTED": name}


def stale_copy_on(rank: int, path: Path, copy: Path) -> dict:
    """Environment for a job whose `rank` reads `copy` where it opens `path` with open() (tests/fault_site),
    as a host holding an older copy of a file at the same path."""
    return {"PYTHONPATH": str(REPO / "tests" / "fault_site"), "MEDSAPIENS_FAULT_RANK": str(rank),
            "MEDSAPIENS_FAULT_STALE_PATH": str(path), "MEDSAPIENS_FAULT_STALE_COPY": str(copy)}


def pretrain_args(shards, run_dir, *extra) -> list[str]:
    """The demo pretraining, made small: a narrow trunk, micro-batch 4, every step logged."""
    return ["--config", str(DEMO_CONFIG), f"data.shards={shards}", f"run_dir={run_dir}", "train.log_every=1",
            "train.dist_timeout_s=120", "data.micro_batch=4", "data.workers=1", "model.trunk_width=32",
            "optim.lr=2e-3", "optim.warmup_steps=2", "train.val_limit=8", *extra]


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


CLI = [sys.executable, "-m", "medsapiens.launch.cli"]
FINETUNE_CONFIG = REPO / "launch" / "experiments" / "demo_finetune.yaml"


def finetune_args(shards, run_dir, *extra) -> list[str]:
    return ["--config", str(FINETUNE_CONFIG), "--shards", str(shards), "--run-dir", str(run_dir),
            "model.trunk_width=32", "train.val_limit=8", "data.workers=0", *extra]


SMALL_RUN = ("train.max_steps=4", "train.checkpoint_every=2", "train.val_every=4", "train.keep_last=2")


@pytest.fixture(scope="session")
def two_rank_run(phantom_shards, tmp_path_factory) -> Path:
    """4 steps on 2 CPU ranks through the launcher (ZeRO-2), checkpoints at steps 2 and 4, both kept.
    Tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("two_rank") / "run"
    proc = deepspeed_module("medsapiens.pretrain", 2, pretrain_args(phantom_shards, run_dir, *SMALL_RUN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def head_hand_bundle(phantom_shards, tmp_path_factory) -> Path:
    """A bundle pretrained briefly (single process) on head and hand."""
    root = tmp_path_factory.mktemp("pretrained")
    proc = run([sys.executable, "-m", "medsapiens.pretrain", "--config", str(DEMO_CONFIG), f"data.shards={phantom_shards}",
                f"run_dir={root / 'run'}", "data.datasets=[head, hand]", "model.trunk_width=32", "train.max_steps=60",
                "train.checkpoint_every=60", "train.val_every=60", "data.workers=0", "train.val_limit=4"], 240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run([*CLI, "pretrain", "export", str(root / "run"), "--out", str(root / "bundle")], 120).returncode == 0
    return root / "bundle"


@pytest.fixture(scope="module")
def s3_env():
    """A real S3 endpoint on loopback (moto's server mode) with a bucket `medsapiens-test`."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket="medsapiens-test")
    yield env, client
    server.stop()


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory) -> Path:
    """Phantom head, hand, chest and leg sets in their native layouts, built into shards (max side 128).
    Hand takes its seeded split: GU2Net's default leaves fewer than 610 images without a test split."""
    from medsapiens.shards.build import BuildOptions, build
    from medsapiens.shards.phantoms import write_phantoms
    from medsapiens.shards.plan import SourceSpec

    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root / "raw", n=24, seed=0, sets=("head", "hand", "chest", "leg"))
    options = {"hand": {"split": "seeded"}}
    sources = [SourceSpec(d, str(root / "raw" / d), options=options.get(d, {}))
               for d in ("head", "hand", "chest", "leg")]
    build(sources, BuildOptions(out=str(root / "shards"), max_side=128, shard_size=8, workers=1, progress=False))
    return root / "shards"


def write_dicom(path, rows: int, columns: int, pixel_data: bytes, transfer_syntax: str = "1.2.840.10008.1.2.1",
                bits_stored: int = 16, **elements):
    """A single-frame 16-bit MONOCHROME2 DICOM file (Explicit VR Little Endian unless told), with any
    further `elements` (e.g. PixelSpacing); returns its path."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.PixelData = pixel_data
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def change_shard_padding(shards: Path, dataset: str, split: str) -> None:
    """Flip one bit in the tar end padding of the dataset's shards of `split`: every sample still reads,
    only each shard's sha256 differs from the manifest's."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in (s for s in manifest["shards"] if s["dataset"] == dataset and s["split"] == split):
        path = shards / entry["url"]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))


def with_first_record_changed(shard, change: dict) -> tuple[bytes, str]:
    """The bytes of tar `shard` with its first sample's JSON record updated by `change`, and that
    sample's key: a well-formed shard whose one record is wrong."""
    import io
    import json
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = members[0][0].name.partition(".")[0]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == f"{key}.json":
                data = json.dumps({**json.loads(data), **change}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue(), key


@pytest.fixture(scope="session")
def head_expert(phantom_shards, tmp_path_factory) -> Path:
    """A head-only model trained long enough to be clearly better than guessing (its checkpoint chosen on
    one carved val image: 300 steps were enough only while selection read the test split predicted below)."""
    run_dir = tmp_path_factory.mktemp("head_expert") / "run"
    proc = run([*CLI, "finetune", *finetune_args(phantom_shards, run_dir, "--init", "scratch", "--dataset", "head",
                                                 "--steps", "450", "train.val_every=150", "train.checkpoint_every=150",
                                                 "optim.lr=2e-3", "data.augment.rotation_deg=10")], 900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
