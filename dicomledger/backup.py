"""`dicomledger backup` (online, while the gateway serves) and `dicomledger restore`.

A backup is a directory::

    manifest.json    what is in it: each file's size and SHA-256, the log sizes
    manifest.sig     Ed25519 signature of the manifest by the gateway's key
    db/ledger.db, db/index.db, db/forward.db, db/lifecycle.db   (those the gateway has)
    images/<study>/<series>/<file>.dcm

Consistency while the gateway writes: each database is copied with SQLite's backup API in one
step (one read transaction: a committed state, whatever the writers do meanwhile), in this
order: forward queue, lifecycle, index, then the image files the index copy names, then the
ledger. Every index row's anchor is committed before the row cites it, so the ledger copy
(taken last) holds the anchor of every row in the index copy, and every file an index row names
was linked or copied after that row existed. A file erased between the index copy and the link
is listed as missing; the ledger copy then holds its erasure, which the restored gateway
applies at start. Images are hard-linked when the backup is on the same file system (fast,
no extra space; a later in-place change of a stored file changes the backup's copy too, which
`restore` detects by the manifest), else copied; ``--copy`` always copies.

The backup is built in a hidden ``.<name>.partial-<pid>`` directory beside the target and
renamed into place only once complete and synced: a killed backup leaves no directory that
`restore` would take (the next backup removes the leftover).

`restore` refuses while a gateway runs on the data (it holds the data directories' lock,
``datadir.py``, which `restore` takes itself while it works), refuses a backup whose manifest signature, origin, key or any file
hash does not match, and moves existing data aside (``--replace``) rather than deleting it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from dicomledger.common.errors import StorageError
from dicomledger.config import Config
from dicomledger.datadir import (
    LOCK_NAME,
    PRIVATE_MARKER,
    DataDirInUse,
    DataDirLock,
    data_directories,
    running_gateway,
)
from dicomledger.ledger.identity import Identity, load_key_file
from dicomledger.ledger.log import public_key_bytes

FORMAT = "dicomledger-backup/v1"
SIGNING_PREFIX = b"dicomledger/backup/v1\n"
CHUNK = 1 << 20


class BackupError(StorageError, RuntimeError):
    """A backup or restore cannot go on; the message says why and what to do."""


Report = Callable[[str], None]


@dataclass(frozen=True)
class Databases:
    """The gateway's databases, by their name in a backup."""

    paths: dict[str, Path]

    @classmethod
    def of(cls, config: Config) -> Databases:
        paths = {
            "ledger": config.ledger.database,
            "index": config.storage.index,
            "lifecycle": config.lifecycle_db,
        }
        if config.forwarding is not None:
            paths["forward"] = config.forwarding.queue
        return cls(paths)


def _sha256_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _snapshot(source: Path, target: Path) -> None:
    """A consistent copy of an SQLite database, in one read transaction, as one file."""
    src = sqlite3.connect(source)
    try:
        src.execute("PRAGMA busy_timeout = 10000")
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # pages=-1: all at once, from one committed state
            dst.execute("PRAGMA journal_mode = DELETE")  # self-contained: no -wal beside it
        finally:
            dst.close()
    finally:
        src.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signed(identity: Identity, manifest: bytes) -> bytes:
    return base64.b64encode(identity.private_key.sign(SIGNING_PREFIX + manifest)) + b"\n"


# -- backup ------------------------------------------------------------------------------------


