"""The SQLite index of stored instances: patient / study / series / instance, as C-FIND needs.

It holds PHI (names, IDs, dates), so it lives beside the images, never on the ledger. It is
rebuildable from the stored files, so commits use synchronous=NORMAL in WAL mode: durable
across a killed process; after a power loss the gateway reconciles it with the ledger.
Writes are batched: concurrent C-STOREs share one transaction. The index runs on its own
thread (``sqlite_thread.py``): a lookup-and-write is one thread hop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from dicomledger.dicom.query import Query
from dicomledger.sqlite_thread import ThreadedSqlite

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


class Index(ThreadedSqlite):
    """The index, on its own thread and SQLite connection: each call is one thread hop."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "index")
        self._pending: list[tuple[str, Any, asyncio.Future[Any]]] = []
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Index:
        index = cls(path)
        await index._on_thread(index._open)
        return index

    def _open(self) -> None:
        try:
            self._connect("NORMAL", SCHEMA)
        except sqlite3.Error as exc:
            raise IndexStoreError(f"cannot open index database {self.path}: {exc}") from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._fetchall(sql, params)
        except sqlite3.Error as exc:
            raise IndexStoreError(f"index read failed ({exc}); check {self.path}") from None

    async def instance(self, sop_instance_uid: str) -> InstanceRow | None:
        rows = await self._on_thread(
            self._query,
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        return _instance_row(rows[0]) if rows else None

    async def unanchored(self) -> list[InstanceRow]:
        rows = await self._on_thread(
            self._query, f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE ledger_index IS NULL"
        )
        return [_instance_row(r) for r in rows]

    async def matching(self, grain: str, query: Query) -> list[dict[str, Any]]:
        """The records at ``grain`` (STUDY, SERIES or IMAGE) that match ``query``, flattened
        with every level above and keyed by DICOM keyword; pre-filtered in SQL on the query's
        exact PatientID / StudyInstanceUID / SeriesInstanceUID / SOPInstanceUID values.

        STUDY records carry ModalitiesInStudy and the study's series/instance counts, SERIES
        records their instance count, IMAGE records the ``InstanceRow`` under ``"_row"``.
        """
        if grain not in _GRAIN_SQL:
            raise ValueError(f"no query records at level {grain}")
        where, params = [], []
        for keyword, column in _EXACT_COLUMNS.items():
            if (values := query.exact(keyword)) is not None:
                where.append(f"{column} IN ({', '.join('?' for _ in values)})")
                params += list(values)
        select, group = _GRAIN_SQL[grain]
        sql = select + (" WHERE " + " AND ".join(where) if where else "") + group
        rows = await self._on_thread(self._query, sql, params)
        return [record for row in rows if query.matches(record := _record(grain, row))]

    async def count_instances(self) -> int:
        rows = await self._on_thread(self._query, "SELECT COUNT(*) FROM instances")
        return int(rows[0][0])

    # Writes: queued, and committed together by whichever caller takes the lock first.

    async def record_received(self, record: IndexRecord) -> InstanceRow | None:
        """Index a received instance (not yet anchored); returns the row it replaces.

        An instance identical to the current row (same content hash and header hash) is
        not written again: the current row, and its anchor, stay.
        """
        return await self._write("received", record)

    async def set_anchor(self, sop_instance_uid: str, origin: str, index: int) -> None:
        await self._write("anchor", (sop_instance_uid, origin, index))

    async def _write(self, kind: str, arg: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((kind, arg, future))
        async with self._lock:
            if not future.done():
                batch, self._pending = self._pending, []
                try:
                    results = await self._on_thread(self._commit, [(k, a) for k, a, _ in batch])
                except (sqlite3.Error, OSError) as exc:
                    error = IndexStoreError(f"index write failed ({exc}); check disk space and {self.path}")
                    for *_, f in batch:
                        f.set_exception(error)
                else:
                    for (*_, f), result in zip(batch, results, strict=True):
                        f.set_result(result)
        return await future

    def _commit(self, batch: Sequence[tuple[str, Any]]) -> list[Any]:
        db = self._db
        assert db is not None
        results: list[Any] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for kind, arg in batch:
                if kind == "received":
                    results.append(self._received(db, arg))
                else:
                    uid, origin, index = arg
                    db.execute(
                        "UPDATE instances SET ledger_origin = ?, ledger_index = ? WHERE sop_instance_uid = ?",
                        (origin, index, uid),
                    )
                    results.append(None)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return results

    @staticmethod
    def _received(db: sqlite3.Connection, record: IndexRecord) -> InstanceRow | None:
        new = record.instance
        row = db.execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?",
            (new.sop_instance_uid,),
        ).fetchone()
        previous = _instance_row(row) if row else None
        if previous and (previous.sha256, previous.header_sha256) == (new.sha256, new.header_sha256):
            return previous
        # Latest header wins for descriptive attributes (demographic corrections).
        db.execute("INSERT OR REPLACE INTO patients VALUES (?, ?, ?, ?)", astuple(record.patient))
        db.execute("INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?)", astuple(record.study))
        db.execute("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?)", astuple(record.series))
        db.execute(
            f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) VALUES ({_INSTANCE_MARKS})",
            astuple(new),
        )
        if previous is not None and previous.path != new.path:
            db.execute(
                "INSERT INTO superseded_instances VALUES (?, ?, ?, ?, ?, ?)",
                (previous.sop_instance_uid, previous.path, previous.sha256, previous.ledger_origin,
                 previous.ledger_index, new.received_at),
            )
        return previous


