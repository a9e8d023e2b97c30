"""`medsapiens launch pretrain|finetune`: turn this machine, a hostfile or a SLURM allocation into the
`deepspeed` command that starts a training run's ranks, then run it (or print it with --dry-run).

No torch at import: `--help` stays fast. The experiment config is checked before anything starts.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medsapiens.cli import positive_int
from medsapiens.errors import UserError
from medsapiens.launch import hosts, keeper, rank_env

STAGES = ("pretrain", "finetune")
HOSTFILE_NAME = "hostfile"
ENV_FILE_NAME = "deepspeed_env"
# The keeper and every rank start as `python -m medsapiens...`, which puts the working directory first on
# the import path: run from a checkout with the package installed (not editable), its own medsapiens/ folder,
# which holds no stage, would be imported. DeepSpeed passes PYTHON* variables on to every node. (Python 3.11+;
# over ssh DeepSpeed also puts the working directory on PYTHONPATH: check_no_other_package_in.)
SAFE_IMPORTS = {"PYTHONSAFEPATH": "1"}
LAUNCH_DIR_PLACEHOLDER = Path("LAUNCH_DIR")  # what --dry-run shows for the private directory a launch makes
DEFAULT_MASTER_PORT = 29500  # torch.distributed's and DeepSpeed's default
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000  # below Linux's ephemeral ports (32768+)
SLURM_SLOT_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE")
PLACEHOLDER_MARKS = ("YOUR-BUCKET", "/path/to/")  # what the shipped experiment configs leave to fill in
EXAMPLE_CONFIGS = {"pretrain": "launch/experiments/sapiens_0.3b.yaml",
                   "finetune": "launch/experiments/medsapiens_0.3b_finetune.yaml"}
STOP_GRACE_S = 40.0  # DeepSpeed's per-node launcher gives its ranks 30 s to end before it kills them
# Not a regular file: DeepSpeed then starts the ranks here only. Without --hostfile it reads its default,
# /job/hostfile, which some cluster images hold, and would start a "local" launch on the hosts listed there.
LOCAL_ONLY_HOSTFILE = os.devnull
# What pdsh's remote shell takes literally in an argument DeepSpeed passes on unquoted; one holding a
# space DeepSpeed wraps in double quotes, where rank_env.NOT_EXPORTABLE's characters still act.
SHELL_SAFE_ARGUMENT = re.compile(r"[\w./:=,+@\[\]-]*")  # no %: pdsh puts the host in for %h, %n, %u
SSH_CHECK_TIMEOUT_S = 20

DESCRIPTION = """\
Start the DeepSpeed ranks of a training run (`python -m medsapiens.pretrain` / `python -m medsapiens.finetune` on every rank).

Where the ranks run:
  (default)        this machine: --gpus ranks (one per GPU, on the first --gpus of CUDA_VISIBLE_DEVICES
                   when it lists indices; on a CPU-only machine, CPU ranks with gloo)
  --hostfile H     the hosts of H (lines 'HOST slots=N'); DeepSpeed starts them over ssh with pdsh,
                   master = the first host. Variables the ranks need (AWS_*, NCCL_*, MEDSAPIENS_*,
                   PYTORCH_*, TORCH_NCCL_* ...: docs/launch.md) go in
                   a private env file (mode 0600) that DeepSpeed exports on every host; your own
                   ~/.deepspeed_env and ./.deepspeed_env lines are merged into it.
  --slurm          every node of the SLURM job, without ssh: run ONE launcher per node, e.g.
                     srun --ntasks-per-node=1 medsapiens launch pretrain --slurm --config FILE
                   (see launch/slurm/pretrain.sbatch). Each expands the job's node list into a hostfile,
                   takes the first node as master and a port derived from SLURM_JOB_ID (the same on all
                   nodes), and runs `deepspeed --no_ssh --node_rank $SLURM_NODEID`, which starts that
                   node's ranks. Ranks per node: --gpus, else SLURM_GPUS_ON_NODE, else
                   SLURM_NTASKS_PER_NODE. The ranks inherit the job's environment.

