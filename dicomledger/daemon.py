"""The service manager's readiness protocol (systemd's sd_notify, ``Type=notify`` units such as
deploy/dicomledger.service): ``READY=1`` once the gateway listens and its ledger and index are
open, ``STOPPING=1`` when it begins to stop. Nothing happens unless the service manager set
``NOTIFY_SOCKET``."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager; False if none listens."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True
