"""Durable file store: temp file -> fsync -> rename into study/series/instance -> fsync dir.

pynetdicom's chunked receive writes each incoming dataset to a temporary Part 10 file; the
gateway points Python's ``tempfile`` at ``<storage>/tmp`` so that file is on the same file
system and moves into place with one rename, never a copy.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from dicomledger.common.errors import StorageError

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreError(StorageError, OSError):
    """Writing to the image store failed; the message names the path."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_component(uid: str) -> str:
    """A UID as a file name; anything that is not a plain UID is hashed, never trusted as a path."""
    uid = uid.strip("\x00 ")
    if _SAFE_UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class FileStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tmp_dir = directory / "tmp"

    def prepare(self) -> int:
        """Create the folders and remove temp files a killed process left; returns how many."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    @staticmethod
    def relative_path(
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sha256: bytes,
        header_sha256: bytes | None = None,
    ) -> str:
        """``<study>/<series>/<instance>.<pixel hash 16>-<header hash 8>.dcm``: each version of
        an instance that arrives with other pixels or another header gets a file of its own, so
        storing one never overwrites another (an earlier anchor's file, or, for an instance then
        refused, the copy already held). Files stored before the header part existed are named
        ``<instance>.<pixel hash 16>.dcm``."""
        version = sha256.hex()[:16] + (
            f"-{header_sha256.hex()[:8]}" if header_sha256 is not None else ""
        )
        name = f"{path_component(sop_instance_uid)}.{version}.dcm"
        return f"{path_component(study_uid)}/{path_component(series_uid)}/{name}"

    @staticmethod
    def name_parts(name: str) -> tuple[str, str] | None:
        """(instance part, pixel hash prefix) of a stored file's name, None if not one."""
        parts = name.rsplit(".", 2)
        if len(parts) != 3 or parts[2] != "dcm":
            return None
        return parts[0], parts[1].split("-", 1)[0]

    def versions(
        self, study_uid: str, series_uid: str, sop_instance_uid: str, sha256: bytes
    ) -> list[Path]:
        """The stored files of this instance with these pixels (one per header version)."""
        folder = self.directory / path_component(study_uid) / path_component(series_uid)
        want = (path_component(sop_instance_uid), sha256.hex()[:16])
        try:
            return sorted(f for f in folder.iterdir() if self.name_parts(f.name) == want)
        except OSError:
            return []

    def absolute(self, relative: str) -> Path:
        return self.directory / relative

    def by_hash_prefix(self, prefixes: set[str]) -> dict[str, list[Path]]:
        """The stored files whose name carries one of these pixel-hash prefixes (see
        ``relative_path``), by prefix: one walk of the store."""
        found: dict[str, list[Path]] = {}
        for study in self.directory.iterdir():
            if study == self.tmp_dir or not study.is_dir():
                continue
            for series in filter(Path.is_dir, study.iterdir()):
                for f in series.iterdir():
                    parts = self.name_parts(f.name)
                    if parts is not None and parts[1] in prefixes:
                        found.setdefault(parts[1], []).append(f)
        return found

    def remove(self, relatives: list[str]) -> int:
        """Remove these stored files (an erasure) and the study and series folders left
        empty, durably (every changed folder fsynced); returns how many files were there. A
        missing file is not an error: a crash may have removed it already."""
        removed = 0
        changed: set[Path] = set()
        for relative in relatives:
            target = self.directory / relative
            try:
                target.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(exc.errno, f"cannot remove {target}: {exc.strerror}") from None
            changed.add(target.parent)
        try:
            while changed:  # deepest folders first: a series, then its study
                folder = max(changed, key=lambda f: len(f.parts))
                changed.discard(folder)
                if (
                    folder == self.directory
                    or not folder.is_relative_to(self.directory)
                    or not folder.exists()
                ):
                    if folder.exists():
                        _fsync_dir(folder)
                    continue
                try:
                    folder.rmdir()
                    changed.add(folder.parent)
                except OSError:  # not empty: its entries changed
                    _fsync_dir(folder)
        except OSError as exc:
            raise StoreError(
                exc.errno, f"cannot remove folders under {self.directory}: {exc.strerror}"
            ) from None
        return removed

    def commit(self, temp_file: Path, relative: str) -> bool:
        """Make ``temp_file`` durable under ``relative``; on return it survives a crash.

        Returns whether a file was already there (and is now replaced).
        """
        target = self.directory / relative
        try:
            fd = os.open(temp_file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if not target.parent.is_dir():
                self._make_dirs(target.parent)
            replaced = target.exists()
            os.replace(temp_file, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(exc.errno, f"cannot store {target}: {exc.strerror}") from None
        return replaced

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            _fsync_dir(d.parent)  # the new directory entry itself must be durable
