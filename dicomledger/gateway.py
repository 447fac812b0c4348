"""The gateway: joins the DICOM half and the ledger half. receive -> hash -> store -> anchor.

Threads: the DICOM layer (``dicom/net``) serves every association on the event loop and
hands each received instance to ``handle_store``; its header parse, pixel hash and durable
file commit (CPU and fsync) run in the ingest thread pool, never on the loop; then the
loop indexes and anchors it. Success goes back to the sender only after the file, its index
row and its ledger entry are durable.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from pydicom import config as pydicom_config

from dicomledger import logs
from dicomledger.admin import AdminServer, PermissionAdmin
from dicomledger.atna import AuditSink, AuditTrail, PatientDirectory
from dicomledger.commitment import StorageCommitment
from dicomledger.common.errors import DicomLedgerError
from dicomledger.config import Config
from dicomledger.consent import ConsentForwarding
from dicomledger.daemon import notify
from dicomledger.dicom.codecs import missing_lossless_decoders
from dicomledger.dicom.fastread import ReadInstance, read_instance
from dicomledger.dicom.index import (
    Index,
    IndexRecord,
    IndexStoreError,
    IngestRows,
    InstanceRow,
    PatientRow,
    SeriesRow,
    StudyPatientConflict,
    StudyRow,
)
from dicomledger.dicom.instance import (
    InstanceError,
    InstanceHeader,
    instance_header,
    read_instance_header,
)
from dicomledger.dicom.net import DicomServer, StoreRequest
from dicomledger.dicom.net.commitment import CommitmentService
from dicomledger.dicom.net.dimse import (
    CANNOT_UNDERSTAND,
    N_ACTION_RQ,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)
from dicomledger.dicom.net.operation import Service
from dicomledger.dicom.pixelhash import InstanceHashes, PixelHashError, hash_instance_file
from dicomledger.dicom.store import FileStore, StoreError
from dicomledger.forwarding import Forwarder, ForwardItem, ForwardQueue, ForwardQueueError
from dicomledger.key_admin import KeyAdmin, add_to_trust_file
from dicomledger.ledger import merkle
from dicomledger.ledger.entries import (
    IMAGE_ANCHORED,
    KEY_REPLACEMENT,
    LOCAL_TIP_ACCEPTED,
    Entry,
    EntryError,
    decode_entry,
)
from dicomledger.ledger.gossip import PeerService
from dicomledger.ledger.identity import Identity, load_key_file
from dicomledger.ledger.keychain import replacement_payload
from dicomledger.ledger.log import Appended, Declined, LedgerStore, LedgerStoreError, LogWriter
from dicomledger.ledger.permission_book import PermissionBook
from dicomledger.ledger.policy import WitnessPolicy
from dicomledger.ledger.pseudonym import pseudonym, secret_check
from dicomledger.ledger.rotation import own_key_check, resume_rotation, statement_file
from dicomledger.ledger.tip import OwnTip, local_tip_accepted_payload
from dicomledger.lifecycle import Lifecycle
from dicomledger.metrics import IngestMetrics, MetricsServer
from dicomledger.retrieval import QueryRetrieve
from dicomledger.tls import TlsSetupError, destination_context, listener_context

log = structlog.get_logger("dicomledger.gateway")


class StartupError(DicomLedgerError, RuntimeError):
    """The gateway cannot start (a port in use, a host that does not resolve, a log its peers
    cannot confirm); the message names the listener or the problem and the reason."""


class StartupInterrupted(RuntimeError):
    """Told to stop while waiting for a peer to confirm its log: nothing was appended."""


def _listener_failed(what: str, host: str, port: int, exc: OSError) -> StartupError:
    reason = exc.strerror or str(exc)
    return StartupError(f"cannot start the {what} on {host}:{port}: {reason}")


@dataclass(frozen=True)
class Pseudonyms:
    patient: str
    study: str
    series: str
    instance: str

    @classmethod
    def of(cls, secret: bytes, header: InstanceHeader) -> Pseudonyms:
        return cls(
            patient=pseudonym(secret, "patient", header.patient_id),
            study=pseudonym(secret, "study", header.study_uid),
            series=pseudonym(secret, "series", header.series_uid),
            instance=pseudonym(secret, "instance", header.sop_instance_uid),
        )


def anchor_payload(
    p: Pseudonyms, hashes: InstanceHashes, sop_class: str, transfer_syntax: str, calling_ae: str
) -> dict[str, Any]:
    """The image-anchored entry payload: pseudonyms and hashes only, never PHI."""
    return {
        "patient": p.patient,
        "study": p.study,
        "series": p.series,
        "instance": p.instance,
        "hash_method": hashes.method,
        "sha256": hashes.sha256.hex(),
        "decoded_sha256": hashes.decoded_sha256.hex() if hashes.decoded_sha256 else None,
        "frames": hashes.number_of_frames,
        "frame_root": merkle.root_of_leaf_hashes(
            [merkle.leaf_hash(h) for h in hashes.frame_hashes]
        ).hex()
        if hashes.frame_hashes
        else None,
        "sop_class": sop_class,
        "transfer_syntax": transfer_syntax,
        "calling_ae": calling_ae,
    }


class Received(Enum):
    """What an accepted instance was, next to what the index held of its SOP instance."""

    NEW = "stored"
    HEADER_CHANGED = "stored: header changed, same pixels"
    PIXELS_CHANGED = "stored: PIXELS CHANGED for an instance received before"
    DUPLICATE = "duplicate"  # same pixels and header as an anchored copy: nothing new


@dataclass(frozen=True)
class Ingested:
    """A stored instance: what it was, its image-anchored entry (a duplicate's is the one
    anchored before) and the forwarding decided for it now (none for a decided duplicate)."""

    received: Received
    anchor: int
    forwarding: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.received is Received.DUPLICATE:
            text = f"duplicate of anchored entry {self.anchor}"
        else:
            text = f"{self.received.value}; anchored as entry {self.anchor}"
        return text + ("; forwarding: " + ", ".join(self.forwarding) if self.forwarding else "")


@dataclass(frozen=True)
class StoreFailure:
    """Why a C-STORE failed, and the status it is answered with: refused (what was sent is
    wrong, sending it again will not help) or failed (on our side)."""

    status: int
    reason: str
    refused: bool

    def describe(self) -> str:
        return ("refused: " if self.refused else "failed: ") + self.reason


def store_failure(exc: BaseException) -> StoreFailure:
    """The one place a failed store's exception becomes its DIMSE status.

    Bad data (the dataset cannot be parsed or hashed, or contradicts the request) is 0xC000,
    an instance under another patient's study or series UID 0xA778 (index.py says why);
    our disks, databases (image store, index, ledger, forward queue) and memory are 0xA700,
    Out of Resources, which tells the sender to try again later; anything else is a bug: 0x0110.
    Reasons never carry element values (they may be PHI): see logs.safe_reason.
    """
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        raise exc
    if isinstance(exc, InstanceError | PixelHashError):
        return StoreFailure(CANNOT_UNDERSTAND, logs.safe_reason(exc), refused=True)
    if isinstance(exc, StudyPatientConflict):  # another patient's study or series: its own status
        return StoreFailure(exc.status, logs.safe_reason(exc), refused=True)
    if isinstance(
        exc,
        StoreError | IndexStoreError | LedgerStoreError | ForwardQueueError | OSError | MemoryError,
    ):
        return StoreFailure(OUT_OF_RESOURCES, logs.safe_reason(exc), refused=False)
    return StoreFailure(
        PROCESSING_FAILURE, f"unexpected {logs.safe_reason(exc, with_type=True)}", refused=False
    )


class AnchoredButNotIndexed(IndexStoreError):
    """The instance's entry is durable on the ledger but its index row could not be written:
    the sender gets 0xA700 and sends again (a duplicate then), and the row is rebuilt from the
    anchor and the stored file at the next start."""


@dataclass
class Receipt:
    """A stored instance on its way to the ledger (the companion's ticket): its index record,
    its hashes, and what the companion found and decided for it."""

    record: IndexRecord
    hashes: InstanceHashes
    previous: InstanceRow | None = None  # the row it replaces
    received: Received = Received.NEW


def changes_from(
    previous: InstanceRow | None, hashes: InstanceHashes, header_sha256: bytes
) -> tuple[Received, dict[str, Any]]:
    """What a received instance is next to the row held for its SOP instance, and what its
    anchor says about that (``pixels_changed_from`` / ``header_changed_from``)."""
    if previous is None:
        return Received.NEW, {}
    # (by the previous anchor's hash method: an instance anchored before the canonical
    # content hash existed, arriving again, has unchanged content and a new anchor)
    if previous.sha256 != (hashes.sha256_for(previous.hash_method) or hashes.sha256):
        return Received.PIXELS_CHANGED, {
            "pixels_changed_from": {
                "origin": previous.ledger_origin,
                "index": previous.ledger_index,
                "sha256": previous.sha256.hex(),
            }
        }
    if (previous.sha256, previous.header_sha256) != (hashes.sha256, header_sha256):
        return Received.HEADER_CHANGED, {
            "header_changed_from": {
                "origin": previous.ledger_origin,
                "index": previous.ledger_index,
            }
        }
    return Received.NEW, {}  # the same instance, stored before a crash but never anchored


class IndexCompanion:
    """The index's part of a received instance's one hop to the ledger writer's thread
    (``ledger.log.Companion``): before the batch is signed, each instance's current row,
    study/patient conflicts (against the index and the batch itself) and duplicates; after
    the batch is durable, the rows with their anchors, in one index transaction."""

    def __init__(self, rows: IngestRows) -> None:
        self.rows = rows

    def before(self, tickets: Sequence[Receipt]) -> list[dict[str, Any] | Declined | BaseException]:
        claims: dict[tuple[str, str], tuple[str, str]] = {}  # (level, UID) -> (patient, instance)
        verdicts: list[dict[str, Any] | Declined | BaseException] = []
        for receipt in tickets:
            try:
                verdicts.append(self._decide(receipt, claims))
            except IndexStoreError as exc:
                verdicts.append(exc)
        return verdicts

    def _decide(
        self, receipt: Receipt, claims: dict[tuple[str, str], tuple[str, str]]
    ) -> dict[str, Any] | Declined | BaseException:
        record, new = receipt.record, receipt.record.instance
        previous = self.rows.previous(new.sop_instance_uid)
        receipt.previous = previous
        if (
            previous is not None
            and previous.ledger_index is not None
            and (previous.sha256, previous.header_sha256) == (new.sha256, new.header_sha256)
        ):
            return Declined(previous)
        conflict = self.rows.conflict(record)
        if conflict is not None:
            return conflict
        patient = record.patient.patient_id
        mine = (("study", record.study.study_uid), ("series", record.series.series_uid))
        for level, uid in mine:  # another instance of this batch, not yet in the index
            other = claims.get((level, uid))
            if other is not None and other[0] != patient:
                return StudyPatientConflict(level, uid, other[1])
        for key in mine:
            claims[key] = (patient, new.sop_instance_uid)
        receipt.received, extras = changes_from(previous, receipt.hashes, new.header_sha256)
        return extras

    def after(self, appended: Sequence[tuple[Receipt, Appended]]) -> None:
        rows = []
        for receipt, entry in appended:
            instance = replace(
                receipt.record.instance, ledger_origin=entry.origin, ledger_index=entry.index
            )
            rows.append((replace(receipt.record, instance=instance), receipt.previous))
        try:
            self.rows.write(rows)
        except IndexStoreError as exc:
            raise AnchoredButNotIndexed(str(exc)) from None


class Gateway:
    def __init__(self, config: Config, *, accept_local_tip: bool = False) -> None:
        self.config = config
        # start even when no peer confirms our log's tip (recorded as a ledger entry)
        self.accept_local_tip = accept_local_tip
        self.identity = Identity(config.ledger.origin, load_key_file(config.ledger.key_file))
        self.secret = config.pseudonym_secret()
        self.files = FileStore(config.storage.directory)
        self.rows = IngestRows(config.storage.index)  # written on the ledger writer's thread
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ledger: LedgerStore | None = None
        self.writer: LogWriter | None = None
        self.index: Index | None = None
        self.server: DicomServer | None = None
        self.peers: PeerService | None = None
        self.book: PermissionBook | None = None
        self.forwarder: Forwarder | None = None
        self.consent: ConsentForwarding | None = None
        self.admin: AdminServer | None = None
        self.lifecycle: Lifecycle | None = None  # erasure, retention, scrub
        g = config.gateway
        patients = PatientDirectory(
            config.storage.index, self.secret
        )  # for grants, which name pseudonyms
        self.audit = (
            AuditTrail(config.atna, g.ae_title, g.host, patients) if config.atna else AuditSink()
        )
        # Striped locks: two C-STOREs of one SOP instance are indexed and anchored in turn.
        # one ingest at a time per instance (striped): its index check and its entry go together
        self._instance_locks = [threading.Lock() for _ in range(64)]
        # Parse, hash and the file's fsyncs of received instances: off the event loop. A few
        # threads, so one store's fsync does not hold up the next one's hashing.
        self._ingest_pool = ThreadPoolExecutor(8, thread_name_prefix="ingest")
        self._checkpointer: asyncio.Task[None] | None = None
        self._checkpoint_size = -1
        self._checkpoint_signed_at: float | None = (
            None  # monotonic; None: none signed yet by this process
        )
        self._started_at = time.monotonic()
        # C-STORE counters for the metrics endpoint: None (nothing counted) when it is off
        self.ingest_metrics = IngestMetrics() if config.metrics is not None else None
        self.metrics_server: MetricsServer | None = None
        self.commitment: StorageCommitment | None = None

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Open everything and start serving. Nothing is appended to the ledger before
        ``_confirm_own_tip`` (a restored gateway first gets back the entries it lost), and the
        DICOM listener opens last: until then a modality finds the gateway down, as during
        any restart, and its queue retries. ``stop`` ends a wait for peers early."""
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        # pydicom checks each value as it reads it and warns quoting the value, which can be
        # PHI; we act on parse errors, never on those warnings.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        await self.audit.start()
        removed = self.files.prepare()
        if removed:
            log.info("removed partial uploads left by an earlier run", count=removed)
        cfg.ledger.database.parent.mkdir(parents=True, exist_ok=True)
        cfg.storage.index.parent.mkdir(parents=True, exist_ok=True)
        self.ledger = await LedgerStore.open(cfg.ledger.database)
        if read := await self.ledger.add_lookup_keys():
            log.info("lookup keys brought up to date", entries=read)
        self.identity, resumed = await resume_rotation(
            self.ledger, self.identity, cfg.ledger.key_file
        )
        if resumed:
            log.warning(resumed, vkey=self.identity.vkey)
        policy = cfg.peering.witness_policy if cfg.peering is not None else None
        self.writer = LogWriter(
            self.ledger, self.identity, companion=IndexCompanion(self.rows), policy=policy
        )
        tip = await self._confirm_own_tip(stop)
        await self.writer.start()  # after the check: it loads the tip the check may have moved
        await self._check_own_key(policy)  # may append a key replacement first
        if tip is not None and not tip.confirmed:
            accepted = await self.writer.append(
                LOCAL_TIP_ACCEPTED,
                local_tip_accepted_payload(_operator(), tip.problem or "", tip.unreachable),
            )
            log.warning(
                "recorded on the ledger: started on an unconfirmed local tip", entry=accepted.index
            )
        self.index = await Index.open(cfg.storage.index)
        self.lifecycle = Lifecycle(
            cfg,
            index=self.index,
            ledger=self.ledger,
            writer=self.writer,
            files=self.files,
            secret=self.secret,
            identity=self.identity,
            audit=self.audit,
        )
        await self.lifecycle.open()
        await self._reconcile()
        pm = cfg.permissions
        self.book = PermissionBook(
            self.ledger,
            custodian_may_sign=pm.custodian_may_sign,
            authorities=dict(pm.authorities),
            issuer_keys={name: load_key_file(path) for name, path in pm.issuer_keys},
            own_origin=self.identity.origin,
            own_key=self.identity.private_key,
        )
        if cfg.forwarding is not None:
            queue = await ForwardQueue.open(cfg.forwarding.queue)
            self.forwarder = Forwarder(
                cfg.forwarding,
                queue,
                self.book,
                self.writer,
                cfg.storage.directory,
                audit=self.audit,
            )
            await self.forwarder.start()
            self.consent = ConsentForwarding(
                cfg.forwarding,
                self.forwarder,
                self.ledger,
                self.index,
                self.book,
                self.writer,
                self.secret,
                self.identity.origin,
            )
            await self.consent.start()
        await self.lifecycle.start(self.forwarder.queue if self.forwarder is not None else None)
        if cfg.admin_socket is not None:
            handlers = PermissionAdmin(cfg, self.book, self.writer, self.audit).handlers()
            if (
                self.forwarder is not None and self.consent is not None
            ):  # `queue retry`, `queue unpark`
                handlers.update(self.forwarder.admin_handlers())
                handlers["grant"] = self.consent.then_scan(handlers["grant"])  # its images go now
            if self.peers is not None:  # `peers --clear-flag`: its entry goes through our writer
                peers = self.peers
                handlers["clear-flag"] = lambda body: peers.clear_flag(
                    body["origin"], body["reason"], body["by"]
                )
            handlers.update(self.lifecycle.handlers())
            handlers |= KeyAdmin(
                cfg, self.writer, self.book, self.peers
            ).handlers()  # rotate-key, replace-key
            self.admin = AdminServer(cfg.admin_socket, handlers)
            await self.admin.start()
        if self.peers is not None:
            self.peers.start_gossip()
        g = cfg.gateway
        query_retrieve = QueryRetrieve(
            index=self.index,
            storage_dir=cfg.storage.directory,
            ledger=self.ledger,
            book=self.book,
            writer=self.writer,
            secret=self.secret,
            ae_title=g.ae_title,
            origin=self.identity.origin,
            destinations=cfg.forwarding,
            audit=self.audit,
        )
        try:  # unusable certificate files stop the start, before anything listens
            tls = listener_context(cfg.tls) if cfg.tls is not None else None
            for dest in cfg.forwarding.destinations if cfg.forwarding is not None else ():
                destination_context(dest)
        except TlsSetupError as exc:
            raise StartupError(str(exc)) from None
        services: dict[int, Service] = {}
        sc = cfg.storage_commitment
        if sc.enabled:
            self.commitment = StorageCommitment(
                sc,
                ae_title=g.ae_title,
                index=self.index,
                storage_dir=cfg.storage.directory,
                writer=self.writer,
                destinations={d.ae_title: (d.host, d.port) for d in cfg.forwarding.destinations}
                if cfg.forwarding is not None
                else {},
                metrics=self.ingest_metrics,
            )
            services[N_ACTION_RQ] = CommitmentService(
                self.commitment.decide, self.commitment.deliver_elsewhere, sc.report_timeout
            )
        self.server = DicomServer(
            ae_title=g.ae_title,
            host=g.host,
            port=g.port,
            allowed_calling_aes=None
            if "*" in g.allowed_calling_aes
            else list(g.allowed_calling_aes),
            on_store=self.handle_store,
            temp_dir=self.files.tmp_dir,
            max_associations=g.max_associations,
            max_pdu_size=g.max_pdu_size,
            network_timeout=g.network_timeout,
            accept_unknown_sop_classes=g.accept_unknown_sop_classes,
            query_retrieve=query_retrieve,
            on_refused=self.audit.association_refused,
            services=services,
            tls=tls,
            tls_port=cfg.tls.port if cfg.tls is not None else None,
            ae_bindings={b.calling_ae: b for b in cfg.ae_bindings},
            on_tls_refused=partial(self.audit.tls_refused, "DICOM listener"),
        )
        try:
            await self.server.start()
        except OSError as exc:
            raise _listener_failed(
                "DICOM listener", g.host, self.server.failed_port or g.port, exc
            ) from None
        self._checkpointer = asyncio.create_task(self._checkpoint_loop())
        if cfg.metrics is not None:
            assert self.ingest_metrics is not None
            self.metrics_server = MetricsServer(cfg.metrics, self, self.ingest_metrics)
            try:
                await self.metrics_server.start()
            except OSError as exc:
                raise _listener_failed(
                    "metrics endpoint", cfg.metrics.host, cfg.metrics.port, exc
                ) from None
        if missing := missing_lossless_decoders():
            log.warning(
                "no decoder installed for these lossless transfer syntaxes: their instances are stored, "
                "anchored and served by their bytes as received, without a decoded-pixel hash "
                "(install the jpeg-gpl extra or python-gdcm: README, Licences)",
                transfer_syntaxes=missing,
            )
        log.info(
            "gateway started",
            ae_title=g.ae_title,
            address=f"{g.host}:{self.server.port}",
            tls_address=f"{g.host}:{self.server.tls_port}"
            if self.server.tls_port is not None
            else None,
            origin=self.identity.origin,
            ledger_size=self.writer.size,
            vkey=self.identity.vkey,
        )
        self.audit.application_started()

    async def _confirm_own_tip(self, stop: asyncio.Event | None) -> OwnTip | None:
        """Open the peer API and, with peers configured, have them confirm our log's tip,
        fetching back entries a restore lost (``PeerService.confirm_own_tip``). Returns None
        with no peers (a single site starts as before), the OwnTip otherwise; StartupError
        when the tip is not confirmed and no --accept-local-tip was given."""
        cfg = self.config
        if cfg.peering is None:
            return None
        assert self.ledger is not None and self.writer is not None
        self.peers = PeerService(
            cfg.peering,
            self.identity,
            self.ledger,
            self.writer,
            on_equivocation=self.audit.equivocation,
            on_tls_refused=partial(self.audit.tls_refused, "peer API"),
            secret_check=secret_check(self.secret),
        )
        try:
            await self.peers.start()
        except OSError as exc:
            raise _listener_failed("peer API", cfg.peering.host, cfg.peering.port, exc) from None
        if not cfg.peering.peers:
            return None
        if await self.ledger.origin(self.identity.origin) is None:  # a new log: its first key
            await self.ledger.ensure_origin(self.identity.origin, self.identity.public_key)
        tip = await self.peers.confirm_own_tip(
            wait=cfg.peering.startup_wait, accept_local_tip=self.accept_local_tip, stop=stop
        )
        if tip.stopped:
            raise StartupInterrupted(
                "told to stop while waiting for a peer to confirm this gateway's log"
            )
        if tip.confirmed:
            log.info(
                "this gateway's log is confirmed by its peers",
                size=tip.size,
                fetched=tip.fetched,
                answered=list(tip.answered),
                unreachable=dict(tip.unreachable),
            )
            return tip
        if not self.accept_local_tip:
            raise StartupError(
                f"{tip.problem}. Appending now could make this gateway sign a second history of its "
                "log, which its peers would flag as equivocation. Bring a peer back, or start with "
                "`serve --accept-local-tip` to continue from the local tip anyway (recorded on the ledger)"
            )
        log.warning(
            "starting on an unconfirmed local tip (--accept-local-tip)",
            problem=tip.problem,
            size=tip.size,
            unreachable=dict(tip.unreachable),
        )
        return tip

    async def _check_own_key(self, policy: WitnessPolicy | None) -> None:
        """The key file's key must sign this log from its (confirmed) tip on: the key in force
        there, or the new key of an installed replacement statement, appended first."""
        assert self.ledger is not None and self.writer is not None
        signer_keys = (
            await self.peers.signer_keys() if self.peers is not None else (lambda name: ())
        )
        found = await own_key_check(
            self.ledger, self.identity, self.config.ledger.key_file, policy, signer_keys
        )
        if found.problem is not None:
            raise StartupError(found.problem)
        if found.replacement is not None:
            entry = await self.writer.append(
                KEY_REPLACEMENT, replacement_payload(found.replacement)
            )
            statement_file(self.config.ledger.key_file).unlink()
            add_to_trust_file(
                self.config,
                entry.data,
                f"Key replacement at entry {entry.index}",
                self.identity.vkey,
            )
            log.warning(
                "recorded on the ledger: this gateway's key was replaced by a consortium quorum",
                entry=entry.index,
                vkey=self.identity.vkey,
            )

    async def stop(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.server is not None:
            await self.server.stop()  # in-flight stores finish and are answered
        if self.commitment is not None:
            await self.commitment.stop()
        self._ingest_pool.shutdown(wait=False)
        if self.admin is not None:
            await self.admin.stop()
        if self.consent is not None:
            await self.consent.stop()
        if self.lifecycle is not None:
            await self.lifecycle.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()  # finishes the sends in progress
            await self.forwarder.queue.close()
        if self.peers is not None:
            await self.peers.stop()
        if self._checkpointer is not None:
            self._checkpointer.cancel()
        if self.writer is not None:
            await self.writer.stop()
            if self._checkpointer is not None:  # not after a failed start
                await self._checkpoint()
        self.rows.close()  # (the writer's thread, its only user, has ended)
        if self.index is not None:
            await self.index.close()
        if self.ledger is not None:
            await self.ledger.close()
        await self.audit.stop()  # Application Stop, then what the repository takes in a few seconds
        log.info("gateway stopped")

    # -- checkpoints ---------------------------------------------------------

    async def _checkpoint(self) -> None:
        assert self.writer is not None
        if self.writer.size != self._checkpoint_size:
            self._checkpoint_size, _ = await self.writer.sign_checkpoint()
            self._checkpoint_signed_at = time.monotonic()
            if self.peers is not None:
                self.peers.checkpoint_signed()

    def checkpoint_age(self) -> float:
        """Seconds since this process last signed a checkpoint (since start if it has not yet)."""
        return time.monotonic() - (self._checkpoint_signed_at or self._started_at)

    def unsigned_entries(self) -> int:
        """Entries of the own log that no checkpoint this process signed covers yet."""
        if self.writer is None:
            return 0
        return max(0, self.writer.size - max(self._checkpoint_size, 0))

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.ledger.checkpoint_interval)
            try:
                await self._checkpoint()
            except LedgerStoreError as exc:
                log.error("checkpoint failed", error=str(exc))
            except Exception as exc:  # a bug must not end checkpointing (and so witnessing)
                log.exception("checkpoint failed", error=f"{type(exc).__name__}: {exc}")

    # -- ingest --------------------------------------------------------------

    async def handle_store(self, request: StoreRequest) -> int:
        """The C-STORE status for a received instance. Never raises: every request gets a
        status and one ``c-store`` log line saying what became of it.

        Parse, hash and make the file durable in the ingest pool (CPU and fsync stay off the
        event loop), then index and anchor it here. The file's place depends only on its UIDs
        and pixel hash, so storing it never waits for the index: an identical re-send replaces
        a file with the same bytes. Whatever fails, the received file is not kept in tmp (the
        DICOM layer removes it once we return).
        """
        started = time.perf_counter()
        size = -1
        hashes: InstanceHashes | None = None
        read: ReadInstance | None = None

        def parse_hash_commit_anchor() -> tuple[
            InstanceHeader, str, Ingested, Pseudonyms
        ]:  # in the ingest pool
            nonlocal size, hashes, read
            size = request.dataset_path.stat().st_size
            read = read_instance(
                request.dataset_path,
                request.transfer_syntax_uid,
                max_inflated_size=self.config.gateway.max_inflated_size,
                sop_class_uid=request.sop_class_uid,
                sop_instance_uid=request.sop_instance_uid,
            )
            header, hashes = read.header, read.hashes
            relative = FileStore.relative_path(
                header.study_uid,
                header.series_uid,
                header.sop_instance_uid,
                hashes.sha256,
                header.header_sha256,
            )
            replaced = self.files.commit(request.dataset_path, relative)
            return header, relative, *self.anchor(request, header, hashes, relative, size, replaced)

        try:
            if request.receive_error is not None:
                raise StoreError(
                    request.receive_error.errno or 0,
                    f"cannot write the received dataset to {self.files.tmp_dir}: "
                    f"{request.receive_error.strerror or request.receive_error}",
                )
            assert self.loop is not None
            header, relative, anchored, p = await self.loop.run_in_executor(
                self._ingest_pool, parse_hash_commit_anchor
            )
            assert hashes is not None
            result = await self.route(request, header, hashes, relative, anchored, p)
        except (
            asyncio.CancelledError
        ):  # the server is stopping and gave up waiting: no answer goes out
            raise
        except BaseException as exc:  # (a Rust decoder's PanicException is no Exception)
            failure = store_failure(exc)
            status, outcome = failure.status, failure.describe()
        else:
            status, outcome = SUCCESS, result.describe()
            self.audit.instance_received(
                request.calling_ae, request.peer, request.sop_class_uid, header
            )
        elapsed = time.perf_counter() - started
        if self.ingest_metrics is not None:
            self.ingest_metrics.stored(status, elapsed, size)
        (log.info if status == SUCCESS else log.error)(
            "c-store",
            calling_ae=request.calling_ae,
            sop_class=request.sop_class_uid,
            sop_instance=request.sop_instance_uid,
            transfer_syntax=request.transfer_syntax_uid,
            bytes=size,
            hash=hashes.sha256.hex()[:16] if hashes else None,
            hash_method=hashes.method if hashes else None,
            parse=read.parser if read else None,
            duration_ms=round(elapsed * 1000, 2),
            status=f"0x{status:04X}",
            outcome=outcome,
        )
        return status

    def anchor(
        self,
        request: StoreRequest,
        header: InstanceHeader,
        hashes: InstanceHashes,
        relative: str,
        size: int,
        replaced_file: bool,
    ) -> tuple[Ingested, Pseudonyms]:
        """Index and anchor one stored (durable) instance; runs in the ingest pool, right after
        the file is durable, so an image costs one hop from the event loop and back.

        The ledger writer commits it (``append_guarded_blocking``: on this thread, with the
        other threads' appends queued meanwhile) together with the ``IndexCompanion``'s work:
        look up the instance's current row, refuse a study/patient conflict, decide new /
        changed / duplicate, sign and commit the entry with the batch (synchronous=FULL), then
        write the row with its anchor. docs/design.md, "One durable commit per image", says why
        that order is crash-safe."""
        assert self.writer is not None
        with self._instance_locks[hash(header.sop_instance_uid) % len(self._instance_locks)]:
            receipt = Receipt(
                _record(header, _instance_row(header, hashes, request, relative, size)), hashes
            )
            p = Pseudonyms.of(self.secret, header)
            payload = anchor_payload(
                p, hashes, request.sop_class_uid, request.transfer_syntax_uid, request.calling_ae
            )
            try:
                result = self.writer.append_guarded_blocking(IMAGE_ANCHORED, payload, receipt)
            except AnchoredButNotIndexed:
                raise  # the anchor cites the file: keep it (the row is rebuilt at start)
            except (IndexStoreError, StudyPatientConflict, LedgerStoreError):
                if not replaced_file:  # nothing anchored it: leave nothing unindexed behind
                    self.files.absolute(relative).unlink(missing_ok=True)
                raise
        if isinstance(result, Declined):
            previous: InstanceRow = result.value
            assert previous.ledger_index is not None
            return Ingested(Received.DUPLICATE, previous.ledger_index), p
        if receipt.received is Received.PIXELS_CHANGED and receipt.previous is not None:
            log.warning(
                "changed pixels",
                sop_instance=header.sop_instance_uid,
                previous_hash=receipt.previous.sha256.hex()[:16],
                new_hash=hashes.sha256.hex()[:16],
                previous_entry=receipt.previous.ledger_index,
            )
        return Ingested(receipt.received, result.index), p

    async def route(
        self,
        request: StoreRequest,
        header: InstanceHeader,
        hashes: InstanceHashes,
        relative: str,
        ingested: Ingested,
        p: Pseudonyms,
    ) -> Ingested:
        """Queue the forwards of an anchored instance (on the event loop)."""
        if self.forwarder is None:
            return ingested
        anchor = (self.identity.origin, ingested.anchor)
        # A duplicate is routed too if its forward was never decided: the first copy
        # failed between anchoring and routing, and the sender sent it again.
        if ingested.received is Received.DUPLICATE and await self.forwarder.routed(anchor):
            return ingested
        routed = await self.forwarder.route(
            ForwardItem(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=request.sop_class_uid,
                transfer_syntax_uid=request.transfer_syntax_uid,
                path=relative,
                calling_ae=request.calling_ae,
                modality=header.modality,
                patient=p.patient,
                study=p.study,
                instance=p.instance,
                sha256=hashes.sha256.hex(),
            ),
            anchor,
        )
        return replace(ingested, forwarding=tuple(routed))

    async def _reconcile(self) -> None:
        """Bring the index in line with the stored files and this gateway's anchors, at start."""
        await self._anchor_unanchored()
        await self._identify_rows()
        await self._rebuild_lost_rows()

    async def _anchor_unanchored(self) -> None:
        """Anchor index rows a crash left unanchored (stored, but no Success was sent)."""
        assert self.index is not None and self.ledger is not None and self.writer is not None
        for row in await self.index.unanchored():
            found = None
            for origin, idx in await self.ledger.find(
                f"instance:{pseudonym(self.secret, 'instance', row.sop_instance_uid)}"
            ):
                if origin != self.identity.origin:
                    continue
                entry = decode_entry(await self.ledger.entry(origin, idx))
                if entry.payload.get("sha256") == row.sha256.hex():
                    found = idx
            if found is None:
                log.warning(
                    "anchoring an instance stored before a crash", sop_instance=row.sop_instance_uid
                )
                try:
                    found = await self._anchor_recovered(row)
                except (OSError, PixelHashError, InstanceError) as exc:
                    log.error(
                        "cannot anchor an instance stored before a crash; left unanchored",
                        sop_instance=row.sop_instance_uid,
                        file=row.path,
                        error=str(exc),
                    )
                    continue
            await self.index.set_anchor(row.sop_instance_uid, self.identity.origin, found)

    async def _anchor_recovered(self, row: InstanceRow) -> int:
        assert self.writer is not None
        path = self.files.absolute(row.path)
        hashes = await asyncio.to_thread(hash_instance_file, path, row.transfer_syntax_uid)
        assert hashes.header is not None
        header = instance_header(
            hashes.header, hashes.header_sha256, row.sop_class_uid, row.sop_instance_uid
        )
        p = Pseudonyms.of(self.secret, header)
        payload = anchor_payload(
            p, hashes, row.sop_class_uid, row.transfer_syntax_uid, row.calling_ae
        )
        payload["recovered"] = True
        appended = await self.writer.append(IMAGE_ANCHORED, payload)
        return appended.index

    async def _identify_rows(self) -> None:
        """Give rows indexed before the index kept each instance's own study and patient
        (schema version 1) those values, read from each stored file's header; a row whose
        file cannot be read stays out of every query and retrieval."""
        assert self.index is not None
        rows = await self.index.without_identity()
        mixed: set[str] = set()
        unreadable = 0
        for start in range(0, len(rows), 256):
            records = []
            for row in rows[start : start + 256]:
                try:
                    header = await asyncio.to_thread(
                        read_instance_header,
                        self.files.absolute(row.path),
                        row.header_sha256,
                        row.sop_class_uid,
                        row.sop_instance_uid,
                    )
                except InstanceError as exc:
                    unreadable += 1
                    log.error(
                        "index row hidden: its stored file cannot be read for its patient and study",
                        sop_instance=row.sop_instance_uid,
                        file=row.path,
                        error=str(exc),
                    )
                    continue
                records.append(_record(header, row))
            for record, shared in zip(
                records, await asyncio.gather(*map(self.index.restore, records)), strict=True
            ):
                if shared:
                    mixed.add(record.study.study_uid)
        if rows:
            log.info(
                "index rows given their own patient and study from the stored files",
                instances=len(rows) - unreadable,
                unreadable=unreadable,
            )
        for study_uid in sorted(mixed):
            log.warning(
                "a study UID holds instances of more than one patient (stored before such "
                "instances were refused): each instance is shown and retrieved only as its own "
                "patient's",
                study_uid=study_uid,
            )

    async def _rebuild_lost_rows(self) -> None:
        """Rebuild the index row of every instance this gateway anchored whose row is missing
        (the index commits with synchronous=NORMAL: a power loss can drop its last rows), from
        the stored file, found by the anchor's pixel hash (in the file name) and instance
        pseudonym."""
        assert self.index is not None and self.ledger is not None
        own = self.identity.origin
        cited = await self.index.anchored_indexes(own)
        lost = sorted(
            i
            for i in (await self.ledger.newest_by_key(own, "instance:")).values()
            if i not in cited
        )
        if not lost:
            return
        anchors = []
        for i in lost:
            try:
                anchors.append(decode_entry(await self.ledger.entry(own, i)))
            except EntryError as exc:  # `dicomledger verify` names it; the others still get rebuilt
                log.error(
                    "index row lost and its anchor cannot be read; not rebuilt",
                    anchor=i,
                    error=str(exc),
                )
        assert self.lifecycle is not None
        anchors = await self.lifecycle.not_erased(
            anchors
        )  # an erasure's leftover files stay unindexed
        wanted = {str(e.payload.get("sha256", ""))[:16] for e in anchors}
        files = await asyncio.to_thread(self.files.by_hash_prefix, wanted)
        not_found = 0
        for entry in anchors:
            payload = entry.payload
            try:
                record = await asyncio.to_thread(self._rebuilt_record, entry, files)
            except (OSError, PixelHashError, InstanceError, KeyError, TypeError, ValueError) as exc:
                log.error(
                    "index row lost and its stored file cannot be read; not rebuilt",
                    anchor=entry.index,
                    instance=payload.get("instance"),
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            if record is None:
                not_found += 1
                continue
            shared = await self.index.restore(record)
            row = record.instance
            log.warning(
                "index row rebuilt from the stored file: its anchor had no index row",
                sop_instance=row.sop_instance_uid,
                file=row.path,
                anchor=entry.index,
                study_shared_with_another_patient=shared,
            )
        if not_found:
            log.warning(
                "anchored instances with neither an index row nor a stored file: not rebuilt",
                count=not_found,
            )

    def _rebuilt_record(self, entry: Entry, files: dict[str, list[Path]]) -> IndexRecord | None:
        """The index record of the instance ``entry`` anchored, from its stored file (None if
        no stored file is that instance). Hashes and anchor are the entry's, as at receipt;
        patient, study and series the file's header."""
        payload = entry.payload
        sha256 = str(payload["sha256"])
        for path in files.get(sha256[:16], []):
            name = path.name.rsplit(".", 2)[0]  # the SOP Instance UID, unless it had to be hashed
            if (
                not name.startswith("x")
                and pseudonym(self.secret, "instance", name) != payload["instance"]
            ):
                continue  # another instance with the same pixels
            hashes = hash_instance_file(path)
            assert hashes.header is not None
            uid = str(hashes.header.get("SOPInstanceUID", "")).strip()
            if pseudonym(self.secret, "instance", uid) != payload["instance"]:
                continue  # another instance with the same pixels
            header = instance_header(
                hashes.header, hashes.header_sha256, str(payload["sop_class"]), uid
            )
            if hashes.method == payload["hash_method"] and hashes.sha256.hex() != sha256:
                log.warning(
                    "rebuilt index row's stored file differs from its anchor: a retrieval "
                    "will refuse it with a tamper alarm",
                    sop_instance=uid,
                    file=str(path),
                )
            decoded = payload.get("decoded_sha256")
            return _record(
                header,
                InstanceRow(
                    sop_instance_uid=uid,
                    series_uid=header.series_uid,
                    sop_class_uid=header.sop_class_uid,
                    instance_number=header.instance_number,
                    transfer_syntax_uid=str(payload["transfer_syntax"]),
                    path=path.relative_to(self.files.directory).as_posix(),
                    size=path.stat().st_size,
                    hash_method=str(payload["hash_method"]),
                    sha256=bytes.fromhex(sha256),
                    header_sha256=hashes.header_sha256,
                    decoded_sha256=bytes.fromhex(decoded) if isinstance(decoded, str) else None,
                    number_of_frames=int(payload["frames"]),
                    calling_ae=str(payload["calling_ae"]),
                    received_at=datetime.fromtimestamp(entry.time_ms / 1000, UTC).isoformat(
                        timespec="milliseconds"
                    ),
                    ledger_origin=entry.origin,
                    ledger_index=entry.index,
                ),
            )
        return None


def _instance_row(
    header: InstanceHeader, hashes: InstanceHashes, request: StoreRequest, relative: str, size: int
) -> InstanceRow:
    """The index row of a received instance, not yet anchored."""
    return InstanceRow(
        sop_instance_uid=header.sop_instance_uid,
        series_uid=header.series_uid,
        sop_class_uid=request.sop_class_uid,
        instance_number=header.instance_number,
        transfer_syntax_uid=request.transfer_syntax_uid,
        path=relative,
        size=size,
        hash_method=hashes.method,
        sha256=hashes.sha256,
        header_sha256=header.header_sha256,
        decoded_sha256=hashes.decoded_sha256,
        number_of_frames=hashes.number_of_frames,
        calling_ae=request.calling_ae,
        received_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
    )


def _record(header: InstanceHeader, row: InstanceRow) -> IndexRecord:
    return IndexRecord(
        patient=PatientRow(header.patient_id, header.patient_name, header.birth_date, header.sex),
        study=StudyRow(
            header.study_uid,
            header.patient_id,
            header.study_date,
            header.study_time,
            header.accession_number,
            header.study_id,
            header.study_description,
            header.referring_physician,
        ),
        series=SeriesRow(
            header.series_uid,
            header.study_uid,
            header.modality,
            header.series_number,
            header.series_description,
        ),
        instance=row,
    )


def _operator() -> str:
    """Who runs this process: its operating-system account."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (e.g. an arbitrary container uid)
        return f"uid {os.getuid()}"


async def serve(config: Config, stop: asyncio.Event, *, accept_local_tip: bool = False) -> None:
    restore_output = logs.capture_native_output()  # every line JSON, even a decoder's panic
    try:
        gateway = Gateway(config, accept_local_tip=accept_local_tip)
        try:  # stop() also after a failed start: an open database's thread would keep us alive
            await gateway.start(stop)
            notify("READY=1")  # systemd Type=notify: started only now (deploy/dicomledger.service)
            await stop.wait()
        except StartupInterrupted as exc:
            log.info("gateway not started", reason=str(exc))
        finally:
            notify("STOPPING=1")
            await gateway.stop()
    finally:
        restore_output()
