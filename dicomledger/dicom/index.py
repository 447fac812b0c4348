"""The SQLite index of stored instances: patient / study / series / instance, as C-FIND needs.

It holds PHI (names, IDs, dates), so it lives beside the images, never on the ledger. It is
rebuildable from the stored files, so commits use synchronous=NORMAL in WAL mode: durable
across a killed process; after a power loss the gateway reconciles it with the ledger.
Writes are batched: concurrent C-STOREs share one transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import aiosqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_id TEXT PRIMARY KEY,
    patient_name TEXT, birth_date TEXT, sex TEXT
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    study_date TEXT, study_time TEXT, accession_number TEXT, study_id TEXT,
    study_description TEXT, referring_physician TEXT
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT, series_number TEXT, series_description TEXT
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_number TEXT,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    hash_method TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    header_sha256 BLOB NOT NULL,
    decoded_sha256 BLOB,
    number_of_frames INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at TEXT NOT NULL,
    ledger_origin TEXT,
    ledger_index INTEGER
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_unanchored ON instances (ledger_index) WHERE ledger_index IS NULL;
CREATE TABLE IF NOT EXISTS superseded_instances (
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    ledger_origin TEXT,
    ledger_index INTEGER,
    superseded_at TEXT NOT NULL
);
"""


class IndexStoreError(RuntimeError):
    """The index database failed; the message says what to check."""


@dataclass(frozen=True)
class PatientRow:
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    patient_id: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    series_number: str
    series_description: str


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    instance_number: str
    transfer_syntax_uid: str
    path: str  # relative to the storage directory
    size: int
    hash_method: str
    sha256: bytes
    header_sha256: bytes
    decoded_sha256: bytes | None
    number_of_frames: int
    calling_ae: str
    received_at: str
    ledger_origin: str | None = None
    ledger_index: int | None = None


@dataclass(frozen=True)
class IndexRecord:
    patient: PatientRow
    study: StudyRow
    series: SeriesRow
    instance: InstanceRow


_INSTANCE_COLUMNS = ", ".join(InstanceRow.__dataclass_fields__)
_INSTANCE_MARKS = ", ".join("?" for _ in InstanceRow.__dataclass_fields__)


class Index:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self._pending: list[tuple[str, Any, asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Index:
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=10000")
            await db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise IndexStoreError(f"cannot open index database {path}: {exc}") from None
        return cls(db, path)

    async def close(self) -> None:
        await self.db.close()

    async def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        async with self.db.execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _instance_row(row)

    async def unanchored(self) -> list[InstanceRow]:
        async with self.db.execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE ledger_index IS NULL"
        ) as cur:
            return [_instance_row(r) for r in await cur.fetchall()]

    async def count_instances(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM instances") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # Writes: queued and committed together by whichever caller takes the lock first.

    async def put(self, record: IndexRecord, superseded: InstanceRow | None = None) -> None:
        await self._write(("put", (record, superseded)))

    async def set_anchor(self, sop_instance_uid: str, origin: str, index: int) -> None:
        await self._write(("anchor", (sop_instance_uid, origin, index)))

    async def _write(self, op: tuple[str, Any]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((op[0], op[1], future))
        async with self._lock:
            if future.done():
                return await future
            batch, self._pending = self._pending, []
            try:
                await self._commit(batch)
            except (sqlite3.Error, OSError) as exc:
                error = IndexStoreError(f"index write failed ({exc}); check disk space and {self.path}")
                for *_, f in batch:
                    f.set_exception(error)
            else:
                for *_, f in batch:
                    f.set_result(None)
        await future

    async def _commit(self, batch: Sequence[tuple[str, Any, asyncio.Future[None]]]) -> None:
        patients, studies, series, instances, superseded, anchors = [], [], [], [], [], []
        for kind, arg, _ in batch:
            if kind == "put":
                record, old = arg
                patients.append(astuple(record.patient))
                studies.append(astuple(record.study))
                series.append(astuple(record.series))
                instances.append(astuple(record.instance))
                if old is not None:
                    superseded.append(
                        (old.sop_instance_uid, old.path, old.sha256, old.ledger_origin,
                         old.ledger_index, record.instance.received_at)
                    )
            else:
                anchors.append((arg[1], arg[2], arg[0]))
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        try:
            if patients:
                # Latest header wins for descriptive attributes (demographic corrections).
                await db.executemany("INSERT OR REPLACE INTO patients VALUES (?, ?, ?, ?)", patients)
                await db.executemany(
                    "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?)", studies
                )
                await db.executemany("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?)", series)
                await db.executemany(
                    f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) VALUES ({_INSTANCE_MARKS})",
                    instances,
                )
            if superseded:
                await db.executemany(
                    "INSERT INTO superseded_instances VALUES (?, ?, ?, ?, ?, ?)", superseded
                )
            if anchors:
                await db.executemany(
                    "UPDATE instances SET ledger_origin = ?, ledger_index = ? WHERE sop_instance_uid = ?",
                    anchors,
                )
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise


def _instance_row(row: Sequence[Any]) -> InstanceRow:
    values = list(row)
    values[8], values[9] = bytes(values[8]), bytes(values[9])
    values[10] = None if values[10] is None else bytes(values[10])
    return InstanceRow(*values)
