"""The SQLite index of stored instances: patient / study / series / instance, as C-FIND needs.

It holds PHI (names, IDs, dates), so it lives beside the images, never on the ledger. It is
rebuildable from the stored files, so commits use synchronous=NORMAL in WAL mode: durable
across a killed process; after a power loss the gateway reconciles it with the ledger.
Writes are batched: concurrent C-STOREs share one transaction. The index runs on its own
thread (``common/sqlite_thread.py``): a lookup-and-write is one thread hop.

Every instance row names its own study and patient (``study_uid``, ``patient_id``, from its
own header): queries group and decide by those, never by another instance's patient. A study
(or series) UID that already holds another patient's instances is a conflict: the new
instance is refused (``StudyPatientConflict``), so one study never mixes patients. Studies
and series are keyed by (UID, patient): data indexed before that rule (schema version 1,
migrated at open) may still mix them, and is kept apart per patient.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dicomledger.common.errors import DicomError, StorageError
from dicomledger.common.sqlite_thread import ThreadedSqlite
from dicomledger.dicom.query import Query

SCHEMA_VERSION = 2  # 2: per-instance study and patient; studies and series keyed by patient

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_id TEXT PRIMARY KEY,
    patient_name TEXT, birth_date TEXT, sex TEXT
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    study_date TEXT, study_time TEXT, accession_number TEXT, study_id TEXT,
    study_description TEXT, referring_physician TEXT,
    PRIMARY KEY (study_uid, patient_id)
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    modality TEXT, series_number TEXT, series_description TEXT,
    PRIMARY KEY (series_uid, study_uid, patient_id)
);
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
    ledger_index INTEGER,
    study_uid TEXT,  -- NULL only for rows of schema version 1 not yet read from their file
    patient_id TEXT
);
CREATE INDEX IF NOT EXISTS instances_series_patient ON instances (series_uid, patient_id);
CREATE INDEX IF NOT EXISTS instances_study_patient ON instances (study_uid, patient_id);
CREATE INDEX IF NOT EXISTS instances_patient ON instances (patient_id);
CREATE INDEX IF NOT EXISTS instances_unanchored ON instances (ledger_index) WHERE ledger_index IS NULL;
CREATE INDEX IF NOT EXISTS instances_anchor ON instances (ledger_origin, ledger_index);
CREATE TABLE IF NOT EXISTS superseded_instances (
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    ledger_origin TEXT,
    ledger_index INTEGER,
    superseded_at TEXT NOT NULL
);
-- Stored files of erased instances not yet removed: written in the transaction that deletes
-- their rows, emptied once the files are gone, so a crash in between is finished at start.
CREATE TABLE IF NOT EXISTS erasing (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS maintenance (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Schema version 1 kept one patient per study (studies keyed by study_uid alone, instances
# without their own study and patient). Its studies and series move to the new keys; its
# instances get NULL study/patient until the gateway reads them from the stored files.
_MIGRATE_FROM_V1 = (
    """
DROP INDEX IF EXISTS studies_patient;
DROP INDEX IF EXISTS series_study;
DROP INDEX IF EXISTS instances_series;
ALTER TABLE studies RENAME TO studies_v1;
ALTER TABLE series RENAME TO series_v1;
ALTER TABLE instances ADD COLUMN study_uid TEXT;
ALTER TABLE instances ADD COLUMN patient_id TEXT;
"""
    + SCHEMA
    + """
INSERT INTO studies SELECT * FROM studies_v1;
INSERT INTO series
    SELECT se.series_uid, se.study_uid, s.patient_id, se.modality, se.series_number, se.series_description
    FROM series_v1 se JOIN studies_v1 s ON s.study_uid = se.study_uid;
