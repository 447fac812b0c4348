"""A race-free pause for pynetdicom's association reactor.

pynetdicom (3.0.4) runs a reactor thread per association that takes incoming DIMSE messages
off the queue. A thread that sends a request and waits for the response (``send_c_store``,
used by our forwarding SCU and by C-MOVE / C-GET sub-operations) first pauses the reactor:
it clears ``Association._reactor_checkpoint`` and waits until ``_is_paused`` is true. But the
reactor sets ``_is_paused`` *before* it waits on the checkpoint, and only clears it after
the wait returns; if the previous send's ``set()`` let that wait return at once, the sender
can read this stale "paused" and send while the reactor is on its way to read the queue.
When the reactor then loses the GIL for longer than one round trip, it takes the C-STORE
response itself ("Received unexpected C-STORE service message") and the sender waits for the
DIMSE timeout: a retrieval stalls for a minute and ends early. We measured this in about one
400-image C-MOVE in three on this 2-core machine (bench/retrieve_bench.py).

``ReactorCheckpoint`` replaces the checkpoint (same methods as the ``threading.Event`` it
replaces): ``clear()`` returns only once the reactor is parked inside ``wait()``, so a sender
can no longer slip past a reactor that is about to read. ``install`` puts it on an
association from ``EVT_CONN_OPEN``, before the reactor starts.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from pynetdicom import evt

log = structlog.get_logger("dicomledger.reactor")


class ReactorCheckpoint:
    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._cond = threading.Condition()
        self._open = True
        self._parked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            # The reactor's own thread pauses it while it serves a request (an SCP's handler
            # sending C-STOREs for a C-GET): it is not reading the queue then.
            if threading.current_thread() is self._assoc:
                return
            while not self._parked and self._reactor_may_run():
                self._cond.wait(0.005)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False

    def _reactor_may_run(self) -> bool:
        """False once the association thread ended or was told to: nobody will park."""
        return bool(self._assoc.is_alive() and not getattr(self._assoc, "_kill", False))


def install(event: evt.Event) -> None:
    """An EVT_CONN_OPEN handler: give the new association a ReactorCheckpoint."""
    assoc = event.assoc
    current = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(current, threading.Event) and current.is_set():
        assoc._reactor_checkpoint = ReactorCheckpoint(assoc)  # type: ignore[assignment]  # duck-types the Event
    elif not isinstance(current, ReactorCheckpoint) and not _warned.is_set():  # pynetdicom changed
        _warned.set()
        log.warning("pynetdicom's reactor checkpoint is not the one this fix expects; left as is")


_warned = threading.Event()
