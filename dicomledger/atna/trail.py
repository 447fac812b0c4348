"""The audit trail: events in, DICOM audit messages out to the hospital's audit repository.

The gateway calls one method per event (``AuditSink``'s); each returns at once, from any
thread, and never raises: a C-STORE never waits for the audit trail. Two threads of our own
do the rest:

* the **writer** turns events into RFC 5424 messages and commits them to the queue (SQLite,
  ``synchronous=FULL``, a private file: the messages name patients). Received, forwarded and
  retrieved instances are first kept as ``pending`` rows and folded into one "DICOM Instances
  Transferred" message per association peer, patient and outcome (and, for a C-MOVE or C-GET,
  per operation) once no instance of that group arrived for ``transfer_window`` seconds (PS3.15 A.5.3.7: one patient per message);
  the folding is a transaction too, so a crash loses nothing committed, and a restart folds
  what an earlier run left.
* the **sender** sends queued messages in order and deletes each once the transport took it;
  when the repository is unreachable it retries with exponential back-off (``retry_initial``
  doubling up to ``retry_max``) and logs the outage once, and its recovery once.

The queue is bounded (``max_queued`` messages). When full, new messages are dropped and
counted (one error line); once there is room again a Security Alert "Audit Recording Stopped"
tells the repository how many were lost, between when and when.

Patient IDs and names go into the queue and to the repository only, never into our log
lines (they count, name AE titles, addresses and reasons) or the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicomledger.atna import messages as m
from dicomledger.atna.syslog import (
    TlsTransport,
    Transport,
    TransportError,
    UdpTransport,
    client_context,
    syslog_message,
)
from dicomledger.config import AtnaConfig
from dicomledger.ledger.pseudonym import pseudonym

if TYPE_CHECKING:
    from dicomledger.dicom.net import RefusedAssociation

log = structlog.get_logger("dicomledger.atna")

APP_NAME = "dicomledger"
MSGID = "IHE+RFC-3881"  # IHE ITI-20 Record Audit Event: the MSGID of audit messages
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
FIND_MODELS = {"patient": "1.2.840.10008.5.1.4.1.2.1.1", "study": "1.2.840.10008.5.1.4.1.2.2.1"}
SEND_BATCH = 100

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    event TEXT NOT NULL,            -- the EventID meaning, for the log lines
    body BLOB NOT NULL              -- the whole RFC 5424 message
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,              -- JSON: what one "Instances Transferred" message covers
    study TEXT NOT NULL,            -- Study Instance UID, or its pseudonym (sent instances)
    accession TEXT,
    sop_class TEXT NOT NULL,
    sop_instance TEXT NOT NULL,
    path TEXT,                      -- a stored file to read patient and study from (sent instances)
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_grp ON pending (grp);
"""


@dataclass(frozen=True)
class SentInstance:
    """An instance that left (or failed to leave) this gateway, known by its stored file and
    the ledger pseudonyms of its patient and study: the patient's ID, name and study UID are
    read from the file's header when the message is written."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    patient: str
    study: str
    delivered: bool = True


def address_of(peer: str) -> str:
    """The host of ``host:port`` (the form our DICOM handlers give a peer in)."""
    host, sep, port = peer.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else peer


class AuditSink:
    """The events the gateway reports. This one drops them: the audit trail is off."""

    def application_started(self) -> None: ...

    def instance_received(
        self, calling_ae: str, peer: str, sop_class_uid: str, header: Any
    ) -> None:
        """After a C-STORE's Success. ``header``: the instance's ``InstanceHeader``."""

    def instances_sent(
        self,
        service: str,
        *,
        our_ae: str,
        destination: str,
        destination_address: str | None,
        instances: Iterable[SentInstance],
        requestor: str | None = None,
        requestor_address: str | None = None,
    ) -> None:
        """Forwarded (``service`` "forward"), or sent for a C-MOVE / C-GET by ``requestor``."""

    def query(self, calling_ae: str, peer: str, model: str, identifier: Dataset) -> None:
        """A C-FIND answered; ``model`` "patient" or "study" (root)."""

    def tamper_alarm(
        self,
        service: str,
        *,
        calling_ae: str,
        peer: str,
        destination: str,
        instance: SentInstance,
        problem: str,
    ) -> None: ...

    def association_refused(self, refusal: RefusedAssociation) -> None: ...

    def tls_refused(self, listener: str, address: str, reason: str) -> None:
        """A TLS handshake on one of our listeners failed (unknown or missing certificate...)."""

    def equivocation(self, origin: str, reported_by: str) -> None: ...

    def permissions_changed(
        self, kind: str, *, patient: str, study: str | None, grantee: str | None, entry: int
    ) -> None:
        """A grant or revocation signed here (``patient``/``study``: pseudonyms, all the gateway
        is given: the command pseudonymises the Patient ID before it reaches us)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class _Stop:
    last: m.AuditMessage | None  # written after everything pending is folded