def backup(
    config: Config, output: Path, *, copy: bool = False, report: Report = print
) -> dict[str, Any]:
    """Take an online backup into ``output`` (must not exist); returns the manifest."""
    output = output.absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BackupError(f"{output} exists and is not empty; name a new directory")
    if not config.ledger.database.exists():
        raise BackupError(
            f"no ledger database at {config.ledger.database}: this gateway has not run yet"
        )
    identity = Identity(config.ledger.origin, load_key_file(config.ledger.key_file))
    output.parent.mkdir(parents=True, exist_ok=True)
    for leftover in output.parent.glob(f".{output.name}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            report(f"removed {leftover}, left by a backup that did not finish")
    work = output.parent / f".{output.name}.partial-{os.getpid()}"
    work.mkdir()
    try:
        manifest = _build(config, work, copy=copy, report=report)
        data = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
        (work / "manifest.json").write_bytes(data)
        (work / "manifest.sig").write_bytes(_signed(identity, data))
        os.sync()  # every copied file, link and folder is on disk before the name appears
        if output.exists():
            output.rmdir()
        os.rename(work, output)
        _fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _build(config: Config, work: Path, *, copy: bool, report: Report) -> dict[str, Any]:
    dbs = Databases.of(config)
    (work / "db").mkdir()
    databases: dict[str, Any] = {}

    def snapshot(name: str) -> None:
        source = dbs.paths.get(name)
        if source is None or not source.exists():
            return
        target = work / "db" / f"{name}.db"
        _snapshot(source, target)
        size, digest = _sha256_file(target)
        databases[name] = {"file": f"db/{name}.db", "bytes": size, "sha256": digest}

    for name in (
        "forward",
        "lifecycle",
        "index",
    ):  # the ledger last: it holds every anchor the index cites
        snapshot(name)
    images, missing, linked = _images(config, work, copy=copy, report=report)
    snapshot("ledger")
    sizes = _log_sizes(work / "db" / "ledger.db")
    report(
        f"backup of {config.ledger.origin}: {len(images)} images "
        f"({'hard-linked' if linked else 'copied'}), ledger of {sizes.get(config.ledger.origin, 0)} entries"
    )
    if missing:
        report(
            f"{len(missing)} files named by the index were gone (erased meanwhile?); listed as missing"
        )
    return {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "origin": config.ledger.origin,
        "public_key": base64.b64encode(
            public_key_bytes(load_key_file(config.ledger.key_file).public_key())
        ).decode(),
        "logs": sizes,
        "databases": databases,
        "images": images,
        "missing": missing,
        "hard_linked": linked,
    }


def _images(
    config: Config, work: Path, *, copy: bool, report: Report
) -> tuple[list[dict[str, Any]], list[str], bool]:
    index_copy = work / "db" / "index.db"
    if not index_copy.exists():
        return [], [], False
    db = sqlite3.connect(index_copy)
    try:
        erasing = (
            {r[0] for r in db.execute("SELECT path FROM erasing")}
            if _has_table(db, "erasing")
            else set()
        )
        paths = sorted(
            {
                r[0]
                for r in db.execute(
                    "SELECT path FROM instances UNION SELECT path FROM superseded_instances"
                )
            }
            - erasing
        )
    finally:
        db.close()
    images, missing = [], []
    linked = not copy
    for n, relative in enumerate(paths, 1):
        source = config.storage.directory / relative
        target = work / "images" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if linked:
                try:
                    os.link(source, target)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    linked = False  # another file system: copy from here on
            if not linked:
                shutil.copyfile(source, target)
        except FileNotFoundError:
            missing.append(relative)
            continue
        size, digest = _sha256_file(target)
        images.append({"path": relative, "bytes": size, "sha256": digest})
        if n % 1000 == 0:
            report(f"  {n} of {len(paths)} images")
    return images, missing, linked and bool(images)


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        is not None
    )


def _log_sizes(ledger: Path) -> dict[str, int]:
    db = sqlite3.connect(ledger)
    try:
        rows = db.execute(
            "SELECT o.name, COALESCE(MAX(e.idx) + 1, 0) FROM origins o LEFT JOIN entries e ON e.origin_id = o.id"
            " GROUP BY o.id ORDER BY o.id"
        ).fetchall()
    finally:
        db.close()
    return {name: size for name, size in rows}


# -- restore -----------------------------------------------------------------------------------


