"""The environment the training ranks need from the launching shell: S3 endpoint and credentials
(AWS_*), NCCL tuning (NCCL_*), MEDSAPIENS_* settings, and PyTorch's own run-time settings on the GPU
(PYTORCH_* such as PYTORCH_CUDA_ALLOC_CONF, which the out-of-memory line advises; TORCH_NCCL_*,
TORCH_CUDNN_*, TORCH_DISTRIBUTED_*; CUDA_LAUNCH_BLOCKING).

Ranks started on this machine or by srun inherit the environment. Ranks that DeepSpeed starts over
ssh (a hostfile with several hosts) get only what DeepSpeed exports: the PYTHON*/MLFLOW*/MV2*/UCX*
variables, the accelerator's own (NCCL* on CUDA, none on a CPU-only login node), and the lines of a
`.deepspeed_env` file. This module writes that file. Values of secrets are never shown.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medsapiens.errors import InputError

# Not CUDA_VISIBLE_DEVICES (DeepSpeed sets it on each host) nor paths of this machine (TORCH_HOME).
RANK_PREFIXES = ("AWS_", "NCCL_", "MEDSAPIENS_", "PYTORCH_", "TORCH_NCCL_", "TORCH_CUDNN_", "TORCH_DISTRIBUTED_",
                 "CUDA_LAUNCH_BLOCKING")
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")  # AWS_ACCESS_KEY_ID included
FROM_ENVIRONMENT = "environment"
# DeepSpeed wraps an exported value in double quotes for the remote shell, where these still act; pdsh
# rewrites % sequences (%h, %n) anywhere in the command it runs.
NOT_EXPORTABLE = re.compile(r'["$`\\\n%]')
URL_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")  # postgres://user:password@host: shown as <set> too


@dataclass(frozen=True)
class Variable:
    name: str
    value: str
    source: str = FROM_ENVIRONMENT  # or the `.deepspeed_env` file it came from

    def shown(self) -> str:
        secret = any(word in self.name for word in SECRET_WORDS) or URL_PASSWORD.search(self.value)
        value = "<set>" if secret else self.value
        origin = "" if self.source == FROM_ENVIRONMENT else f"  (from {self.source})"
        return f"{self.name}={value}{origin}"


def rank_variables(environ: Mapping[str, str]) -> list[Variable]:
    return [Variable(name, environ[name]) for name in sorted(environ) if name.startswith(RANK_PREFIXES)]


def user_env_files(environ: Mapping[str, str], cwd: Path) -> list[Path]:
    """The `.deepspeed_env` files DeepSpeed's runner reads (home, then the working directory; the
    name can be changed with DS_ENV_FILE); pointing DS_ENV_FILE at our own file hides them."""
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    candidates = [Path(os.path.expanduser("~")) / name, cwd / name]
    files: list[Path] = []
    for path in candidates:
        if path.is_file() and path.resolve() not in [f.resolve() for f in files]:
            files.append(path)
    return files


def read_env_file(path: Path) -> list[Variable]:
    """`NAME=value` lines, as DeepSpeed reads them (split at the first '='; blank lines and comments,
    which DeepSpeed would choke on, are skipped here)."""
    variables = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise InputError(f"{path}:{number}: expected NAME=value")
        variables.append(Variable(name.strip(), value.strip(), str(path)))
    return variables


def env_file_variables(environ: Mapping[str, str], cwd: Path) -> list[Variable]:
    """What our env file carries: the rank variables of this shell, then the user's own `.deepspeed_env`
    lines, which win on a repeated name as they would in DeepSpeed (it reads the files last)."""
    ours = rank_variables(environ)
    for variable in ours:
        if NOT_EXPORTABLE.search(variable.value):
            raise InputError(f"{variable.name}: its value holds a character (\" $ ` \\ % or a newline) that "
                             "DeepSpeed's ssh launch cannot pass on; set it on the hosts instead")
    merged = {v.name: v for v in ours}
    for path in user_env_files(environ, cwd):
        merged.update((v.name, v) for v in read_env_file(path))
    return list(merged.values())


def write_env_file(path: Path, variables: list[Variable]) -> None:
    """Mode 0600 from the start: the file may hold credentials."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{v.name}={v.value}\n" for v in variables)