@dataclass(frozen=True)
class _Message:
    message: m.AuditMessage


@dataclass(frozen=True)
class _Pending:
    group: dict[str, Any]
    study: str
    accession: str | None
    sop_class: str
    sop_instance: str
    path: str | None
    at: float


@dataclass(frozen=True)
class _PermissionChange:
    kind: str
    patient: str  # pseudonyms
    study: str | None
    grantee: str | None
    entry: int
    time: datetime


class PatientDirectory:
    """The Patient ID, name and study UID behind ledger pseudonyms, from the index (read only),
    for Patient Record messages: a grant reaches the gateway with pseudonyms only."""

    def __init__(self, index: Path, secret: bytes) -> None:
        self.index, self.secret = index, secret

    def lookup(self, patient: str, study: str | None) -> tuple[m.Patient, str | None] | None:
        try:
            con = sqlite3.connect(f"file:{self.index}?mode=ro", uri=True)
        except sqlite3.Error:
            return None
        try:
            for patient_id, name in con.execute("SELECT patient_id, patient_name FROM patients"):
                if pseudonym(self.secret, "patient", patient_id) != patient:
                    continue
                study_uid = None
                if study is not None:
                    uids = [
                        r[0]
                        for r in con.execute(
                            "SELECT study_uid FROM studies WHERE patient_id = ?", (patient_id,)
                        )
                    ]
                    study_uid = next(
                        (u for u in uids if pseudonym(self.secret, "study", u) == study), None
                    )
                return m.Patient(patient_id, name or None), study_uid
        except sqlite3.Error:
            return None
        finally:
            con.close()
        return None