DROP TABLE studies_v1;
DROP TABLE series_v1;
"""
)


class IndexStoreError(StorageError, RuntimeError):
    """The index database failed; the message says what to check."""


# The status dcm4chee-arc answers for the same conflict (CONFLICTING_PID_NOT_ACCEPTED), in the
# C-STORE "Refused" range of PS3.4 Table B.2-1: the dataset is valid, we decline to file it.
CONFLICTING_PATIENT = 0xA778


class StudyPatientConflict(DicomError):
    """A received instance names a study (or series) UID that already holds instances of
    another patient: filing it would put two patients under one UID. The message names the
    UIDs, never a Patient ID (PHI)."""

    status = CONFLICTING_PATIENT

    def __init__(self, level: str, uid: str, other_instance: str) -> None:
        super().__init__(
            f"{level} UID {uid} already holds instances of another patient (e.g. SOP instance "
            f"{other_instance}): Patient ID differs, instance not filed under that {level}"
        )
        self.level = level
        self.uid = uid
        self.other_instance = other_instance


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
    # The instance's own study and patient; the index fills them from its IndexRecord.
    # None only for a row indexed before schema version 2 and not yet read from its file.
    study_uid: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class IndexRecord:
    """An instance with the patient, study and series rows its own header gives."""

    patient: PatientRow
    study: StudyRow
    series: SeriesRow
    instance: InstanceRow


@dataclass(frozen=True)
class StudySummary:
    """One patient's part of a study, as erasure and retention list it."""

    study_uid: str
    patient_id: str
    study_date: str  # YYYYMMDD as received, "" if none
    modalities: tuple[str, ...]
    instances: int
    description: str


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
            self._connect("NORMAL", "")
            db = self._db
            assert db is not None
            # Deleted rows are overwritten with zeros, not left in free space: an erased
            # patient's name must not stay readable in the file (also a replaced row's old name).
            db.execute("PRAGMA secure_delete = ON")
            (version,) = db.execute("PRAGMA user_version").fetchone()
            has_instances = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instances'"
            ).fetchone()
            had_erasing = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'erasing'"
            ).fetchone()
            # The version is set in the same transaction as the tables it describes.
            stamp = f"PRAGMA user_version = {SCHEMA_VERSION};"
            if version >= SCHEMA_VERSION:
                db.executescript(SCHEMA)
            elif has_instances:
                self._script(_MIGRATE_FROM_V1 + stamp)
            else:
                self._script(SCHEMA + stamp)
            if (
                has_instances and not had_erasing
            ):  # written before secure_delete: stale bytes may remain
                db.execute(
                    "INSERT OR IGNORE INTO maintenance VALUES ('vacuum-before-erasure', '1')"
                )
        except sqlite3.Error as exc:
            raise IndexStoreError(f"cannot open index database {self.path}: {exc}") from None

    def _script(self, script: str) -> None:
        db = self._db
        assert db is not None
        try:
            db.executescript("BEGIN IMMEDIATE;\n" + script + "\nCOMMIT;")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

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

    async def without_identity(self) -> list[InstanceRow]:
        """Rows indexed before schema version 2 whose own study and patient are not yet known
        (read them from the stored file, then ``restore``); invisible to queries until then."""
        rows = await self._on_thread(
            self._query, f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE patient_id IS NULL"
        )
        return [_instance_row(r) for r in rows]

    async def anchored_indexes(self, origin: str) -> set[int]:
        """The ledger indexes of ``origin`` that index rows (current or superseded) cite."""
        rows = await self._on_thread(
            self._query,
            "SELECT ledger_index FROM instances WHERE ledger_origin = ? AND ledger_index IS NOT NULL"
            " UNION SELECT ledger_index FROM superseded_instances WHERE ledger_origin = ?"
            " AND ledger_index IS NOT NULL",
            (origin, origin),
        )
        return {int(r[0]) for r in rows}

    async def anchored_by(
        self, origin: str, indexes: Sequence[int]
    ) -> list[tuple[InstanceRow, str | None]]:
        """The current rows whose anchors are these entries of ``origin``'s log, each with its
        series' Modality (what routes match on)."""
        columns = ", ".join(f"i.{c}" for c in InstanceRow.__dataclass_fields__)
        wanted = sorted(set(indexes))
        found: list[tuple[InstanceRow, str | None]] = []
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = await self._on_thread(
                self._query,
                f"SELECT {columns}, se.modality FROM instances i LEFT JOIN series se ON se.series_uid = i.series_uid "
                "AND se.study_uid = i.study_uid AND se.patient_id = i.patient_id "
                f"WHERE i.ledger_origin = ? AND i.ledger_index IN ({', '.join('?' for _ in chunk)})",
                (origin, *chunk),
            )
            found += [(_instance_row(row[:-1]), row[-1]) for row in rows]
        return found

    async def matching(self, grain: str, query: Query) -> list[dict[str, Any]]:
        """The records at ``grain`` (STUDY, SERIES or IMAGE) that match ``query``, flattened
        with every level above and keyed by DICOM keyword; pre-filtered in SQL on the query's
        exact PatientID / StudyInstanceUID / SeriesInstanceUID / SOPInstanceUID values.

        A record is one patient's: a study or series UID holding instances of two patients
        (indexed before the conflict rule) gives one record per patient, each with the
        counts of that patient's instances, so an instance is always shown and decided under
        its own Patient ID. STUDY records carry ModalitiesInStudy and the study's
        series/instance counts, SERIES records their instance count, IMAGE records the
        ``InstanceRow`` under ``"_row"``.
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

    # -- erasure, retention and scrub --------------------------------------------------------

    async def patient_ids(self) -> list[str]:
        """Every Patient ID that has an instance here."""
        rows = await self._on_thread(
            self._query, "SELECT DISTINCT patient_id FROM instances WHERE patient_id IS NOT NULL"
        )
        return [r[0] for r in rows]

    async def studies(self, patient_ids: Sequence[str] | None = None) -> list[StudySummary]:
        """Each (study, patient) with instances here, of ``patient_ids`` (None: all)."""
        sql = (
            "SELECT i.study_uid, i.patient_id, s.study_date, GROUP_CONCAT(DISTINCT se.modality),"
            " COUNT(*), s.study_description FROM instances i"
            " LEFT JOIN studies s ON s.study_uid = i.study_uid AND s.patient_id = i.patient_id"
            " LEFT JOIN series se ON se.series_uid = i.series_uid AND se.study_uid = i.study_uid"
            " AND se.patient_id = i.patient_id WHERE i.patient_id IS NOT NULL"
        )
        found = []
        for params in _chunks(patient_ids):
            where = "" if params is None else f" AND i.patient_id IN ({_marks(params)})"
            rows = await self._on_thread(
                self._query,
                sql + where + " GROUP BY i.study_uid, i.patient_id ORDER BY MIN(i.rowid)",
                params or (),
            )
            found += [
                StudySummary(
                    r[0],
                    r[1],
                    r[2] or "",
                    tuple(sorted(m for m in (r[3] or "").split(",") if m)),
                    r[4],
                    r[5] or "",
                )
                for r in rows
            ]
        return found

    async def rows_of(
        self, patient_ids: Sequence[str], study_uid: str | None = None
    ) -> list[InstanceRow]:
        """The instance rows of these patients (of one study of theirs, if given)."""
        found = []
        for params in _chunks(patient_ids):
            assert params is not None
            sql = (
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE patient_id IN ({_marks(params)})"
            )
            args: list[Any] = list(params)
            if study_uid is not None:
                sql += " AND study_uid = ?"
                args.append(study_uid)
            found += [_instance_row(r) for r in await self._on_thread(self._query, sql, args)]
        return found

    async def superseded_paths(self, sop_instance_uids: Sequence[str]) -> list[str]:
        """The files of earlier versions (other pixels) of these instances."""
        found = []
        for params in _chunks(sop_instance_uids):
            assert params is not None
            rows = await self._on_thread(
                self._query,
                f"SELECT DISTINCT path FROM superseded_instances WHERE sop_instance_uid IN ({_marks(params)})",
                params,
            )
            found += [r[0] for r in rows]
        return found

    async def erase(
        self, sop_instance_uids: Sequence[str], origin: str, before_index: int
    ) -> tuple[list[str], bool]:
        """Delete the rows of these instances anchored by ``origin`` before ``before_index``
        (a row received since is another, later instance and stays), with their earlier
        versions and the patient, study and series rows no instance needs any more, in one
        transaction that also lists their files in ``erasing``. Deleted content is zeroed
        (secure_delete) and the WAL truncated, so nothing of it stays in any file. Returns
        every path in ``erasing`` (remove the files, then ``erased_files_removed``) and
        whether the WAL could be truncated (a reader may keep it busy: ``truncate_wal``)."""
        return await self._on_thread(self._erase, list(sop_instance_uids), origin, before_index)

    def _erase(self, uids: list[str], origin: str, before_index: int) -> tuple[list[str], bool]:
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(uids), _CHUNK):
                    self._erase_chunk(db, uids[start : start + _CHUNK], origin, before_index)
                # a file another row still names (a re-send in between) is not removed
                db.execute(
                    "DELETE FROM erasing WHERE path IN (SELECT path FROM instances"
                    " UNION SELECT path FROM superseded_instances)"
                )
                vacuum = db.execute(
                    "DELETE FROM maintenance WHERE key = 'vacuum-before-erasure'"
                ).rowcount
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            if vacuum:  # rows deleted before secure_delete was on may have left bytes in free space
                db.execute("VACUUM")
            truncated = self._truncate_wal(db)
            return [r[0] for r in db.execute("SELECT path FROM erasing ORDER BY path")], truncated
        except sqlite3.Error as exc:
            raise IndexStoreError(f"index erasure failed ({exc}); check {self.path}") from None

    @staticmethod
    def _erase_chunk(
        db: sqlite3.Connection, uids: list[str], origin: str, before_index: int
    ) -> None:
        rows = db.execute(
            f"SELECT sop_instance_uid, path, series_uid, study_uid, patient_id FROM instances"
            f" WHERE sop_instance_uid IN ({_marks(uids)}) AND ledger_origin = ? AND ledger_index < ?",
            (*uids, origin, before_index),
        ).fetchall()
        chosen = [r[0] for r in rows]
        if not chosen:
            return
        marks = _marks(chosen)
        db.executemany("INSERT OR IGNORE INTO erasing VALUES (?)", [(r[1],) for r in rows])
        db.execute(
            f"INSERT OR IGNORE INTO erasing SELECT path FROM superseded_instances WHERE sop_instance_uid IN ({marks})",
            chosen,
        )
        db.execute(f"DELETE FROM superseded_instances WHERE sop_instance_uid IN ({marks})", chosen)
        db.execute(f"DELETE FROM instances WHERE sop_instance_uid IN ({marks})", chosen)
        for series_uid, study_uid, patient_id in {(r[2], r[3], r[4]) for r in rows}:
            db.execute(
                "DELETE FROM series WHERE series_uid = ? AND study_uid = ? AND patient_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM instances WHERE series_uid = ? AND study_uid = ? AND patient_id = ?)",
                (series_uid, study_uid, patient_id) * 2,
            )
        for study_uid, patient_id in {(r[3], r[4]) for r in rows}:
            db.execute(
                "DELETE FROM studies WHERE study_uid = ? AND patient_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM instances WHERE study_uid = ? AND patient_id = ?)",
                (study_uid, patient_id) * 2,
            )
        for patient_id in {r[4] for r in rows}:
            db.execute(
                "DELETE FROM patients WHERE patient_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM instances WHERE patient_id = ?)",
                (patient_id, patient_id),
            )

    @staticmethod
    def _truncate_wal(db: sqlite3.Connection) -> bool:
        """Copy the WAL into the database and cut it to zero bytes: the WAL keeps old page
        images (with deleted rows) until it is overwritten, which may be never. False if a
        reader kept it busy past the busy timeout."""
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    async def truncate_wal(self) -> bool:
        def truncate() -> bool:
            assert self._db is not None
            try:
                return self._truncate_wal(self._db)
            except sqlite3.Error as exc:
                raise IndexStoreError(
                    f"index checkpoint failed ({exc}); check {self.path}"
                ) from None

        return await self._on_thread(truncate)

    async def erasing(self) -> list[str]:
        """Files of erased instances still to be removed (left by a crash during an erasure)."""
        rows = await self._on_thread(self._query, "SELECT path FROM erasing ORDER BY path")
        return [r[0] for r in rows]

    async def erased_files_removed(self, paths: Sequence[str]) -> bool:
        """Forget these removed files; returns whether the WAL could be truncated after."""

        def forget() -> bool:
            db = self._db
            assert db is not None
            try:
                for params in _chunks(paths):
                    assert params is not None
                    db.execute(f"DELETE FROM erasing WHERE path IN ({_marks(params)})", params)
                return self._truncate_wal(db)
            except sqlite3.Error as exc:
                raise IndexStoreError(f"index write failed ({exc}); check {self.path}") from None

        return await self._on_thread(forget)

    async def rows_after(self, rowid: int, limit: int) -> list[tuple[int, InstanceRow]]:
        """Up to ``limit`` instance rows after ``rowid``, in rowid order, with their rowids
        (a scrub walks the index in batches and can resume where it stopped)."""
        rows = await self._on_thread(
            self._query,
            f"SELECT rowid, {_INSTANCE_COLUMNS} FROM instances WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (rowid, limit),
        )
        return [(r[0], _instance_row(r[1:])) for r in rows]

    async def totals(self) -> tuple[int, int]:
        """(instances, bytes of their stored files)."""
        rows = await self._on_thread(
            self._query, "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances"
        )
        return int(rows[0][0]), int(rows[0][1])

    # Writes: queued, and committed together by whichever caller takes the lock first.

    async def record_received(self, record: IndexRecord) -> InstanceRow | None:
        """Index a received instance (not yet anchored); returns the row it replaces.

        An instance identical to the current row (same content hash and header hash) is
        not written again: the current row, and its anchor, stay. Raises
        StudyPatientConflict (and writes nothing) if the instance's study or series UID
        already holds instances of another patient.
        """
        return await self._write("received", record)

    async def restore(self, record: IndexRecord) -> bool:
        """Write a row rebuilt from a stored file (anchor included), whatever the study
        holds: the instance is stored and anchored already, and keeps its own patient.
        Returns whether its study or series UID also holds another patient's instances."""
        return await self._write("restore", record)

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
                    error = IndexStoreError(
                        f"index write failed ({exc}); check disk space and {self.path}"
                    )
                    for *_, f in batch:
                        f.set_exception(error)
                else:
                    for (*_, f), result in zip(batch, results, strict=True):
                        if isinstance(result, StudyPatientConflict):
                            f.set_exception(result)
                        else:
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
                elif kind == "restore":
                    record = arg
                    results.append(_conflict(db, record) is not None)
                    _write_record(db, record)
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
    def _received(
        db: sqlite3.Connection, record: IndexRecord
    ) -> InstanceRow | StudyPatientConflict | None:
        new = record.instance
        row = db.execute(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?",
            (new.sop_instance_uid,),
        ).fetchone()
        previous = _instance_row(row) if row else None
        if previous and (previous.sha256, previous.header_sha256) == (
            new.sha256,
            new.header_sha256,
        ):
            return previous
        if (conflict := _conflict(db, record)) is not None:
            return conflict
        _write_record(db, record)
        if previous is not None and previous.path != new.path:
            db.execute(
                "INSERT INTO superseded_instances VALUES (?, ?, ?, ?, ?, ?)",
                (
                    previous.sop_instance_uid,
                    previous.path,
                    previous.sha256,
                    previous.ledger_origin,
                    previous.ledger_index,
                    new.received_at,
                ),
            )
        return previous


