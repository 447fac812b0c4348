"""ReactorCheckpoint: the sender's pause returns only once the reactor is parked (the race in
pynetdicom's own pause), never deadlocks the reactor's own thread or a dead association."""

from __future__ import annotations

import threading
import time

from dicomledger.dicom.reactor import ReactorCheckpoint


class FakeReactor(threading.Thread):
    """Loops like pynetdicom's reactor: wait at the checkpoint, then 'read the queue'."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.checkpoint = ReactorCheckpoint(self)
        self.reading = threading.Event()  # set while past the checkpoint
        self.hold = threading.Event()  # keeps the reactor past the checkpoint (losing the GIL)
        self._kill = False
        self.reads = 0

    def run(self) -> None:
        while not self._kill:
            self.checkpoint.wait()
            self.reading.set()
            self.hold.wait()
            self.reads += 1
            self.reading.clear()
            time.sleep(0.001)


def test_clear_waits_until_the_reactor_is_parked():
    reactor = FakeReactor()
    reactor.start()
    assert reactor.reading.wait(1)  # the reactor is past the checkpoint, about to read
    cleared = threading.Event()
    sender = threading.Thread(target=lambda: (reactor.checkpoint.clear(), cleared.set()))
    sender.start()
    time.sleep(0.05)
    assert not cleared.is_set()  # a sender must not go on while the reactor may read
    reads = reactor.reads
    reactor.hold.set()  # the reactor reads, comes back round and parks
    assert cleared.wait(1)
    time.sleep(0.02)
    assert reactor.reads == reads + 1  # parked: no further reads while paused
    reactor.checkpoint.set()
    time.sleep(0.02)
    assert reactor.reads > reads + 1  # running again
    reactor._kill = True
    sender.join(1)
    reactor.join(1)


def test_clear_returns_at_once_on_the_reactor_thread_and_for_a_dead_reactor():
    reactor = FakeReactor()
    done = []
    reactor.run = lambda: (reactor.checkpoint.clear(), done.append(True))  # type: ignore[method-assign]
    reactor.start()
    reactor.join(1)
    assert done == [True]  # an SCP handler on the reactor's own thread pausing it

    dead = FakeReactor()
    started = time.monotonic()
    dead.checkpoint.clear()  # never started: nobody will park
    assert time.monotonic() - started < 1
    assert not dead.checkpoint.is_set()
    assert not dead.checkpoint.wait(0.01)
