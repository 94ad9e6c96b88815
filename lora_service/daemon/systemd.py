"""sd_notify in a few lines: READY=1, WATCHDOG=1, STATUS=... on $NOTIFY_SOCKET, a no-op without it.

A message that cannot be sent (systemd restarting, a stale socket) is dropped: telling systemd
how we are must never be what stops the service.
"""

from __future__ import annotations

import os
import socket

EXTEND_EVERY_S = 10.0  # while a slow start-up step runs, ask for this much more, twice over


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(message.encode(), socket.MSG_DONTWAIT)  # a full queue must not block us
    except OSError:
        return False
    return True


def extend_start_timeout() -> bool:
    """Push systemd's start timeout (TimeoutStartSec) out while start-up is busy but alive."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_EVERY_S * 3 * 1_000_000)}")


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (as systemd recommends), or None when it is not set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2