def _never_raises(method: Callable[..., None]) -> Callable[..., None]:
    """An event method: a bug in building a message is logged, never raised into the DICOM
    handler, peer API or ingest path that reported the event."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception as exc:
            log.exception(
                "audit event not recorded",
                event=method.__name__,
                error=f"{type(exc).__name__}: {exc}",
            )

    return wrapper


class AuditTrail(AuditSink):
    def __init__(
        self, config: AtnaConfig, ae_title: str, host: str, patients: PatientDirectory | None = None
    ) -> None:
        self.config = config
        self.patients = patients
        self.ae_title = ae_title
        self.hostname = config.hostname or socket.getfqdn() or socket.gethostname()
        own_address = host if host not in ("", "0.0.0.0", "::") else self.hostname
        self.pid = os.getpid()
        self.node = m.Node(ae_title, own_address, pid=self.pid)
        self.source = m.AuditSource(config.source_id, config.enterprise_site)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._draining = threading.Event()
        self._lock = threading.Lock()
        self._queued = 0
        self._dropped = 0
        self._dropped_since: float | None = None
        self._drain_until = float("inf")
        self._writer: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._started = False

    # -- events (any thread; never block, never raise) ---------------------------------------

    def _put(self, item: Any) -> None:
        if self._writer is not None and not self._writer.is_alive() and not isinstance(item, _Stop):
            return  # the writer failed (logged): do not pile events up in memory
        self._inbox.put(item)

    def _message(self, message: m.AuditMessage) -> None:
        self._put(_Message(message))

    @_never_raises
    def application_started(self) -> None:
        self._started = True
        self._message(
            m.application_activity(
                started=True,
                application=self.node,
                launcher=_user(),
                source=self.source,
                time=_now(),
            )
        )

    @_never_raises
    def instance_received(
        self, calling_ae: str, peer: str, sop_class_uid: str, header: Any
    ) -> None:
        group = {
            "kind": "received",
            "ae": calling_ae,
            "address": address_of(peer),
            "patient_id": header.patient_id,
            "patient_name": header.patient_name,
        }
        self._put(
            _Pending(
                group,
                header.study_uid,
                header.accession_number or None,
                sop_class_uid,
                header.sop_instance_uid,
                None,
                time.time(),
            )
        )

    @_never_raises
    def instances_sent(
        self,
        service: str,
        *,
        our_ae: str,
        destination: str,
        destination_address: str | None,
        instances: Iterable[SentInstance],
        requestor: str | None = None,
        requestor_address: str | None = None,
    ) -> None:
        now = time.time()
        # A C-MOVE or C-GET is one operation: its message must not merge with the next one's
        # (forwards of a study, sent in batches, do gather over the window).
        operation = None if service == "forward" else uuid.uuid4().hex
        for i in instances:
            group = {
                "kind": "sent",
                "operation": operation,
                "service": service,
                "our_ae": our_ae,
                "ae": destination,
                "address": destination_address,
                "requestor": requestor,
                "requestor_address": requestor_address,
                "patient": i.patient,
                "delivered": i.delivered,
            }
            self._put(
                _Pending(
                    group, i.study, None, i.sop_class_uid, i.sop_instance_uid, str(i.path), now
                )
            )

    @_never_raises
    def query(self, calling_ae: str, peer: str, model: str, identifier: Dataset) -> None:
        try:
            encoded = _encode(identifier)
        except (
            Exception
        ) as exc:  # an identifier pydicom decoded but cannot re-encode: still audited
            encoded = b""
            log.warning(
                "C-FIND identifier could not be encoded for the audit message",
                error=type(exc).__name__,
            )
        self._message(
            m.query(
                requestor=m.Node(calling_ae, address_of(peer)),
                responder=self.node,
                sop_class_uid=FIND_MODELS.get(model, model),
                identifier=encoded,
                transfer_syntax_uid=IMPLICIT_VR_LITTLE_ENDIAN,
                source=self.source,
                time=_now(),
            )
        )

    @_never_raises
    def tamper_alarm(
        self,
        service: str,
        *,
        calling_ae: str,
        peer: str,
        destination: str,
        instance: SentInstance,
        problem: str,
    ) -> None:
        group = {
            "kind": "tamper",
            "service": service,
            "ae": calling_ae,
            "address": address_of(peer),
            "destination": destination,
            "patient": instance.patient,
            "problem": problem,
            "instance": instance.sop_instance_uid,
        }  # one alert per instance
        self._put(
            _Pending(
                group,
                instance.study,
                None,
                instance.sop_class_uid,
                instance.sop_instance_uid,
                str(instance.path),
                time.time(),
            )
        )

    @_never_raises
    def association_refused(self, refusal: RefusedAssociation) -> None:
        self._message(
            m.security_alert(
                alert=m.NODE_AUTHENTICATION if refusal.unauthorised else m.ASSOCIATION_LIMIT,
                outcome=m.MINOR_FAILURE,
                reporter=self.node,
                performers=(m.remote(refusal.address, refusal.calling_ae),),
                subjects=(
                    m.node_subject(
                        refusal.address,
                        f"association refused: {refusal.reason} "
                        f"(calling AE {refusal.calling_ae}, called AE {refusal.called_ae})",
                    ),
                ),
                description=f"association refused: {refusal.reason}",
                source=self.source,
                time=_now(),
            )
        )

    @_never_raises
    def tls_refused(self, listener: str, address: str, reason: str) -> None:
        host = address_of(address)
        self._message(
            m.security_alert(
                alert=m.NODE_AUTHENTICATION,
                outcome=m.MINOR_FAILURE,
                reporter=self.node,
                performers=(m.remote(host),),
                subjects=(
                    m.node_subject(host, f"TLS handshake refused on the {listener}: {reason}"),
                ),
                description=f"TLS handshake refused on the {listener}: {reason}",
                source=self.source,
                time=_now(),
            )
        )

    @_never_raises
    def equivocation(self, origin: str, reported_by: str) -> None:
        text = (
            f"gateway {origin} signed two checkpoints that cannot both be true (evidence held, "
            f"reported by {reported_by}); it is flagged and its new entries are not replicated"
        )
        self._message(
            m.security_alert(
                alert=m.EQUIVOCATION,
                outcome=m.SERIOUS_FAILURE,
                reporter=self.node,
                subjects=(m.node_subject(origin, text),),
                description=text,
                source=self.source,
                time=_now(),
            )
        )

    @_never_raises
    def permissions_changed(
        self, kind: str, *, patient: str, study: str | None, grantee: str | None, entry: int
    ) -> None:
        self._put(_PermissionChange(kind, patient, study, grantee, entry, _now()))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._open)
        self._writer = threading.Thread(target=self._write_loop, name="atna-writer", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="atna-sender", daemon=True)
        self._writer.start()
        self._sender.start()
        log.info(
            "audit trail started",
            repository=f"{self.config.host}:{self.config.port}",
            transport=self.config.transport,
            queued=self._queued,
        )

    def _open(self) -> None:
        self.config.queue.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect()
            try:
                db.executescript(SCHEMA)
                self._queued = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise OSError(f"audit queue {self.config.queue} cannot be opened ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.config.queue, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed audit message survives power loss
        db.execute("PRAGMA busy_timeout=10000")
        db.execute(
            "PRAGMA secure_delete=ON"
        )  # a sent message's PHI is zeroed, not left in free pages
        return db

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Record Application Stop, fold what is pending, send what the repository takes within
        ``drain_seconds``; the rest stays queued for the next start."""
        if self._writer is None:
            return
        self._put(
            _Stop(
                m.application_activity(
                    started=False,
                    application=self.node,
                    launcher=_user(),
                    source=self.source,
                    time=_now(),
                )
                if self._started
                else None
            )
        )
        await asyncio.to_thread(self._writer.join, 30)
        self._drain_until = time.monotonic() + drain_seconds
        self._draining.set()
        self._wake.set()
        assert self._sender is not None
        await asyncio.to_thread(self._sender.join, drain_seconds + 15)
        log.info("audit trail stopped", queued=self._queued)

    # -- the writer thread -----------------------------------------------------------------

    def _write_loop(self) -> None:
        db = self._connect()
        try:
            self._fold(db, everything=True)  # what a crash or an earlier stop left pending
            stopping = False
            while not stopping:
                try:
                    items = [self._inbox.get(timeout=0.25)]
                except queue.Empty:
                    items = []
                while items and len(items) < 1000:
                    try:
                        items.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                stop = next((i for i in items if isinstance(i, _Stop)), None)
                stopping = stop is not None
                try:
                    self._write(db, [i for i in items if not isinstance(i, _Stop)])
                    self._fold(db, everything=stopping)
                    self._report_drops(db)
                    if stop is not None and stop.last is not None:
                        self._write(db, [_Message(stop.last)])
                    if self._queued:
                        self._wake.set()
                except sqlite3.Error as exc:  # a full disk: the events of this batch are lost
                    log.error(
                        "audit queue cannot be written; audit events lost",
                        error=str(exc),
                        events=len(items),
                    )
        except Exception as exc:  # a bug must not take the gateway down with it
            log.exception(
                "audit writer failed; audit events are no longer recorded", error=str(exc)
            )
        finally:
            db.close()

    def _write(self, db: sqlite3.Connection, items: list[Any]) -> None:
        if not items:
            return
        with db:
            db.execute("BEGIN IMMEDIATE")
            for item in items:
                if isinstance(item, _PermissionChange):
                    item = _Message(self._patient_record(item))
                if isinstance(item, _Message):
                    self._insert(db, item.message)
                elif isinstance(item, _Pending) and self._room():
                    db.execute(
                        "INSERT INTO pending (grp, study, accession, sop_class, sop_instance, path, at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            json.dumps(item.group, sort_keys=True),
                            item.study,
                            item.accession,
                            item.sop_class,
                            item.sop_instance,
                            item.path,
                            item.at,
                        ),
                    )

    def _room(self) -> bool:
        with self._lock:
            if self._queued < self.config.max_queued:
                return True
            if self._dropped == 0:
                self._dropped_since = time.time()
                log.error(
                    "audit queue full: new audit messages are dropped until the repository takes "
                    "queued ones",
                    max_queued=self.config.max_queued,
                )
            self._dropped += 1
            return False

    def _insert(self, db: sqlite3.Connection, message: m.AuditMessage) -> None:
        if not self._room():
            return
        body = syslog_message(
            m.to_xml(message),
            time=_now(),
            hostname=self.hostname,
            app_name=APP_NAME,
            procid=str(self.pid),
            msgid=MSGID,
            severity=message.severity,
        )
        db.execute(
            "INSERT INTO messages (created, event, body) VALUES (?, ?, ?)",
            (time.time(), message.event_id.meaning, body),
        )
        with self._lock:
            self._queued += 1

    def _report_drops(self, db: sqlite3.Connection) -> None:
        with self._lock:
            dropped, since = self._dropped, self._dropped_since
            if not dropped or self._queued >= self.config.max_queued:
                return
            self._dropped, self._dropped_since = 0, None
        start = datetime.fromtimestamp(since or time.time(), UTC).isoformat(timespec="seconds")
        text = (
            f"{dropped} audit events were dropped since {start}: the audit queue was full "
            f"(atna.max_queued = {self.config.max_queued}) while the repository did not take messages"
        )
        log.error(
            "audit events were dropped while the audit queue was full", dropped=dropped, since=start
        )
        with db:
            db.execute("BEGIN IMMEDIATE")
            self._insert(
                db,
                m.security_alert(
                    alert=m.AUDIT_RECORDING_STOPPED,
                    outcome=m.SERIOUS_FAILURE,
                    reporter=self.node,
                    description=text,
                    source=self.source,
                    time=_now(),
                ),
            )

    def _patient_record(self, change: _PermissionChange) -> m.AuditMessage:
        """The Patient Record message of a grant or revocation, naming the patient by Patient ID
        if the index knows the pseudonym (else by the pseudonym, with our private ID type)."""
        found = (
            self.patients.lookup(change.patient, change.study)
            if self.patients is not None
            else None
        )
        patient, study = (
            found if found is not None else (m.Patient(change.patient, pseudonym_only=True), None)
        )
        scope = (
            f"the images of study {study or change.study}"
            if change.study
            else "all the patient's images"
        )
        whom = f" for {change.grantee}" if change.grantee else ""
        return m.patient_record(
            action="U",
            changed_by=self.node,
            patient=patient,
            study=study,
            description=f"{change.kind} of access to {scope}{whom} (ledger entry {change.entry})",
            source=self.source,
            time=change.time,
        )

    def _fold(self, db: sqlite3.Connection, everything: bool) -> None:
        """Turn each group of pending rows quiet for transfer_window seconds (all of them if
        ``everything``) into its message, in one transaction per group."""
        quiet_since = time.time() - (0 if everything else self.config.transfer_window)
        groups = db.execute(
            "SELECT grp, MAX(at) FROM pending GROUP BY grp HAVING MAX(at) <= ?", (quiet_since,)
        ).fetchall()
        for grp, last in groups:
            rows = db.execute(
                "SELECT id, study, accession, sop_class, sop_instance, path FROM pending WHERE grp = ? ORDER BY id",
                (grp,),
            ).fetchall()
            try:
                message = self._transfer_message(json.loads(grp), rows, last)
            except (
                ValueError,
                KeyError,
                TypeError,
            ) as exc:  # a row from a different version: say so, drop it
                log.error(
                    "pending audit rows cannot be read; dropped", rows=len(rows), error=str(exc)
                )
                message = None
            with db:
                db.execute("BEGIN IMMEDIATE")
                if message is not None:
                    self._insert(db, message)
                db.executemany("DELETE FROM pending WHERE id = ?", [(r[0],) for r in rows])

    def _transfer_message(
        self, group: dict[str, Any], rows: list[Any], last: float
    ) -> m.AuditMessage:
        when = datetime.fromtimestamp(last, UTC)
        by_study: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            by_study[row[1]].append(row)
        if group["kind"] == "received":
            patient = m.Patient(group["patient_id"], group["patient_name"])
            studies = [_study(uid, None, rs) for uid, rs in by_study.items()]
            return m.instances_transferred(
                sender=m.Node(group["ae"], group["address"]),
                receiver=self.node,
                requestor="sender",
                patient=patient,
                studies=studies,
                outcome=m.SUCCESS,
                outcome_description=None,
                source=self.source,
                time=when,
            )
        patient, studies = _from_files(
            group["patient"], by_study, name_instances=group["kind"] == "tamper"
        )
        if group["kind"] == "tamper":
            text = (
                f"{group['service']} by {group['ae']} to {group['destination']}: stored instance "
                f"{group['instance']} not sent: {group['problem']}"
            )
            return m.security_alert(
                alert=m.TAMPER_ALARM,
                outcome=m.SERIOUS_FAILURE,
                reporter=self.node,
                performers=(m.remote(group["address"], group["ae"]),),
                subjects=(
                    *(s.participant_object((text,)) for s in studies),
                    patient.participant_object(),
                ),
                description=text,
                source=self.source,
                time=when,
            )
        us = m.Node(group["our_ae"], self.node.address, pid=self.pid)
        destination = m.Node(group["ae"], group["address"])
        requestor: m.Node | Literal["sender", "receiver"] = "sender"
        if group["service"] == "C-GET":
            requestor = "receiver"
        elif group["requestor"] is not None and group["service"] != "forward":
            requestor = m.Node(group["requestor"], group["requestor_address"])
        delivered = group["delivered"]
        return m.instances_transferred(
            sender=us,
            receiver=destination,
            requestor=requestor,
            patient=patient,
            studies=studies,
            outcome=m.SUCCESS if delivered else m.MINOR_FAILURE,
            outcome_description=None
            if delivered
            else f"{group['service']}: these instances were not delivered",
            source=self.source,
            time=when,
        )

    # -- the sender thread -----------------------------------------------------------------

    def _transport(self) -> Transport:
        c = self.config
        if c.transport == "udp":
            return UdpTransport(c.host, c.port)
        return TlsTransport(
            c.host, c.port, client_context(c.tls_ca, c.tls_cert, c.tls_key), c.tls_server_name
        )

    def _send_loop(self) -> None:
        db = self._connect()
        transport: Transport | None = None
        failures = 0
        outage_since: float | None = None
        try:
            while True:
                if self._draining.is_set() and time.monotonic() > self._drain_until:
                    return  # stopping: what is left goes at the next start
                rows = db.execute(
                    "SELECT id, event, body FROM messages ORDER BY id LIMIT ?", (SEND_BATCH,)
                ).fetchall()
                if not rows:
                    if self._draining.is_set() and not (self._writer and self._writer.is_alive()):
                        return
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                sent: list[int] = []
                error: str | None = None
                try:
                    if transport is None:
                        transport = self._transport()
                    for row_id, _, body in rows:
                        transport.send(body)
                        sent.append(row_id)
                except (
                    TransportError,
                    OSError,
                    ValueError,
                ) as exc:  # ValueError: a bad TLS setting
                    error = str(exc)
                if sent:
                    with db:
                        db.execute("BEGIN IMMEDIATE")
                        db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in sent])
                    with self._lock:
                        self._queued -= len(sent)
                if error is None:
                    if outage_since is not None:
                        log.info(
                            "audit repository reachable again; queued audit messages sent",
                            repository=f"{self.config.host}:{self.config.port}",
                            down_seconds=round(time.monotonic() - outage_since, 1),
                        )
                        outage_since = None
                    failures = 0
                    continue
                failures += 1
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning(
                        "audit repository unreachable; audit messages stay queued and are retried",
                        repository=f"{self.config.host}:{self.config.port}",
                        reason=error,
                        queued=self._queued,
                    )
                if self._draining.is_set():
                    return  # stopping: what is left goes at the next start
                pause = min(self.config.retry_max, self.config.retry_initial * 2 ** (failures - 1))
                self._draining.wait(pause)
        except Exception as exc:
            log.exception(
                "audit sender failed; audit messages stay queued until a restart", error=str(exc)
            )
        finally:
            if transport is not None:
                transport.close()
            db.close()


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _now() -> datetime:
    return datetime.now(UTC)