class IngestRows:
    """The index as the ingest path writes it: its own connection, used only on the thread
    that commits the ledger (``gateway.IndexCompanion``), so a received instance's lookup,
    conflict check and row share that thread's one hop with its ledger entry, and its row is
    written (with its anchor) right after the entry is durable. synchronous=NORMAL as the rest
    of the index: a row a power loss drops is rebuilt from the ledger at start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA busy_timeout=10000")
                db.execute(
                    "PRAGMA secure_delete = ON"
                )  # a replaced row's PHI leaves no bytes behind
            except sqlite3.Error as exc:
                raise IndexStoreError(f"cannot open index database {self.path}: {exc}") from None
            self._db = db
        return self._db

    def previous(self, sop_instance_uid: str) -> InstanceRow | None:
        """The current row of this SOP instance, if any."""
        try:
            row = (
                self._conn()
                .execute(
                    f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?",
                    (sop_instance_uid,),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise IndexStoreError(f"index read failed ({exc}); check {self.path}") from None
        return _instance_row(row) if row else None

    def conflict(self, record: IndexRecord) -> StudyPatientConflict | None:
        """Another patient's instance under the record's study or series UID, if any."""
        try:
            return _conflict(self._conn(), record)
        except sqlite3.Error as exc:
            raise IndexStoreError(f"index read failed ({exc}); check {self.path}") from None

    def write(self, received: Sequence[tuple[IndexRecord, InstanceRow | None]]) -> None:
        """Write the rows of received instances (anchors set) in one transaction; an earlier
        version's file is recorded as superseded. ``received``: (record, the row it replaces)."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for record, previous in received:
                    _write_record(db, record)
                    new = record.instance
                    if previous is not None and previous.path != new.path:
                        db.execute(
                            "INSERT INTO superseded_instances VALUES (?, ?, ?, ?, ?, ?)",
                            (
                                previous.sop_instance_uid,
                                previous.path,
                                previous.sha256,
                                previous.ledger_origin,
                                previous.ledger_index,
                                new.received_at,
                            ),
                        )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise IndexStoreError(
                f"index write failed ({exc}); check disk space and {self.path}"
            ) from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


