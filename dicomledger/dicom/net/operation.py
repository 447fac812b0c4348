"""One DIMSE request being served (``Operation``), what its data set goes into (a sink), and
the interface a service implements (``Service``). A service is one object registered under
its request's Command Field; the association does the rest (framing, refusals, C-CANCEL,
one operation at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicomledger.dicom.net.dimse import OUT_OF_RESOURCES, Command
from dicomledger.dicom.net.negotiation import AcceptedContext

# The data set goes to disk in writev batches of at most this many bytes or pieces, so a
# received object is never held in memory beyond FLUSH_BYTES (IOV_MAX is 1024 on Linux).
FLUSH_BYTES = 4 * 1024 * 1024
FLUSH_PIECES = 512
MEMORY_DATA_SET_LIMIT = 1024 * 1024  # identifiers of C-FIND/C-MOVE/C-GET: small


class Refusal(Exception):
    """Raised by a service's ``check`` (or a sink): answer ``status`` without serving."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Sink(Protocol):
    def write(self, piece: memoryview) -> None: ...
    def finish(self, op: Operation) -> None:
        """The last piece arrived: hand the data set to ``op`` (Refusal if it is unusable)."""

    def discard(self) -> None: ...


class DiscardSink:
    """Reads a refused request's data set off the wire and keeps nothing."""

    def write(self, piece: memoryview) -> None:
        pass

    def finish(self, op: Operation) -> None:
        pass

    def discard(self) -> None:
        pass


class MemorySink:
    def __init__(self, limit: int = MEMORY_DATA_SET_LIMIT) -> None:
        self._data = bytearray()
        self._limit = limit
        self._over = False

    def write(self, piece: memoryview) -> None:
        if self._over:
            return
        self._data += piece
        if len(self._data) > self._limit:
            self._over, self._data = True, bytearray()

    def finish(self, op: Operation) -> None:
        if self._over:
            raise Refusal(OUT_OF_RESOURCES, f"data set larger than {self._limit} bytes")
        op.data_set = bytes(self._data)

    def discard(self) -> None:
        self._data = bytearray()


class FileSink:
    """Streams a data set into a new temp file behind ``header`` (its Part 10 header).

    It never raises: a file that cannot be created or written (a full disk) is removed at
    once, so the space is free again, the rest of the data set is read and dropped, and
    ``finish`` hands the error to the operation (``data_set_error``): the service answers it
    (the gateway's C-STORE: 0xA700 and its c-store line)."""

    def __init__(self, directory: Path, name: str, header: bytes) -> None:
        self.path = directory / name
        self._fd = -1
        self._pieces: list[bytes | memoryview] = [header]
        self._buffered = len(header)
        self._error: OSError | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                self._fd = os.open(self.path, flags, 0o600)
            except FileExistsError:  # left by an earlier process with our pid
                self._fd, name = tempfile.mkstemp(suffix=".dcm", dir=directory)
                self.path = Path(name)
        except OSError as exc:  # no inode, no descriptor, no directory
            self._give_up(exc)

    def write(self, piece: memoryview) -> None:
        if self._error is not None:
            return
        self._pieces.append(piece)  # a view of the received bytes: no copy until the write
        self._buffered += len(piece)
        if self._buffered >= FLUSH_BYTES or len(self._pieces) >= FLUSH_PIECES:
            self._flush()

    def _flush(self) -> None:
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        if self._error is not None:
            return
        try:
            _writev_all(self._fd, pieces)
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        self._error = exc
        self.discard()

    def finish(self, op: Operation) -> None:
        self._flush()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as exc:
                self._give_up(exc)
        op.data_set_path = self.path
        op.data_set_error = self._error

    def discard(self) -> None:
        self._pieces = []
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def _writev_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    while pieces:
        written = os.writev(fd, pieces)
        # A regular file takes it all unless the disk fills up; then go on from where it stopped.
        while pieces and written >= len(pieces[0]):
            written -= len(pieces[0])
            pieces = pieces[1:]
        if pieces and written:
            pieces[0] = memoryview(pieces[0])[written:]


