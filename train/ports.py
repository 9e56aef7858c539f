"""A free TCP port on this machine, for a rendezvous that one process opens a moment later.

Light on purpose (``socket`` only): the agent, which must not import torch, uses it too."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now; the caller's store binds it next (a small race, as torchrun's)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
