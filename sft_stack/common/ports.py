"""A free loopback port, for a rendezvous or a server that must not collide with another on the default port.

The one home for the probe (the launcher's one-process run, the demo's launches, the tests' servers): bind port 0,
read the port the kernel chose, close. Another process may take it before the caller binds it; every caller
binds it within moments, which is as good as a probe can do.
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