_CHUNK = 500  # values per IN (...): well below SQLite's limit on host parameters


def _chunks(values: Sequence[str] | None) -> list[list[str] | None]:
    """``values`` in pieces of at most _CHUNK (one piece, None, for "no filter")."""
    if values is None:
        return [None]
    items = list(values)
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _conflict(db: sqlite3.Connection, record: IndexRecord) -> StudyPatientConflict | None:
    """Another patient's instance under the record's study or series UID, if any. The
    instance itself does not count: a re-send may correct its own Patient ID.

    Two index range probes per level (Patient IDs below and above this one), each reading at
    most two rows, one of which may be the instance itself: cheap however large the study."""
    patient, uid = record.patient.patient_id, record.instance.sop_instance_uid
    for level, column, value in (
        ("study", "study_uid", record.study.study_uid),
        ("series", "series_uid", record.series.series_uid),
    ):
        for other in ("<", ">"):
            rows = db.execute(
                f"SELECT sop_instance_uid FROM instances WHERE {column} = ? AND patient_id {other} ? LIMIT 2",
                (value, patient),
            ).fetchall()
            if found := [r[0] for r in rows if r[0] != uid]:
                return StudyPatientConflict(level, value, found[0])
    return None


def _values(record: Any) -> tuple[Any, ...]:
    """A record's fields as an SQL row (``dataclasses.astuple`` deep-copies every value: slow
    on the ingest path, and these are flat)."""
    return tuple(getattr(record, f.name) for f in fields(record))


