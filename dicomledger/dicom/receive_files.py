"""The temporary files pynetdicom's chunked receive writes C-STORE datasets into.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom (3.0.4) writes each incoming dataset to a
``NamedTemporaryFile`` from its DUL thread, and nothing else owns that file:

* a write error (a full disk) raises in the DUL thread, which dies: the connection closes
  without a C-STORE response and the partial file stays;
* a store that ends any other way than through the handler (an abort or a reset mid-dataset,
  a command set pynetdicom cannot decode, an exception in the handler) leaves the file in
  ``<storage>/tmp`` until the next start.

``ReceiveFiles.install`` puts our own file in its place (pynetdicom looks the name up in
``pynetdicom.dimse_messages``). A ``ReceiveFile`` remembers a write error instead of raising
it, frees what it wrote and swallows the rest of the dataset, so the C-STORE still arrives and
is answered 0xA700; each file is registered under the association whose DUL thread created
it, and whatever that association leaves is removed when its thread ends.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import dimse_messages

log = structlog.get_logger("dicomledger.receive")


class ReceiveFile:
    """A received dataset's temporary file: the file-object calls pynetdicom makes on it
    (``write``, ``file.flush``, ``name``, ``close``), never raising an I/O error.

    pynetdicom writes the File Meta element by element, then each dataset fragment followed
    by a flush: small writes wait in a buffer for the flush, fragments go straight through.
    """

    _SMALL = 1 << 16

    def __init__(self, directory: Path, owner: Any) -> None:
        self.owner = owner  # the Association whose DUL thread receives into this file
        self.error: OSError | None = None
        self.file = self  # pynetdicom flushes through ``.file``
        self._fd: int | None = None
        self._pending = bytearray()
        try:
            self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=directory)
        except OSError as exc:  # no inode, no descriptor: still receive (and discard) it
            self.name = str(directory / f"unwritable-{id(self):x}.dcm")
            self.error = exc

    def write(self, data: bytes) -> int:
        if self._fd is not None and self.error is None:
            if len(data) < self._SMALL or self._pending:
                self._pending += data
                if len(self._pending) >= self._SMALL:
                    self.flush()
            else:
                self._write(memoryview(data))
        return len(data)

    def flush(self) -> None:
        if self._pending and self._fd is not None and self.error is None:
            pending, self._pending = self._pending, bytearray()
            self._write(memoryview(pending))

    def _write(self, view: memoryview) -> None:
        assert self._fd is not None
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._give_up(exc)

    def close(self) -> None:
        self.flush()  # (a failing flush gives up, which closes)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def remove(self) -> None:
        self._pending = bytearray()
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:  # stored (renamed), or never created
            pass

    def _give_up(self, exc: OSError) -> None:
        # Free the space at once: a full disk must not stay full because of a dataset we
        # cannot store anyway. The rest of the dataset is read and dropped.
        self.error = exc
        self.remove()


class ReceiveFiles:
    def __init__(self) -> None:
        self.directory = Path(tempfile.gettempdir())
        self._lock = threading.Lock()
        self._files: dict[str, ReceiveFile] = {}

    def install(self, directory: Path) -> None:
        self.directory = directory
        dimse_messages.NamedTemporaryFile = self._open  # type: ignore[attr-defined,assignment]

    def _open(self, **_pynetdicoms_arguments: Any) -> ReceiveFile:
        """Called by pynetdicom in the receiving association's DUL thread."""
        owner = getattr(threading.current_thread(), "assoc", None)
        received = ReceiveFile(self.directory, owner)
        with self._lock:
            self._files[received.name] = received
        if received.error is not None:
            log.error("cannot create a file for a received dataset", directory=str(self.directory),
                      error=received.error.strerror or str(received.error))
        return received

    def write_error(self, path: Path) -> OSError | None:
        """The error that stopped writing the dataset at ``path``, if any."""
        with self._lock:
            received = self._files.get(str(path))
        return received.error if received is not None else None

    def discard(self, path: Path) -> None:
        """The store of ``path`` is over: remove the file unless it was stored (renamed)."""
        with self._lock:
            received = self._files.pop(str(path), None)
        if received is not None:
            received.remove()

    def discard_association(self, assoc: Any) -> int:
        """Remove every file ``assoc`` received into and no store took; returns how many."""
        with self._lock:
            left = [r for r in self._files.values() if r.owner is assoc]
            for received in left:
                del self._files[received.name]
        for received in left:
            received.remove()
        return len(left)


RECEIVE_FILES = ReceiveFiles()