def check_backup(config: Config, source: Path) -> dict[str, Any]:
    """The backup's manifest, once its signature, origin, key and every file check out;
    BackupError naming what does not."""
    try:
        data = (source / "manifest.json").read_bytes()
        sig = base64.b64decode((source / "manifest.sig").read_bytes().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise BackupError(
            f"{source} is not a complete backup (no readable manifest.json and manifest.sig: {exc})"
        ) from None
    key = load_key_file(config.ledger.key_file).public_key()
    try:
        key.verify(sig, SIGNING_PREFIX + data)
    except InvalidSignature:
        raise BackupError(
            f"{source}/manifest.json is not signed by this gateway's key: altered, or another gateway's backup"
        ) from None
    manifest: dict[str, Any] = json.loads(data)
    if manifest.get("format") != FORMAT:
        raise BackupError(
            f"{source} is a {manifest.get('format')!r} backup; this version restores {FORMAT}"
        )
    if manifest.get("origin") != config.ledger.origin:
        raise BackupError(
            f"{source} is a backup of {manifest.get('origin')}, not of {config.ledger.origin}"
        )
    problems = []
    for name, item in manifest["databases"].items():
        problems += _file_problems(source / item["file"], item, f"database {name}")
    for item in manifest["images"]:
        problems += _file_problems(source / "images" / item["path"], item, "image")
        if len(problems) > 20:
            break
    if problems:
        raise BackupError(
            f"{source} does not match its manifest; nothing was restored:\n  "
            + "\n  ".join(problems[:20])
        )
    ledger = source / "db" / "ledger.db"
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT public_key FROM origins WHERE name = ?", (config.ledger.origin,)
        ).fetchone()
    finally:
        db.close()
    if row is not None and bytes(row[0]) != public_key_bytes(key):
        raise BackupError(
            f"the backup's ledger holds {config.ledger.origin} with another key than {config.ledger.key_file}"
        )
    return manifest


def _file_problems(path: Path, item: dict[str, Any], what: str) -> list[str]:
    try:
        size, digest = _sha256_file(path)
    except OSError as exc:
        return [f"{what} {path}: cannot be read ({exc.strerror})"]
    if (size, digest) != (item["bytes"], item["sha256"]):
        return [f"{what} {path}: differs from the manifest (size {size}, sha256 {digest[:16]}…)"]
    return []


def _held_data(config: Config) -> list[Path]:
    found = []
    for path in Databases.of(config).paths.values():
        found += [p for p in (path, path.with_name(path.name + "-wal")) if p.exists()]
    images = config.storage.directory
    if images.is_dir() and any(
        p.name not in ("tmp", PRIVATE_MARKER, LOCK_NAME) for p in images.iterdir()
    ):
        found.append(images)
    return found


def restore(
    config: Config,
    source: Path,
    *,
    replace: bool = False,
    link: bool = False,
    report: Report = print,
) -> dict[str, Any]:
    """Put the backup in ``source`` back as this gateway's data (the gateway stopped)."""
    source = source.absolute()
    if (pid := running_gateway(config)) is not None:
        raise BackupError(
            f"a gateway is running on this data (process {pid}); stop it before restoring"
        )
    manifest = check_backup(config, source)
    held = _held_data(config)
    if held and not replace:
        raise BackupError(
            "the data directory already holds data ("
            + ", ".join(map(str, held))
            + "); restore --replace "
            "moves it aside (nothing is deleted)"
        )
    lock = DataDirLock(data_directories(config))  # a gateway started meanwhile stops at once
    try:
        lock.acquire()
    except DataDirInUse as exc:
        raise BackupError(str(exc)) from None
    try:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dbs = Databases.of(config)
        for path in held:
            aside = path.with_name(f"{path.name}.before-restore-{stamp}")
            os.rename(path, aside)
            report(f"moved {path} aside to {aside}")
        for path in dbs.paths.values():  # a -shm of a moved database must not meet the restored one
            for extra in (path.with_name(path.name + "-shm"), path.with_name(path.name + "-wal")):
                extra.unlink(missing_ok=True)
        for name, item in manifest["databases"].items():
            target = dbs.paths.get(name)
            if target is None:
                report(
                    f"the backup's {name} database is not restored: the config has no place for it"
                )
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".restoring")
            shutil.copyfile(source / item["file"], partial)
            os.rename(partial, target)
        images = config.storage.directory
        building = images.with_name(images.name + f".restoring-{os.getpid()}")
        for item in manifest["images"]:
            target = building / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.link(source / "images" / item["path"], target)
            else:
                shutil.copyfile(source / "images" / item["path"], target)
        building.mkdir(parents=True, exist_ok=True)
        if images.exists():  # only a tmp folder or marker (held data was moved aside)
            shutil.rmtree(images)
        os.sync()
        os.rename(building, images)
        _fsync_dir(images.parent)
    finally:
        lock.release()
    own = manifest["logs"].get(config.ledger.origin, 0)
    report(
        f"restored the backup of {manifest['created']}: {len(manifest['images'])} images, "
        f"{own} entries of this gateway's log"
    )
    report(
        "entries this gateway wrote after the backup are held by its peers; erasures on the ledger "
        "are applied again when the gateway starts"
    )
    return manifest
