"""The gateway's data on disk: one running gateway per data directory, and private file modes.

Lock: ``serve`` holds an exclusive ``flock`` on ``dicomledger.lock`` in every directory its
data lives in (ledger, index, forward queue, admin socket, image store) for as long as it
runs. A second ``serve`` on any of them stops before it opens, removes or listens on anything
there. The kernel drops the lock when the process ends, even on ``kill -9``, so a stale lock
file never blocks a restart. ``status`` asks the same lock whether a gateway runs.

Modes: the index and the images hold PHI, the ledger and keys are the gateway's own secrets.
``init``, ``serve`` and every other command run with umask 077 (every file the process
creates is 0600, every directory 0700), and ``serve`` first takes group and other access off what an earlier version
left open (the whole image store on the first start only, see ``PRIVATE_MARKER``).
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from dicomledger.common.errors import StorageError
from dicomledger.config import Config

LOCK_NAME = "dicomledger.lock"
PRIVATE_UMASK = 0o077
# In the image store once every file in it is private; later starts skip the walk (one lstat
# per stored file: minutes on a large store), since every file created since is private too.
PRIVATE_MARKER = "dicomledger.private"
MARKER_TEXT = (
    "dicomledger serve made every file and folder of this image store private (0600/0700) and\n"
    "creates new ones private. Remove this file to have the next start check every file again.\n"
)


class DataDirInUse(StorageError, RuntimeError):
    """Another process holds a data directory's lock; the message names it and the process."""


def data_directories(config: Config) -> list[Path]:
    """Every directory the gateway's data lives in, the ledger's first."""
    dirs = [
        config.ledger.database.parent,
        config.storage.index.parent,
        config.storage.directory,
        config.lifecycle_db.parent,
    ]
    if config.admin_socket is not None:
        dirs.append(config.admin_socket.parent)
    if config.forwarding is not None:
        dirs.append(config.forwarding.queue.parent)
    if config.atna is not None:
        dirs.append(config.atna.queue.parent)
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in (u.resolve() for u in unique):
            unique.append(d)
    return unique


def _holder(fd: int) -> str:
    """The process id the lock holder wrote into its lock file (or "?")."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "?"


class DataDirLock:
    """Exclusive locks on the data directories, held until ``release`` or the process ends."""

    def __init__(self, directories: Iterable[Path]) -> None:
        self.directories = list(directories)
        self._fds: list[int] = []

    def acquire(self, wait: float = 1.0) -> None:
        """Take every lock or none. ``wait`` covers a ``status`` that holds a shared lock for
        an instant while it looks; a running gateway holds its lock for good."""
        try:
            for directory in self.directories:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
                self._fds.append(fd)
                deadline = time.monotonic() + wait
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise DataDirInUse(
                                f"the data directory {directory} is in use by another gateway "
                                f"(process {_holder(fd)} holds {directory / LOCK_NAME}); "
                                "stop it first, or give this gateway its own data directory"
                            ) from None
                        time.sleep(0.05)
        except BaseException:
            self.release()
            raise
        pid = f"{os.getpid()}\n".encode()
        for fd in self._fds:
            os.ftruncate(fd, 0)
            os.pwrite(fd, pid, 0)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the descriptor drops its flock
        self._fds.clear()


def running_gateway(config: Config) -> str | None:
    """The process id of the gateway running on this data ("?" if unknown), or None if none is.

    Looks without creating anything: no lock file means no gateway ever ran here."""
    path = data_directories(config)[0] / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)  # also drops our shared lock at once
    return None


# -- private modes ---------------------------------------------------------------------------


def _private_files(config: Config) -> list[Path]:
    """The gateway's own files outside the image store (which is walked whole)."""
    files = [config.path, config.ledger.key_file, config.pseudonym_secret_file]
    for db in (
        config.ledger.database,
        config.storage.index,
        config.lifecycle_db,
        config.forwarding.queue if config.forwarding is not None else None,
        config.atna.queue if config.atna is not None else None,
    ):  # audit messages name patients
        if db is not None:
            files += [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    if config.peering is not None:
        files.append(config.peering.tls_key)
    if config.atna is not None and config.atna.tls_key is not None:
        files.append(config.atna.tls_key)
    files += [path for _, path in config.permissions.issuer_keys]
    return files


def _tighten(path: Path, directory: bool) -> bool:
    """Take group and other access off ``path``; True if its mode changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or (directory and not stat.S_ISDIR(st.st_mode)):
        return False  # a symlink's mode means nothing; its target is not ours to change
    if st.st_mode & 0o077 == 0:
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
    return True


def _folders(directory: Path, home: Path) -> list[Path]:
    """``directory`` and its parents strictly below ``home`` (none if it is not below home)."""
    return [p for p in [directory, *directory.parents] if p.is_relative_to(home) and p != home]


def make_private(config: Config) -> list[Path]:
    """Take group and other access off the gateway's data: the data directories, every file
    and folder in the image store, the databases, keys, config and admin socket, and the
    folders between them and the config's folder. Returns what was changed. The config's
    own folder is left alone (it may be a shared one such as /etc), and so is a folder of
    ours outside it other than a data directory."""
    home = config.path.parent.resolve()
    files = _private_files(config) + [d / LOCK_NAME for d in data_directories(config)]
    if config.admin_socket is not None:
        files.append(config.admin_socket)
    dirs: set[Path] = set()
    for d in data_directories(config):
        dirs.update([d.resolve(), *_folders(d.resolve(), home)])
    for f in files:
        dirs.update(_folders(f.resolve().parent, home))
    changed = [d for d in sorted(dirs) if _tighten(d, directory=True)]
    changed += [f for f in files if _tighten(f, directory=False)]
    marker = config.storage.directory / PRIVATE_MARKER
    if not marker.exists():  # one walk of the image store, the first time only
        for root, subdirs, names in os.walk(config.storage.directory):
            changed += [Path(root, n) for n in subdirs if _tighten(Path(root, n), directory=True)]
            changed += [Path(root, n) for n in names if _tighten(Path(root, n), directory=False)]
        if config.storage.directory.is_dir():
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as marker_file:
                marker_file.write(MARKER_TEXT)
    return changed


def set_private_umask() -> None:
    """Everything this process creates from now on: files 0600, directories 0700."""
    os.umask(PRIVATE_UMASK)