@dataclass(frozen=True)
class Peer:
    """Who the association is with."""

    calling_ae: str
    address: str  # "host:port"


class Operation:
    """A request as the service sees it, and its way to answer."""

    __slots__ = (
        "peer",
        "context",
        "contexts",
        "command",
        "service",
        "sink",
        "data_set",
        "data_set_path",
        "data_set_error",
        "refusal",
        "cancelled",
        "ended",
        "status",
        "responses",
        "_send",
        "_drain",
        "_abort",
    )

    def __init__(
        self,
        peer: Peer,
        context: AcceptedContext,
        contexts: Mapping[int, AcceptedContext],
        command: Command,
        service: Service | None,
        send: Callable[[int, bytes, bytes | memoryview | None], None],
        drain: Callable[[], Awaitable[None]],
        abort: Callable[[str], None],
    ) -> None:
        self.peer = peer
        self.context = context  # the request's
        self.contexts = contexts  # all the association's (C-GET sends on its storage contexts)
        self.command = command
        self.service = service
        self.sink: Sink = DiscardSink()
        self.data_set: bytes | None = None  # data set held in memory (non-streaming services)
        self.data_set_path: Path | None = None  # temp Part 10 file (streaming services)
        self.data_set_error: OSError | None = (
            None  # the temp file could not be written: nothing usable at the path
        )
        self.refusal: Refusal | None = None
        self.cancelled = False  # a C-CANCEL-RQ for it arrived, or the association ended
        self.ended = False  # the association ended (released, aborted, reset) while it ran
        self.status: int | None = None  # the last status sent
        # Responses to requests the service sends on this association (C-GET's C-STOREs);
        # None until expect_responses(); a None item means the association ended.
        self.responses: asyncio.Queue[Command | None] | None = None
        self._send = send
        self._drain = drain
        self._abort = abort

    def respond(self, command: bytes, status: int, data_set: bytes | None = None) -> None:
        """Send a response command set (and data set) on the request's context."""
        self.status = status
        self._send(self.context.context_id, command, data_set)

    async def drain(self) -> None:
        """Wait until the peer has taken what was sent (flow control), and let C-CANCEL in."""
        await self._drain()

    def expect_responses(self) -> None:
        """Before sending requests of our own (a service with ``cancellable``, so reads go on)."""
        self.responses = asyncio.Queue()

    def send_request(
        self, context_id: int, command: bytes, data_set: bytes | memoryview | None = None
    ) -> None:
        """A request to the peer on one of the association's contexts (C-GET: a C-STORE-RQ)."""
        self._send(context_id, command, data_set)

    async def response(self) -> Command | None:
        """The next response the peer sent to our requests; None if the association ended."""
        assert self.responses is not None, "expect_responses() first"
        return await self.responses.get()

    def abort(self, reason: str) -> None:
        """A-ABORT the association (e.g. the peer did not answer a request we sent in time)."""
        self._abort(reason)

    def cleanup(self) -> None:
        """After the service: a temp file it did not move away is removed."""
        if self.data_set_path is not None:
            with contextlib.suppress(OSError):
                self.data_set_path.unlink(missing_ok=True)


class Service(Protocol):
    """A DIMSE service: one handler per request Command Field."""

    name: str  # for logs: "C-STORE", ...
    # Reads go on while it runs, so a C-CANCEL-RQ, or the responses to requests it sends, can
    # reach it; otherwise nothing is read until it has answered (the 1/1 operations window).
    cancellable: bool

    @property
    def abstract_syntaxes(self) -> Mapping[str, tuple[str, ...]]:
        """The contexts it serves, with their transfer syntaxes."""

    def check(self, op: Operation) -> None:
        """When the command set arrived, before its data set: Refusal to answer it at once
        (the data set is then read and dropped)."""

    def open_sink(self, op: Operation, temp_name: str) -> Sink:
        """Where the data set goes (FileSink for C-STORE, MemorySink otherwise)."""

    async def serve(self, op: Operation) -> None:
        """Answer the request with ``op.respond``; the final response ends the operation."""
