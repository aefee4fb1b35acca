"""The local Ray instance a Ray run starts (launch.init_ray) listens on 127.0.0.1 only: every
listening TCP socket of Ray's processes (GCS, raylet, dashboard and runtime-env agents, metrics,
workers) after a task and an actor ran, read from /proc (Linux). Before the fix Ray 2.60 bound
'::' / 0.0.0.0 and the host's IP (13 of 15 sockets) with _node_ip_address="127.0.0.1"."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _listening() -> dict[int, str]:
    """Socket inode -> local address of every TCP socket in LISTEN state."""
    out = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexaddr = f[1].split(":")[0]
            raw = bytes.fromhex(hexaddr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(f[9])] = str(ipaddress.ip_address(raw) if v6 else ipaddress.IPv4Address(raw))
    return out


def _ray_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray" in cmd and "pytest" not in cmd:
            pids.append(int(d.name))
    return pids


def _sockets_of(pids: list[int], listening: dict[int, str]) -> list[tuple[int, str]]:
    found = []
    for pid in pids + [os.getpid()]:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in listening:
                    found.append((pid, listening[inode]))
    return found


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_local_ray_listens_on_loopback_only():
    import ray

    from accel_tp.launch import init_ray

    assert not ray.is_initialized()
    init_ray(None, {}, 2)
    try:

        @ray.remote
        def f() -> int:
            return 1

        @ray.remote
        class A:
            def ping(self) -> int:
                return 2

        assert ray.get(f.remote()) == 1
        assert ray.get(A.remote().ping.remote()) == 2
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        sockets = _sockets_of(_ray_pids(), _listening())
    finally:
        ray.shutdown()
    assert len(sockets) >= 5, sockets  # GCS, raylet, workers, agents: the count is real
    exposed = [(pid, a) for pid, a in sockets if not _loopback(a)]
    assert not exposed, f"listening beyond loopback: {exposed}"