--dry-run prints the command (shell-quoted) and the files it would write instead of running;
secret values (keys, tokens) are shown as <set>. Ctrl-C stops all ranks at the step in progress after a
checkpoint (a second Ctrl-C at once); the exit status is DeepSpeed's.
Trailing KEY=VALUE arguments override the experiment config, e.g. data.micro_batch=4 (a schedule in steps
instead of the shipped configs' epochs: train.max_steps=2000)."""


class LaunchError(UserError, ValueError):
    pass


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch", help="start pretraining or fine-tuning ranks with DeepSpeed (this machine, hostfile, SLURM)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES:
        sub = stages.add_parser(stage, help=f"run `python -m medsapiens.{stage}` on every rank", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_options(sub, stage)
        sub.set_defaults(func=run_launch)


def _add_options(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("--config", required=True, help=f"experiment YAML, e.g. {EXAMPLE_CONFIGS[stage]}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="hostfile with lines 'HOST slots=N' (ranks started over ssh/pdsh)")
    where.add_argument("--slurm", action="store_true", help="use the SLURM allocation (one launcher per node via srun)")
    parser.add_argument("--nodes", type=positive_int, metavar="N",
                        help="use the first N hosts of the hostfile (default: all); with --slurm, check the job has N")
    parser.add_argument("--gpus", type=positive_int, metavar="G", help="ranks per node (default: all GPUs / slots)")
    parser.add_argument("--master-port", type=_port, metavar="PORT", help="rendezvous port (default: a free one locally, "
                        f"derived from SLURM_JOB_ID under --slurm, {DEFAULT_MASTER_PORT} with a hostfile)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and files, run nothing")
    if stage == "pretrain":
        parser.add_argument("--resume", choices=["auto", "universal", "none"],
                            help="passed to `python -m medsapiens.pretrain` (its default: auto)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


@dataclass
class Plan:
    """One node's launch: the deepspeed command and the files it needs in `launch_dir`."""

    summary: str
    argv: list[str]
    launch_dir: Path
    hostfile: dict[str, int] | None = None  # written to launch_dir/hostfile
    env_file: list[rank_env.Variable] | None = None  # written to launch_dir/deepspeed_env
    ranks: int | None = None  # None: one per local accelerator, counted by DeepSpeed
    notes: list[str] = field(default_factory=list)  # printed with the plan
    env: dict[str, str] = field(default_factory=dict)  # set for the runner, shown in the command
    remote_hosts: list[str] = field(default_factory=list)  # the hosts DeepSpeed reaches over ssh with pdsh

    @property
    def env_file_path(self) -> Path:
        return self.launch_dir / ENV_FILE_NAME

    @property
    def extra_env(self) -> dict[str, str]:
        # DeepSpeed's runner reads ~/$DS_ENV_FILE and ./$DS_ENV_FILE: an absolute path (a temporary
        # directory's is) names our file in both places and hides the user's, whose lines we merged in.
        return {**self.env, **({"DS_ENV_FILE": str(self.env_file_path)} if self.env_file is not None else {})}


def run_launch(args) -> int:
    workspace = (contextlib.nullcontext(LAUNCH_DIR_PLACEHOLDER) if args.dry_run
                 else tempfile.TemporaryDirectory(prefix="medsapiens-launch-"))
    with workspace as launch_dir:
        cfg = check_config(args.stage, args.config, args.overrides)
        plan = make_plan(args, os.environ, Path.cwd(), Path(launch_dir))
        plan.notes += overrides_note(cfg, args.stage, args.config) + config_notes(cfg, plan.ranks)
        print(describe(plan, os.environ, args.stage), flush=True)
        if args.dry_run:
            return 0
        check_reachable(plan.remote_hosts)
        write_launch_files(plan)
        return run_command(plan.argv, {**os.environ, **plan.extra_env, **SAFE_IMPORTS}, launch_dir=str(launch_dir),
                           over_ssh=bool(plan.remote_hosts))


def placeholders(cfg) -> list[str]:
    """KEY=VALUE of the settings that still hold a shipped config's placeholder (model.checkpoint not
    when a fine-tuning starts from a bundle, which does not read it)."""
    from medsapiens import config as configlib

    unused = {"model.checkpoint"} if getattr(cfg, "init", None) == "bundle" else set()
    return [f"{key}={value}" for key, value in configlib.flatten(configlib.to_dict(cfg)).items()
            if key not in unused and isinstance(value, str) and any(mark in value for mark in PLACEHOLDER_MARKS)]


def config_notes(cfg, ranks: int | None) -> list[str]:
    """Lines about the config for the printed plan: placeholders left, the global batch against the published one."""
    from medsapiens.training.run import PUBLISHED_GLOBAL_BATCH

    notes = []
    left = placeholders(cfg)
    if left:
        notes.append(f"warning: placeholder(s) left in the config: {', '.join(left)}")
    if ranks:
        batch, accum = cfg.data.micro_batch, cfg.train.grad_accum
        total = ranks * batch * accum
        published = "the published recipe's" if total == PUBLISHED_GLOBAL_BATCH else (
            f"the published recipe's is {PUBLISHED_GLOBAL_BATCH}; optim.lr {cfg.optim.lr:g} is as configured, "
            "scale it (or data.micro_batch) if you mean to keep the recipe")
        notes.append(f"global batch: {ranks} rank(s) x micro-batch {batch} x accumulation {accum} = {total} ({published})")
    return notes


def stage_config(stage: str):
    """The stage's config class and its own checks."""
    if stage == "pretrain":
        from medsapiens.pretrain.config import PretrainConfig
        from medsapiens.training.run import check_settings

        return PretrainConfig, check_settings
    from medsapiens.finetune.config import FinetuneConfig
    from medsapiens.finetune.train import check_config as check  # the stage's own: dataset, start, seeds

    return FinetuneConfig, check


def check_config(stage: str, config: str, overrides: list[str]):
    """Fail in seconds on a config typo, not after the ranks have started; returns the config."""
    from medsapiens import config as configlib

    config_class, check = stage_config(stage)
    return configlib.load(config_class, config, overrides, check)  # read as the ranks will; the deepspeed file checked


def overrides_note(cfg, stage: str, config: str) -> list[str]:
    """A line with each setting the overrides change, as the ranks will read it, beside the file's value."""
    from medsapiens import config as configlib

    config_class, _ = stage_config(stage)
    resolved = configlib.flatten(configlib.to_dict(cfg))
    try:
        in_file = configlib.flatten(configlib.to_dict(configlib.load(config_class, config, [])))
    except configlib.ConfigError:  # a file valid only with its overrides (a placeholder one replaces)
        return []
    changed = [f"{key} {in_file.get(key)!r} -> {value!r}" for key, value in resolved.items() if in_file.get(key) != value]
    return [f"the overrides change: {'; '.join(changed)}"] if changed else []


def make_plan(args, environ: Mapping[str, str], cwd: Path, launch_dir: Path) -> Plan:
    stage_args = [f"medsapiens.{args.stage}", "--config", args.config]
    if getattr(args, "resume", None):
        stage_args += ["--resume", args.resume]
    stage_args += args.overrides
    if args.slurm:
        plan = slurm_plan(args, environ, launch_dir)
    elif args.hostfile:
        plan = hostfile_plan(args, environ, cwd, launch_dir)
    else:
        plan = local_plan(args, environ, launch_dir)
    if plan.remote_hosts:
        check_remote_shell_safe(cwd, stage_args)
    plan.argv += ["--module", *stage_args]
    return plan


def check_remote_shell_safe(cwd: Path, arguments: list[str]) -> None:
    """pdsh hands DeepSpeed's command to a remote shell as one line: the working directory unquoted,
    every argument too unless it holds a space (then in double quotes). A character that shell acts on
    would change or break what the ranks are given, after this machine checked and printed another."""
    passes = "letters, digits and _ . / : = , + @ [ ] - pass as they are"
    if not SHELL_SAFE_ARGUMENT.fullmatch(str(cwd)):
        raise LaunchError(f"the working directory {str(cwd)!r}: a launch over ssh has the hosts' shell change to it "
                          f"unquoted ({passes}); launch from a directory with a plain path")
    for argument in arguments:
        if rank_env.NOT_EXPORTABLE.search(argument) if " " in argument else not SHELL_SAFE_ARGUMENT.fullmatch(argument):
            raise LaunchError(f"{argument!r}: a launch over ssh passes it to the hosts' shell, which would act on "
                              f"its characters ({passes}); put the value in the config file, or rename the path")


def check_remote_tools() -> None:
    for tool in ("pdsh", "ssh"):
        if not shutil.which(tool):
            raise LaunchError(f"a launch over ssh needs {tool} on this machine (DeepSpeed starts the ranks of every "
                              f"host with pdsh over ssh): install it (e.g. apt install {tool}), or launch with --slurm")


def check_reachable(remote_hosts: list[str]) -> None:
    """Each host answers ssh without a password, as DeepSpeed's pdsh launch needs: checked here, all at
    once, for one line naming those that do not (DeepSpeed's own check ends in a traceback)."""
    if not remote_hosts:
        return
    checks = {host: subprocess.Popen(["ssh", "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", "-o",
                                      f"ConnectTimeout={SSH_CHECK_TIMEOUT_S // 2}", host, "true"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
              for host in remote_hosts}
    failed = {}
    for host, check in checks.items():
        try:
            _, err = check.communicate(timeout=SSH_CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            check.kill()
            check.communicate()
            err = f"no answer within {SSH_CHECK_TIMEOUT_S} s"
        if check.returncode:
            failed[host] = (err.strip().splitlines() or [f"ssh exited {check.returncode}"])[-1]
    if failed:
        shown = "; ".join(f"{host}: {why}" for host, why in failed.items())
        raise LaunchError(f"cannot reach {len(failed)} of the {len(remote_hosts)} host(s) by ssh without a password, "
                          f"as the launch needs ({shown})")


def local_plan(args, environ: Mapping[str, str], launch_dir: Path) -> Plan:
    if args.nodes not in (None, 1):
        raise LaunchError(f"--nodes {args.nodes} needs --hostfile or --slurm")
    from medsapiens.distributed import free_port

    port = args.master_port or free_port()
    argv = [deepspeed_executable(), "--hostfile", LOCAL_ONLY_HOSTFILE]
    check_gpu_count(args.gpus, "--gpus", environ)
    gpus = args.gpus or len(named_by_uuid(environ)) or None  # DeepSpeed's runner reads no UUIDs: it gets their count
    visible = visible_subset(gpus, environ)
    if gpus and visible is None:
        argv += ["--num_gpus", str(gpus)]
    argv += ["--master_port", str(port)]
    ranks = f"{gpus} rank(s)" if gpus else "one rank per local accelerator"
    on = f" on GPUs {visible}" if visible else ""
    return Plan(f"this machine, {ranks}{on}, master 127.0.0.1:{port}", argv, launch_dir,
                ranks=gpus or local_gpu_count(), env={VISIBLE_DEVICES: visible} if visible else {})


def local_gpu_count() -> int | None:
    """The ranks DeepSpeed starts here without --num_gpus on a GPU machine; None on a CPU one (its count)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def check_gpu_count(gpus: int | None, flag: str, environ: Mapping[str, str]) -> None:
    """On a machine with CUDA, `gpus` ranks need as many GPUs here (of those CUDA_VISIBLE_DEVICES lists,
    when set): a rank past them fails to start on an invalid device. CPU ranks: as many as asked.
    GPUs listed by UUID must be all the machine shows: DeepSpeed's launcher cannot pass UUIDs on, and its
    ranks run on GPUs 0, 1, ... of the machine instead."""
    import torch

    if not torch.cuda.is_available():
        return
    if uuids := named_by_uuid(environ):
        check_uuids_are_all_gpus(uuids, environ)
    if gpus and gpus > torch.cuda.device_count():
        listed = visible_devices(environ)
        shown = f" ({VISIBLE_DEVICES}={','.join(listed)})" if listed else ""
        raise LaunchError(f"{flag} {gpus}: this machine has {torch.cuda.device_count()} GPU(s){shown}; give "
                          f"{flag} {torch.cuda.device_count()} or fewer")


def check_uuids_are_all_gpus(uuids: list[str], environ: Mapping[str, str]) -> None:
    """The GPUs listed by UUID must be the very GPUs a process here sees without the variable (a container
    showing only its own), which DeepSpeed's ranks use once its runner dropped it."""
    listed, every = gpus_seen(environ), gpus_seen({k: v for k, v in environ.items() if k != VISIBLE_DEVICES})
    if listed is not None and listed == every:
        return
    why = (f"names {len(listed)} GPU(s), not the {len(every)} a process here sees without it," if listed is not None
           and every is not None else "names GPUs that cannot be matched with those a process here sees without it")
    raise LaunchError(f"{VISIBLE_DEVICES}={','.join(uuids)} {why} by UUID, which DeepSpeed's launcher cannot pass on: "
                      "its ranks would run on GPUs 0, 1, ... of the machine, perhaps not those; list them by index "
                      f"({VISIBLE_DEVICES}=2,3). A MIG slice, which only a UUID names, takes one process started "
                      "without the launcher (python -m medsapiens.pretrain)")


def visible_devices(environ: Mapping[str, str]) -> list[str]:
    """The GPUs CUDA_VISIBLE_DEVICES lists (indices or UUIDs), in its order; none when it is unset."""
    return [device.strip() for device in environ.get(VISIBLE_DEVICES, "").split(",") if device.strip()]


def named_by_uuid(environ: Mapping[str, str]) -> list[str]:
    """The GPUs CUDA_VISIBLE_DEVICES names otherwise than by index (`GPU-…`, `MIG-…`) on a machine with CUDA;
    none when it lists indices, is unset, or on a CPU machine."""
    import torch

    listed = visible_devices(environ)
    return listed if torch.cuda.is_available() and not all(d.isdecimal() for d in listed) else []


def gpus_seen(environ: Mapping[str, str]) -> list[str] | None:
    """The UUIDs of the GPUs a process started here with `environ` sees, sorted; None when it cannot tell."""
    probe = "import torch; print(*(torch.cuda.get_device_properties(i).uuid for i in range(torch.cuda.device_count())))"
    try:
        seen = subprocess.run([sys.executable, "-c", probe], env=dict(environ), capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sorted(seen.stdout.split()) if seen.returncode == 0 else None


def visible_subset(gpus: int | None, environ: Mapping[str, str]) -> str | None:
    """The first `gpus` GPUs CUDA_VISIBLE_DEVICES lists, for the runner to start on: given --num_gpus,
    DeepSpeed ignores and drops that variable, and its ranks would run on GPUs 0..gpus-1, whichever job
    they belong to. None without the variable, when it names GPUs by UUID, which DeepSpeed cannot (they are
    all the machine's: `check_gpu_count`), and on a CPU machine."""
    import torch

    listed = visible_devices(environ)
    if not gpus or not torch.cuda.is_available() or not listed or named_by_uuid(environ):
        return None
    return ",".join(listed[:gpus])


def hostfile_plan(args, environ: Mapping[str, str], cwd: Path, launch_dir: Path) -> Plan:
    pool = hosts.read_hostfile(args.hostfile)
    used = first_hosts(pool, args.nodes, f"hostfile {args.hostfile}")
    if args.gpus:
        short = [f"{host} (slots={slots})" for host, slots in used.items() if slots < args.gpus]
        if short:
            raise LaunchError(f"--gpus {args.gpus} is more than {args.hostfile} gives {', '.join(short)}")
        used = dict.fromkeys(used, args.gpus)
    master, port = next(iter(used)), args.master_port or DEFAULT_MASTER_PORT
    argv = [deepspeed_executable(), "--hostfile", args.hostfile]
    if args.nodes:
        argv += ["--num_nodes", str(args.nodes)]
    if args.gpus:
        argv += ["--num_gpus", str(args.gpus)]
    argv += ["--master_addr", master, "--master_port", str(port)]
    # DeepSpeed starts a single host's ranks here, whichever host it is: one that is not this machine
    # is reached over ssh as several are (--force_multi)
    over_ssh = len(used) > 1 or not hosts.is_this_machine(master)
    if over_ssh:
        check_remote_tools()
        check_no_other_package_in(cwd)
        argv += ["--log_level", "warning"]  # at info it logs the pdsh command with every exported value
        argv += [] if len(used) > 1 else ["--force_multi"]
    else:  # DeepSpeed would ssh to this machine to check a hostfile's first host
        argv += ["--no_ssh_check"]
    summary = f"{len(used)} host(s) from {args.hostfile}, {sum(used.values())} rank(s), master {master}:{port}"
    env_file = rank_env.env_file_variables(environ, cwd) if over_ssh else None
    return Plan(summary, argv, launch_dir, env_file=env_file, ranks=sum(used.values()),
                remote_hosts=list(used) if over_ssh else [])


def check_no_other_package_in(cwd: Path) -> None:
    """Over ssh, DeepSpeed puts the working directory first on every rank's PYTHONPATH, which PYTHONSAFEPATH
    leaves in place: a `medsapiens/` there other than the package this launcher runs (a checkout's root, the
    package installed not editable) would be the ranks' medsapiens, which holds no stage."""
    import medsapiens

    there = cwd / "medsapiens"
    if there.is_dir() and there.resolve() != Path(medsapiens.__file__).resolve().parent:
        raise LaunchError(f"{cwd} holds a medsapiens/ folder other than the installed package, which DeepSpeed's ssh "
                          "launch would put first on every rank's import path: launch from another folder")


def slurm_plan(args, environ: Mapping[str, str], launch_dir: Path) -> Plan:
    # Inside srun, SLURM_NODEID numbers the nodes of the step in the order of the step's node list.
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("--slurm: SLURM_JOB_NODELIST is not set; run inside a SLURM job "
                          "(see launch/slurm/pretrain.sbatch)")
    nodes = hosts.expand_nodelist(nodelist)
    if args.nodes and args.nodes != len(nodes):
        raise LaunchError(f"--nodes {args.nodes}, but the SLURM job has {len(nodes)} node(s) ({nodelist})")
    check_one_launcher_per_node(environ, len(nodes))
    node_rank = slurm_node_rank(environ, nodes)
    check_slurm_gpus(args.gpus, environ)
    slots, notes = (args.gpus, []) if args.gpus else slurm_slots(environ)
    if not args.gpus:
        check_slurm_gpus_even(slots, len(nodes), environ)
    check_slurm_gpus_from_zero(slots, environ)
    port = args.master_port or slurm_port(_required(environ, "SLURM_JOB_ID"))
    argv = [deepspeed_executable(), "--hostfile", str(launch_dir / HOSTFILE_NAME), "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", nodes[0], "--master_port", str(port)]
    summary = (f"{len(nodes)} SLURM node(s) x {slots} = {len(nodes) * slots} rank(s), master {nodes[0]}:{port}, "
               f"this is node {node_rank} ({nodes[node_rank]})")
    return Plan(summary, argv, launch_dir, hostfile=dict.fromkeys(nodes, slots), ranks=len(nodes) * slots, notes=notes)


def first_hosts(pool: dict[str, int], count: int | None, where: str) -> dict[str, int]:
    if count and count > len(pool):
        raise LaunchError(f"--nodes {count}, but {where} lists only {len(pool)} host(s)")
    return dict(list(pool.items())[:count])


def check_one_launcher_per_node(environ: Mapping[str, str], node_count: int) -> None:
    """Each launcher starts all ranks of its node: exactly one per node, or ranks are missing or doubled."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS")  # set by srun, not in the batch script itself
    if tasks is None and node_count > 1:
        raise LaunchError(f"--slurm: the job has {node_count} nodes but this is not an srun step; start one "
                          "launcher per node: srun --ntasks-per-node=1 medsapiens launch ... --slurm")
    if tasks is not None and tasks != str(node_count):
        raise LaunchError(f"--slurm: srun started {tasks} tasks on {node_count} node(s); it needs exactly one "
                          "per node (srun --ntasks-per-node=1)")


def slurm_node_rank(environ: Mapping[str, str], nodes: list[str]) -> int:
    node_id = _required(environ, "SLURM_NODEID")
    if not node_id.isdigit() or int(node_id) >= len(nodes):
        raise LaunchError(f"--slurm: SLURM_NODEID={node_id} is not a node of {nodes}")
    # Rank 0 must run on nodes[0], the master address: check the numbering against this host's name.
    here = environ.get("SLURMD_NODENAME")
    if here and here != nodes[int(node_id)]:
        raise LaunchError(f"--slurm: SLURM_NODEID={node_id} names {nodes[int(node_id)]}, but this is {here}")
    return int(node_id)


def check_slurm_gpus(gpus: int | None, environ: Mapping[str, str]) -> None:
    """--gpus within the GPUs SLURM gave each node: a rank past them fails on an invalid device."""
    given = environ.get(SLURM_SLOT_VARIABLES[0], "")
    if gpus and given.isdigit() and gpus > int(given):
        raise LaunchError(f"--gpus {gpus}, but SLURM gave each node {given} GPU(s) ({SLURM_SLOT_VARIABLES[0]}); "
                          f"give --gpus {given} or fewer, or ask SLURM for more (--gpus-per-node)")


def check_slurm_gpus_even(slots: int, node_count: int, environ: Mapping[str, str]) -> None:
    """Every node's launcher writes the same hostfile from its own ranks per node: a job-wide `--gpus N`
    that SLURM spread unevenly would number the ranks differently on each node, and the job would hang."""
    total = environ.get("SLURM_GPUS", "")  # set by `--gpus N`, not by `--gpus-per-node`
    if total.isdigit() and int(total) != slots * node_count:
        node = environ.get("SLURMD_NODENAME", "this node")
        raise LaunchError(f"--slurm: SLURM gave the job {total} GPUs (SLURM_GPUS) over {node_count} node(s), {slots} "
                          f"on {node}: not as many on each, and every node must start as many ranks; ask for them "
                          "per node (--gpus-per-node), or pass --gpus N")


def check_slurm_gpus_from_zero(slots: int, environ: Mapping[str, str]) -> None:
    """DeepSpeed's per-node launcher starts its `slots` ranks on GPUs 0..slots-1 whatever CUDA_VISIBLE_DEVICES
    lists: on a node where SLURM gave this job other GPUs (no device cgroup), some would not be the job's."""
    listed = visible_devices(environ)
    if listed and all(d.isdecimal() for d in listed) and not set(range(slots)) <= {int(d) for d in listed}:
        node = environ.get("SLURMD_NODENAME", "this node")
        raise LaunchError(f"--slurm: SLURM gave this job GPUs {','.join(listed)} on {node} ({VISIBLE_DEVICES}), but "
                          f"DeepSpeed's launcher starts its {slots} ranks there on GPUs 0..{slots - 1}, not all of them "
                          "the job's: ask for whole nodes (--exclusive), or have SLURM confine jobs to their GPUs "
                          "(ConstrainDevices=yes in cgroup.conf: a job then sees its GPUs as 0, 1, ...)")


def slurm_slots(environ: Mapping[str, str]) -> tuple[int, list[str]]:
    """Ranks per node from the job, and a warning when they are not the node's GPUs."""
    gpus, tasks = SLURM_SLOT_VARIABLES
    for name in SLURM_SLOT_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            if name == gpus:
                return int(value), []
            return int(value), [f"warning: {gpus} is not set, so the ranks per node are {tasks}={value} (one "
                                "launcher task per node in the shipped sbatch): on GPU nodes ask SLURM for the GPUs "
                                "(--gpus-per-node) or pass --gpus N"]
    raise LaunchError(f"--slurm: none of {', '.join(SLURM_SLOT_VARIABLES)} is set; pass --gpus N (ranks per node)")


def slurm_port(job_id: str) -> int:
    """The same on every node of a job; different for most jobs that share a node."""
    return SLURM_PORT_BASE + zlib.crc32(job_id.encode()) % SLURM_PORT_SPAN


def _required(environ: Mapping[str, str], name: str) -> str:
    if not environ.get(name):
        raise LaunchError(f"--slurm: {name} is not set; run inside a SLURM job")
    return environ[name]



def deepspeed_executable() -> str:
    """The `deepspeed` script of this interpreter's environment (a venv need not be activated), else PATH's."""
    beside = Path(sys.executable).parent / "deepspeed"
    found = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if not found:
        raise LaunchError(f"the DeepSpeed launcher `deepspeed` is neither next to {sys.executable} nor on PATH")
    return found


def describe(plan: Plan, environ: Mapping[str, str], stage: str) -> str:
    """What runs and what is written, with secret values masked: printed for --dry-run and before a launch."""
    lines = [f"medsapiens launch {stage}: {plan.summary}", *plan.notes]
    if plan.launch_dir == LAUNCH_DIR_PLACEHOLDER and (plan.hostfile is not None or plan.env_file is not None):
        lines.append(f"{LAUNCH_DIR_PLACEHOLDER}: a private directory (mode 0700) made at launch, removed after the run")
    if plan.hostfile is not None:
        lines.append(f"hostfile {plan.launch_dir / HOSTFILE_NAME}:")
        lines += [f"  {line}" for line in hosts.hostfile_text(plan.hostfile).splitlines()]
    if plan.env_file is not None:
        lines.append(f"env file {plan.env_file_path} (mode 0600; DeepSpeed exports it on every host):")
        lines += [f"  {variable.shown()}" for variable in plan.env_file]
    else:
        inherited = [variable.shown() for variable in rank_env.rank_variables(environ)]
        lines.append("the ranks inherit this environment" + (f", including {', '.join(inherited)}" if inherited else ""))
    command = [f"{name}={shlex.quote(value)}" for name, value in plan.extra_env.items()] + [shlex.join(plan.argv)]
    lines += ["command:", "  " + " ".join(command)]
    return "\n".join(lines)


def write_launch_files(plan: Plan) -> None:
    if plan.hostfile is not None:
        (plan.launch_dir / HOSTFILE_NAME).write_text(hosts.hostfile_text(plan.hostfile))
    if plan.env_file is not None:
        rank_env.write_env_file(plan.env_file_path, plan.env_file)


def run_command(argv: list[str], env: Mapping[str, str], stop_grace_s: float = STOP_GRACE_S,
                launch_dir: str | None = None, over_ssh: bool = False) -> int:
    """Run the launcher under a keeper (launch/keeper.py), which passes Ctrl-C, SIGTERM and SIGUSR1
    on to every process the launcher starts, and lets none of them outlive the grace period once the
    launcher is gone, even when this process is killed outright (then the keeper also removes
    `launch_dir`, which this process would have).
    Returns its exit status, or 128 + the signal that stopped us."""
    relay = keeper.Relay()  # before the keeper starts: no signal is missed
    try:
        child = subprocess.Popen(keeper.command(os.getpid(), stop_grace_s, launch_dir, over_ssh, argv), env=dict(env),
                                 start_new_session=True)
        status = relay.wait(child, child.send_signal)
    finally:
        relay.restore()
    return relay.exit_status(status)