_EXACT_COLUMNS = {
    "PatientID": "p.patient_id",
    "StudyInstanceUID": "s.study_uid",
    "SeriesInstanceUID": "se.series_uid",
    "SOPInstanceUID": "i.sop_instance_uid",
}
_UPPER = (
    ("PatientID", "p.patient_id"), ("PatientName", "p.patient_name"),
    ("PatientBirthDate", "p.birth_date"), ("PatientSex", "p.sex"),
    ("StudyInstanceUID", "s.study_uid"), ("StudyDate", "s.study_date"), ("StudyTime", "s.study_time"),
    ("AccessionNumber", "s.accession_number"), ("StudyID", "s.study_id"),
    ("StudyDescription", "s.study_description"), ("ReferringPhysicianName", "s.referring_physician"),
)
_SERIES = (
    ("SeriesInstanceUID", "se.series_uid"), ("Modality", "se.modality"),
    ("SeriesNumber", "se.series_number"), ("SeriesDescription", "se.series_description"),
)
_JOINS = (
    " FROM instances i JOIN series se ON se.series_uid = i.series_uid"
    " JOIN studies s ON s.study_uid = se.study_uid JOIN patients p ON p.patient_id = s.patient_id"
)
_GRAIN_SQL = {
    "STUDY": (
        "SELECT " + ", ".join(c for _, c in _UPPER)
        + ", COUNT(DISTINCT se.series_uid), COUNT(*), GROUP_CONCAT(DISTINCT se.modality)" + _JOINS,
        " GROUP BY s.study_uid ORDER BY MIN(i.rowid)",
    ),
    "SERIES": (
        "SELECT " + ", ".join(c for _, c in _UPPER + _SERIES) + ", COUNT(*)" + _JOINS,
        " GROUP BY se.series_uid ORDER BY MIN(i.rowid)",
    ),
    "IMAGE": (
        "SELECT " + ", ".join(c for _, c in _UPPER + _SERIES)
        + ", " + ", ".join(f"i.{c}" for c in InstanceRow.__dataclass_fields__) + _JOINS,
        " ORDER BY s.study_uid, se.series_uid, CAST(i.instance_number AS INTEGER), i.sop_instance_uid",
    ),
}


def _record(grain: str, row: Sequence[Any]) -> dict[str, Any]:
    names = _UPPER if grain == "STUDY" else _UPPER + _SERIES
    record: dict[str, Any] = {k: v or "" for (k, _), v in zip(names, row, strict=False)}
    rest = row[len(names):]
    if grain == "STUDY":
        record["NumberOfStudyRelatedSeries"], record["NumberOfStudyRelatedInstances"] = rest[0], rest[1]
        record["ModalitiesInStudy"] = sorted(m for m in (rest[2] or "").split(",") if m)
    elif grain == "SERIES":
        record["NumberOfSeriesRelatedInstances"] = rest[0]
    else:
        instance = _instance_row(rest)
        record.update(
            SOPInstanceUID=instance.sop_instance_uid, SOPClassUID=instance.sop_class_uid,
            InstanceNumber=instance.instance_number or "", _row=instance,
        )
    return record


def _instance_row(row: Sequence[Any]) -> InstanceRow:
    values = list(row)
    values[8], values[9] = bytes(values[8]), bytes(values[9])
    values[10] = None if values[10] is None else bytes(values[10])
    return InstanceRow(*values)
