"""TCP ports for the rendezvous: pick a free one, or check that a given one is free."""

from __future__ import annotations

import errno
import socket

from ddplaunch.errors import LaunchError


def pick_free_port() -> int:
    """A port nobody listens on now. Rank 0 binds it a moment later (same race as torchrun)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int) -> None:
    """Fail before starting anything if another process already listens on `port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # TCPStore binds with SO_REUSEADDR too, so a port in TIME_WAIT is fine for it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LaunchError(
                    f"--master-port {port} is already in use on this machine (another job?). "
                    "Pick another port, or leave --master-port out on one node and a free "
                    "one is chosen."
                ) from None
            if exc.errno == errno.EACCES:
                raise LaunchError(
                    f"--master-port {port} needs root privileges to bind; use a port above 1023."
                ) from None
            raise