def _encode(identifier: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, identifier)
    return fp.getvalue()


def _study(
    uid: str,
    accession: str | None,
    rows: list[Any],
    pseudonym_only: bool = False,
    name_instances: bool = False,
) -> m.Study:
    """A study's SOP classes with their numbers of instances (and their UIDs if ``name_instances``)."""
    counts: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        counts[row[3]].add(row[4])
        accession = accession or row[2]
    return m.Study(
        uid,
        tuple(
            m.SopClassCount(sop, len(uids), tuple(sorted(uids)) if name_instances else ())
            for sop, uids in sorted(counts.items())
        ),
        accession=accession,
        pseudonym_only=pseudonym_only,
    )


def _from_files(
    patient_pseudonym: str,
    by_study: dict[str, list[Any]],
    name_instances: bool = False,
) -> tuple[m.Patient, list[m.Study]]:
    """The patient and studies of sent instances, from their stored files' headers (the queue
    holds pseudonyms only until then); a study none of whose files can be read keeps its
    pseudonym, and so does the patient if no file can be read."""
    patient: m.Patient | None = None
    studies = []
    for study_pseudonym, rows in by_study.items():
        header = None
        for row in rows:
            try:
                header = dcmread(
                    row[5],
                    stop_before_pixels=True,
                    specific_tags=[
                        "PatientID",
                        "PatientName",
                        "StudyInstanceUID",
                        "AccessionNumber",
                    ],
                )
                break
            except Exception:  # missing, erased or damaged: try the next file of the study
                continue
        if header is None or not header.get("StudyInstanceUID"):
            studies.append(
                _study(
                    study_pseudonym, None, rows, pseudonym_only=True, name_instances=name_instances
                )
            )
            continue
        studies.append(
            _study(
                str(header.StudyInstanceUID),
                str(header.get("AccessionNumber") or "") or None,
                rows,
                name_instances=name_instances,
            )
        )
        if patient is None:
            patient = m.Patient(
                str(header.get("PatientID") or ""), str(header.get("PatientName") or "") or None
            )
    return patient or m.Patient(patient_pseudonym, pseudonym_only=True), studies