def _write_record(db: sqlite3.Connection, record: IndexRecord) -> None:
    # Latest header wins for descriptive attributes (demographic corrections).
    patient, study, series = record.patient, record.study, record.series
    instance = replace(record.instance, study_uid=study.study_uid, patient_id=patient.patient_id)
    db.execute("INSERT OR REPLACE INTO patients VALUES (?, ?, ?, ?)", _values(patient))
    db.execute("INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _values(study))
    db.execute(
        "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?)",
        (
            series.series_uid,
            series.study_uid,
            patient.patient_id,
            series.modality,
            series.series_number,
            series.series_description,
        ),
    )
    db.execute(
        f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) VALUES ({_INSTANCE_MARKS})",
        _values(instance),
    )


_EXACT_COLUMNS = {
    "PatientID": "i.patient_id",
    "StudyInstanceUID": "i.study_uid",
    "SeriesInstanceUID": "i.series_uid",
    "SOPInstanceUID": "i.sop_instance_uid",
}
_UPPER = (
    ("PatientID", "p.patient_id"),
    ("PatientName", "p.patient_name"),
    ("PatientBirthDate", "p.birth_date"),
    ("PatientSex", "p.sex"),
    ("StudyInstanceUID", "s.study_uid"),
    ("StudyDate", "s.study_date"),
    ("StudyTime", "s.study_time"),
    ("AccessionNumber", "s.accession_number"),
    ("StudyID", "s.study_id"),
    ("StudyDescription", "s.study_description"),
    ("ReferringPhysicianName", "s.referring_physician"),
)
_SERIES = (
    ("SeriesInstanceUID", "se.series_uid"),
    ("Modality", "se.modality"),
    ("SeriesNumber", "se.series_number"),
    ("SeriesDescription", "se.series_description"),
)
# Every level is joined on the instance's own study and patient, never through another
# instance's: one patient's instances are never shown under another's Patient ID.
_JOINS = (
    " FROM instances i"
    " JOIN series se ON se.series_uid = i.series_uid AND se.study_uid = i.study_uid AND se.patient_id = i.patient_id"
    " JOIN studies s ON s.study_uid = i.study_uid AND s.patient_id = i.patient_id"
    " JOIN patients p ON p.patient_id = i.patient_id"
)
_GRAIN_SQL = {
    "STUDY": (
        "SELECT "
        + ", ".join(c for _, c in _UPPER)
        + ", COUNT(DISTINCT se.series_uid), COUNT(*), GROUP_CONCAT(DISTINCT se.modality)"
        + _JOINS,
        " GROUP BY i.study_uid, i.patient_id ORDER BY MIN(i.rowid)",
    ),
    "SERIES": (
        "SELECT " + ", ".join(c for _, c in _UPPER + _SERIES) + ", COUNT(*)" + _JOINS,
        " GROUP BY i.series_uid, i.study_uid, i.patient_id ORDER BY MIN(i.rowid)",
    ),
    "IMAGE": (
        "SELECT "
        + ", ".join(c for _, c in _UPPER + _SERIES)
        + ", "
        + ", ".join(f"i.{c}" for c in InstanceRow.__dataclass_fields__)
        + _JOINS,
        " ORDER BY s.study_uid, se.series_uid, CAST(i.instance_number AS INTEGER), i.sop_instance_uid",
    ),
}


def _record(grain: str, row: Sequence[Any]) -> dict[str, Any]:
    names = _UPPER if grain == "STUDY" else _UPPER + _SERIES
    record: dict[str, Any] = {k: v or "" for (k, _), v in zip(names, row, strict=False)}
    rest = row[len(names) :]
    if grain == "STUDY":
        record["NumberOfStudyRelatedSeries"], record["NumberOfStudyRelatedInstances"] = (
            rest[0],
            rest[1],
        )
        record["ModalitiesInStudy"] = sorted(m for m in (rest[2] or "").split(",") if m)
    elif grain == "SERIES":
        record["NumberOfSeriesRelatedInstances"] = rest[0]
    else:
        instance = _instance_row(rest)
        record.update(
            SOPInstanceUID=instance.sop_instance_uid,
            SOPClassUID=instance.sop_class_uid,
            InstanceNumber=instance.instance_number or "",
            _row=instance,
        )
    return record


def _instance_row(row: Sequence[Any]) -> InstanceRow:
    values = list(row)
    values[8], values[9] = bytes(values[8]), bytes(values[9])
    values[10] = None if values[10] is None else bytes(values[10])
    return InstanceRow(*values)
