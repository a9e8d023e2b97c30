"""Host lists for the DeepSpeed launcher: a hostfile (`HOST slots=N` lines) and SLURM's compressed
node list (`gpu-[01-03,07],login5`), both as an ordered {host: slots} or list of hosts."""
from __future__ import annotations

import ipaddress
import itertools
import re
import socket
from pathlib import Path

from medsapiens.errors import UserError

HOSTFILE_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\d+)")
BRACKETS = re.compile(r"\[([^\[\]]*)\]")


class HostError(UserError, ValueError):
    pass


def read_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots} in file order. Blank lines and `#` comments are skipped; anything else that is not
    `HOST slots=N` (N >= 1), or a host listed twice, is an error naming the line."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise HostError(f"hostfile not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise HostError(f"{path}: not UTF-8 text (byte {exc.start}); expected lines 'HOST slots=N'") from None
    hosts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.fullmatch(line)
        if not match:
            raise HostError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise HostError(f"{path}:{number}: {host} has slots={slots}; a host needs at least one slot")
        if host in hosts:
            raise HostError(f"{path}:{number}: {host} is listed again (first on line {first_seen[host]})")
        hosts[host], first_seen[host] = slots, number
    if not hosts:
        raise HostError(f"{path}: no hosts; expected lines 'HOST slots=N'")
    return hosts


def is_this_machine(host: str) -> bool:
    """A hostfile entry that names the launching machine: loopback, its host name, long or short, or an
    address of one of its interfaces (no DNS lookup: it could hang the launch)."""
    here = socket.gethostname()
    if host in ("localhost", "::1", here) or host.startswith("127.") or holds_address(host):  # Debian: 127.0.1.1
        return True
    return not host[:1].isdigit() and host.split(".")[0] == here.split(".")[0]


def holds_address(host: str) -> bool:
    """Whether `host` is an IP address of this machine: the kernel routes to such an address from itself
    (a UDP connect sends nothing, only picks the source address; any address may be bound to)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    with socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
        except OSError:  # no route: not here
            return False
        return ipaddress.ip_address(probe.getsockname()[0]) == address


def hostfile_text(hosts: dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order (the order SLURM numbers the nodes in):
    `gpu-[01-03,07],login5` -> gpu-01 gpu-02 gpu-03 gpu-07 login5; `n[1-2]-ib` -> n1-ib n2-ib.
    Zero padding follows the range's first number; several bracket groups multiply out."""
    hosts = [host for item in _top_level_items(nodelist) for host in _expand_item(item, nodelist)]
    repeated = sorted({h for h in hosts if hosts.count(h) > 1})
    if repeated:
        raise HostError(f"node list {nodelist!r} names {', '.join(repeated)} more than once")
    return hosts


def _top_level_items(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise HostError(f"node list {nodelist!r}: unbalanced or nested brackets at character {i + 1}")
        if char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise HostError(f"node list {nodelist!r}: a '[' is never closed")
    items.append(nodelist[start:])
    if not all(item.strip() for item in items):
        raise HostError(f"node list {nodelist!r} has an empty entry")
    return [item.strip() for item in items]


def _expand_item(item: str, nodelist: str) -> list[str]:
    parts = BRACKETS.split(item)  # literal, range, literal, range, ..., literal
    choices = [[part] if i % 2 == 0 else _expand_ranges(part, nodelist) for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """`01-03,07` -> 01 02 03 07."""
    numbers = []
    for piece in ranges.split(","):
        low, _, high = piece.partition("-")
        high = high or low
        if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
            raise HostError(f"node list {nodelist!r}: bad range {piece!r} in [{ranges}]")
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers
