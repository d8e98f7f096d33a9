"""The processes of the tests that start Ray or other servers, read from /proc: who descends from whom,
which session a process is in, its command line, and the addresses its TCP sockets listen on."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LOOPBACK", "cmdline", "descendants", "in_session", "listening_addresses", "pids", "proc_stat"]


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[3])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def in_session(sid: int) -> list[int]:
    return [p for p in pids() if (st := proc_stat(p)) is not None and st[1] == sid]


def descendants(root: int) -> list[int]:
    parents = {p: st[0] for p in pids() if (st := proc_stat(p)) is not None}
    found, frontier = [], {root}
    while frontier:
        children = {p for p, pp in parents.items() if pp in frontier}
        found += sorted(children)
        frontier = children
    return found


def listening_addresses(processes: list[int]) -> set[str]:
    """The local addresses (hex, as /proc/net shows them) of the TCP sockets ``processes`` listen on."""
    inodes = set()
    for pid in processes:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addresses.add(cols[1].split(":")[0])
    return addresses


#: 127.0.0.1 as /proc/net/tcp (little-endian) and tcp6 (v4-mapped ::ffff:127.0.0.1) write it.
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}
