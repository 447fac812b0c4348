"""Query/Retrieve for workstations: C-FIND, C-MOVE and C-GET answered only with what the
patients' permissions on the ledger allow, and no image leaves before its pixel hash, read
from the stored file, matches the anchored one. Joins the DICOM half (index, stored files,
``dicom.qr``) and the ledger half (permission book, log writer), like ``forwarding.py``.

Who is asked about:

* C-FIND and C-GET: the calling AE; C-MOVE: the move destination, which must be one of the
  ``[[destinations]]`` in the config (else 0xA801).
* Its *site* for grants "AE@GATEWAY" / "@GATEWAY": the destination's configured ``site``; a
  calling AE that is not a configured destination is a workstation of this gateway, so its
  site is this gateway's origin.

Every decision is per instance, on the instance's own patient and study (the index keeps
them per instance). C-FIND shows a patient or study only if the AE may receive that study;
counts of related studies, series and instances count only what it may see. A retrieval
sends each authorised instance after the check; the instances the AE may not have are
answered as if they did not exist (no sub-operation, no failed UID), so a refused study is
indistinguishable from an unknown one. On the ledger: ``retrieve-refused`` (per study: how
many instances were refused and why), ``tamper-alarm`` (per instance whose stored pixels no
longer match the anchor) and ``retrieved`` (per study: who, to where, the sub-operation
counts and the final status exactly as the requestor was told them).

Methods are coroutines, called on the gateway's event loop by the DICOM layer's services
(``dicom/net``); reading, hashing and parsing a stored file runs in a thread of its own.
"""

from __future__ import annotations

import asyncio
import io
import ssl
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomledger.atna import AuditSink, SentInstance
from dicomledger.atna.trail import address_of
from dicomledger.config import DestinationConfig, ForwardingConfig
from dicomledger.dicom.index import Index, InstanceRow
from dicomledger.dicom.net.filemeta import data_set_start
from dicomledger.dicom.pixelhash import PixelHashError, stored_sha256
from dicomledger.dicom.qr import (
    SUB_OPERATIONS_FAILED,
    UNABLE_TO_PERFORM,
    Loaded,
    QRRequest,
    RetrieveOutcome,
    RetrievePlan,
    SubOperation,
)
from dicomledger.dicom.query import UNIQUE_KEY, Query, QueryError, parse_query, response_identifier
from dicomledger.ledger.entries import (
    ERASED,
    RETRIEVE_REFUSED,
    RETRIEVED,
    TAMPER_ALARM,
    decode_entry,
)
from dicomledger.ledger.log import LedgerStore, LogWriter
from dicomledger.ledger.permission_book import PermissionBook, today
from dicomledger.ledger.pseudonym import pseudonym
from dicomledger.tamper import FILE_MISSING, PIXELS_DIFFER, alarm_payload, check_anchor
from dicomledger.tls import destination_context

log = structlog.get_logger("dicomledger.retrieval")

ERASED_MEANWHILE = "the instance was erased after the retrieval was planned"


@dataclass(frozen=True)
class Target:
    """The AE the images would go to, as permissions name it."""

    ae_title: str
    site: str | None


@dataclass(frozen=True)
class Item:
    """One matched instance of a retrieval, with its pseudonyms and what it was anchored as."""

    row: InstanceRow
    patient: str
    study: str
    instance: str
    grant: str | None = None
    anchor: bytes | None = None  # the anchoring entry's bytes


@dataclass
class PlanState:
    request: QRRequest
    target: Target
    items: dict[str, Item]  # SOP Instance UID -> item, every matched instance


class QueryRetrieve:
    def __init__(
        self,
        *,
        index: Index,
        storage_dir: Path,
        ledger: LedgerStore,
        book: PermissionBook,
        writer: LogWriter,
        secret: bytes,
        ae_title: str,
        origin: str,
        destinations: ForwardingConfig | None,
        audit: AuditSink | None = None,
    ) -> None:
        self.audit = audit or AuditSink()
        self.index = index
        self.storage_dir = storage_dir
        self.ledger = ledger
        self.book = book
        self.writer = writer
        self.secret = secret
        self.ae_title = ae_title
        self.origin = origin
        self.destinations = destinations
        # Files are read, hashed and parsed here, off the event loop. Two threads: with one,
        # a C-MOVE of 512x512 CT kept it busy all the time (pydicom's parse holds the GIL, the
        # hash does not) while the loop idled (py-spy).
        self._checker = ThreadPoolExecutor(2, thread_name_prefix="retrieve-check")

    def _target(self, ae_title: str) -> Target:
        dest = self.destinations.destination(ae_title) if self.destinations else None
        return Target(ae_title, dest.site if dest is not None else self.origin)

    def _parse(self, request: QRRequest) -> Query:
        try:
            return parse_query(request.identifier, request.model)
        except QueryError as exc:
            log.warning(
                "query refused",
                service=request.service,
                calling_ae=request.calling_ae,
                peer=request.peer,
                status=f"0x{exc.status:04X}",
                reason=str(exc),
            )
            raise

    def _pseudonyms(self, record: dict[str, Any]) -> tuple[str, str]:
        return (
            pseudonym(self.secret, "patient", record["PatientID"]),
            pseudonym(self.secret, "study", record["StudyInstanceUID"]),
        )

    # -- C-FIND ------------------------------------------------------------------------------

    async def find(self, request: QRRequest) -> list[Dataset]:
        query = self._parse(request)
        results = await self._find(request, query)
        self.audit.query(request.calling_ae, request.peer, request.model, request.identifier)
        return results

    async def _find(self, request: QRRequest, query: Query) -> list[Dataset]:
        grain = "STUDY" if query.level == "PATIENT" else query.level
        matched = await self.index.matching(grain, query)
        target = self._target(request.calling_ae)
        keys = [self._pseudonyms(r) for r in matched]
        decisions = await self.book.decide_all(
            keys, ae=target.ae_title, site=target.site, today=today()
        )
        visible = [r for r, k in zip(matched, keys, strict=True) if decisions[k].allowed]
        if query.level == "PATIENT":
            visible = _patients(visible)
        hidden = len({k for k in keys if not decisions[k].allowed})
        log.info(
            "c-find",
            calling_ae=request.calling_ae,
            peer=request.peer,
            model=request.model,
            query_level=query.level,
            keys=len(query.matchers),
            results=len(visible),
            studies_hidden=hidden,
        )
        return [response_identifier(query, r, self.ae_title) for r in visible]

    # -- C-MOVE / C-GET ----------------------------------------------------------------------

    async def plan(self, request: QRRequest) -> RetrievePlan:
        query = self._parse(request)
        unique = UNIQUE_KEY[query.level]
        if unique not in query.matchers:
            exc = QueryError(
                f"a {request.service} at level {query.level} must name the {unique} value(s) to retrieve"
            )
            log.warning(
                "retrieve refused",
                service=request.service,
                calling_ae=request.calling_ae,
                peer=request.peer,
                reason=str(exc),
            )
            raise exc
        matched = await self.index.matching("IMAGE", query)
        items = {}
        for r in matched:
            patient, study = self._pseudonyms(r)
            row: InstanceRow = r["_row"]
            items[row.sop_instance_uid] = Item(
                row, patient, study, pseudonym(self.secret, "instance", row.sop_instance_uid)
            )
        ae = request.move_destination if request.service == "C-MOVE" else request.calling_ae
        assert ae is not None
        target = self._target(ae)
        dest = self.destinations.destination(ae) if self.destinations else None
        if request.service == "C-MOVE" and dest is None:
            reason = f"unknown move destination {ae}: not under [[destinations]] in the config"
            state = PlanState(request, target, items)
            await self._record_refused(state, dict.fromkeys(items, reason))
            log.warning(
                "retrieve refused",
                service=request.service,
                calling_ae=request.calling_ae,
                destination=ae,
                peer=request.peer,
                instances=len(items),
                reason=reason,
            )
            return RetrievePlan([], {}, unknown_destination=True, context=state)
        if not items:
            await self._refuse_erased(request, query, target)
        decisions = await self.book.decide_all(
            ((i.patient, i.study) for i in items.values()),
            ae=target.ae_title,
            site=target.site,
            today=today(),
        )
        to_send, refused = [], {}
        state = PlanState(request, target, items)
        for uid, item in items.items():
            decision = decisions[item.patient, item.study]
            if not decision.allowed:
                refused[uid] = decision.reason
                continue
            row = item.row
            anchor = None
            if row.ledger_origin is not None and row.ledger_index is not None:
                anchor = await self.ledger.entry(row.ledger_origin, row.ledger_index)
            items[uid] = item = replace(
                item, grant=decision.grant.ref if decision.grant else None, anchor=anchor
            )
            to_send.append(
                SubOperation(uid, row.sop_class_uid, row.transfer_syntax_uid, (state, item))
            )
        if refused:
            await self._record_refused(state, refused)
        log.info(
            "retrieve",
            service=request.service,
            calling_ae=request.calling_ae,
            destination=ae,
            peer=request.peer,
            query_level=query.level,
            matched=len(items),
            to_send=len(to_send),
            refused=len(refused),
        )
        return RetrievePlan(
            to_send,
            refused,
            destination=(dest.host, dest.port) if dest is not None else None,
            context=state,
            destination_tls=_tls_to(dest),
        )

    async def _refuse_erased(self, request: QRRequest, query: Query, target: Target) -> None:
        """A retrieval of a study (or patient) this gateway erased finds nothing, and is
        answered as for an unknown one; the attempt still goes on the ledger and the log."""
        studies = [
            pseudonym(self.secret, "study", uid) for uid in query.exact("StudyInstanceUID") or ()
        ]
        keys: list[tuple[str, str | None]] = [(f"study:{s}", s) for s in studies]
        if not studies:
            keys += [
                (f"erased:{pseudonym(self.secret, 'patient', pid)}", None)
                for pid in query.exact("PatientID") or ()
            ]
        done: set[tuple[Any, str | None]] = set()
        for key, study in keys:
            for origin, index in await self.ledger.find(key):
                if origin != self.origin:
                    continue
                entry = decode_entry(await self.ledger.entry(origin, index))
                patient = entry.payload.get("patient")
                if entry.kind != ERASED or (patient, study) in done:
                    continue
                done.add((patient, study))
                reason = f"erased by entry {index} (reason {entry.payload.get('reason')})"
                await self.writer.append(
                    RETRIEVE_REFUSED,
                    {
                        "service": request.service,
                        "calling_ae": request.calling_ae,
                        "destination": target.ae_title,
                        "site": target.site,
                        "patient": patient,
                        "study": study,
                        "instances": 0,
                        "reason": reason,
                    },
                )
                log.warning(
                    "retrieve refused",
                    service=request.service,
                    calling_ae=request.calling_ae,
                    destination=target.ae_title,
                    peer=request.peer,
                    reason=reason,
                )

    async def _record_refused(self, state: PlanState, refused: dict[str, str]) -> None:
        by_study: dict[tuple[str, str], list[str]] = defaultdict(list)
        for uid, reason in refused.items():
            item = state.items[uid]
            by_study[item.patient, item.study].append(reason)
        for (patient, study), reasons in by_study.items():
            await self.writer.append(
                RETRIEVE_REFUSED,
                {
                    "service": state.request.service,
                    "calling_ae": state.request.calling_ae,
                    "destination": state.target.ae_title,
                    "site": state.target.site,
                    "patient": patient,
                    "study": study,
                    "instances": len(reasons),
                    "reason": reasons[0],
                },
            )

    async def load(self, sub: SubOperation) -> Loaded:
        """Read the stored file once, check its pixel hash against the anchor, and parse those
        same bytes for sending (no window to swap the file between check and send); a file
        that fails the check is not sent and raises a tamper alarm."""
        state, item = sub.ref
        path = self.storage_dir / item.row.path
        loop = asyncio.get_running_loop()
        loaded, problem, expected, found = await loop.run_in_executor(
            self._checker, self._check, item, path
        )
        if loaded is not None:
            return loaded
        if problem == FILE_MISSING and await self.index.instance(item.row.sop_instance_uid) is None:
            # erased since the retrieval was planned: gone on purpose, not tampered with
            log.info(
                "retrieve sub-operation skipped: the instance was erased meanwhile",
                service=state.request.service,
                sop_instance=item.row.sop_instance_uid,
            )
            return Loaded(None, ERASED_MEANWHILE)
        await self._tamper_alarm(state, item, path, problem, expected, found)
        return Loaded(None, f"tamper check failed: {problem}")

    def _check(self, item: Item, path: Path) -> tuple[Loaded | None, str, str | None, str | None]:
        """In the checker thread: (the instance to send, or None and the problem; the anchored
        and the found hash)."""
        check = check_anchor(item.anchor, self.writer.chain.entry_key, item.instance)
        problem, expected = check.problem, check.sha256
        found = None
        if problem is None:
            try:
                data = path.read_bytes()
                dataset = dcmread(io.BytesIO(data))
                found = stored_sha256(
                    data, dataset, item.row.transfer_syntax_uid, check.method
                ).hex()
                if found == expected:
                    return (
                        Loaded(dataset, data_set=memoryview(data)[data_set_start(data) :]),
                        "",
                        expected,
                        found,
                    )
                problem = PIXELS_DIFFER
            except FileNotFoundError:
                problem = FILE_MISSING  # (or erased meanwhile: load() asks the index)
            except (OSError, PixelHashError) as exc:
                problem = f"stored file cannot be read or hashed: {exc}"
            except Exception as exc:  # pydicom cannot parse what we stored: tampered or damaged
                problem = f"stored file cannot be parsed: {type(exc).__name__}: {exc}"
        return None, problem, expected, found

    async def _tamper_alarm(
        self,
        state: PlanState,
        item: Item,
        path: Path,
        problem: str,
        expected: str | None,
        found: str | None,
    ) -> None:
        row, request = item.row, state.request
        log.error(
            "TAMPER ALARM: stored instance not sent",
            file=str(path),
            sop_instance=row.sop_instance_uid,
            service=request.service,
            calling_ae=request.calling_ae,
            destination=state.target.ae_title,
            anchored_sha256=row.sha256.hex(),
            found_sha256=found,
            problem=problem,
            anchor=f"{row.ledger_origin} entry {row.ledger_index}",
        )
        payload = alarm_payload(
            patient=item.patient,
            study=item.study,
            instance=item.instance,
            expected=expected,
            found=found,
            anchor_origin=row.ledger_origin,
            anchor_index=row.ledger_index,
            problem=problem,
            context={
                "service": request.service,
                "calling_ae": request.calling_ae,
                "destination": state.target.ae_title,
            },
        )
        await self.writer.append(TAMPER_ALARM, payload)
        self.audit.tamper_alarm(
            request.service,
            calling_ae=request.calling_ae,
            peer=request.peer,
            destination=state.target.ae_title,
            instance=_sent(self.storage_dir, item, False),
            problem=problem,
        )

    async def finish(
        self, request: QRRequest, plan: RetrievePlan, outcome: RetrieveOutcome
    ) -> None:
        """Record what the requestor was told: per study, how many sub-operations completed,
        warned, failed (the receiver's C-STORE failed, it could not be sent, or the
        check stopped it) or were never attempted, and the final status on the wire."""
        state: PlanState = plan.context
        if plan.unknown_destination or not plan.to_send:
            return  # nothing was to leave: the refusal is on the ledger already
        status = _final_status(plan, outcome)
        # Our own final response (0xB000 / 0xA702) counts the instances the check stopped as
        # failed; after a cancel they stay "remaining", and without a final response nothing.
        stopped_count_as = (
            "failed" if outcome.status in (SUB_OPERATIONS_FAILED, UNABLE_TO_PERFORM) else "not_sent"
        )
        results = {
            **dict.fromkeys(outcome.completed, "completed"),
            **dict.fromkeys(outcome.warning, "warning"),
            **dict.fromkeys(outcome.failed, "failed"),
            **dict.fromkeys(outcome.not_sent, stopped_count_as),
        }
        studies: dict[tuple[str, str], dict[str, int]] = {}
        for sub in plan.to_send:
            item = state.items[sub.sop_instance_uid]
            counts = studies.setdefault(
                (item.patient, item.study),
                dict.fromkeys(
                    ("completed", "warning", "failed", "refused", "tampered", "not_sent"), 0
                ),
            )
            counts[results.get(sub.sop_instance_uid, "not_sent")] += 1
            counts["tampered"] += (
                outcome.not_sent.get(sub.sop_instance_uid, ERASED_MEANWHILE) != ERASED_MEANWHILE
            )
        grants = {(i.patient, i.study): i.grant for i in state.items.values() if i.grant}
        for (patient, study), counts in studies.items():
            payload = {
                "service": request.service,
                "calling_ae": request.calling_ae,
                "destination": state.target.ae_title,
                "site": state.target.site,
                "patient": patient,
                "study": study,
                **counts,
                "cancelled": outcome.cancelled,
                "status": status,
                "grant": grants.get((patient, study)),
            }
            await self.writer.append(RETRIEVED, payload)
        # The audit trail: what reached the receiver, and what failed on the way (the tamper
        # check's refusals have their own alarm).
        attempted = [
            s.sop_instance_uid
            for s in plan.to_send
            if s.sop_instance_uid not in outcome.not_sent
            and results.get(s.sop_instance_uid) in ("completed", "warning", "failed")
        ]
        self.audit.instances_sent(
            request.service,
            our_ae=self.ae_title,
            destination=state.target.ae_title,
            destination_address=plan.destination[0]
            if plan.destination
            else address_of(request.peer),
            requestor=request.calling_ae,
            requestor_address=address_of(request.peer),
            instances=[
                _sent(self.storage_dir, state.items[uid], results[uid] != "failed")
                for uid in attempted
            ],
        )
        for uid in outcome.no_response:
            row = state.items[uid].row
            log.warning(
                "retrieve sub-operation failed without a C-STORE response: the receiver accepted no "
                "presentation context for its SOP class in the stored transfer syntax, or it could "
                "not be encoded or sent",
                service=request.service,
                destination=state.target.ae_title,
                sop_instance=uid,
                sop_class=row.sop_class_uid,
                transfer_syntax=row.transfer_syntax_uid,
            )
        total = {
            k: sum(c[k] for c in studies.values())
            for k in ("completed", "warning", "failed", "not_sent")
        }
        log.info(
            "retrieved",
            service=request.service,
            calling_ae=request.calling_ae,
            destination=state.target.ae_title,
            status=status,
            **total,
            refused=len(plan.refused),
            tampered=sum(p != ERASED_MEANWHILE for p in outcome.not_sent.values()),
            no_response=len(outcome.no_response),
            cancelled=outcome.cancelled,
        )


def _tls_to(dest: DestinationConfig | None) -> tuple[ssl.SSLContext, str] | None:
    context = destination_context(dest) if dest is not None else None
    return (
        (context, dest.tls.server_name)
        if context is not None and dest is not None and dest.tls
        else None
    )


def _sent(storage_dir: Path, item: Item, delivered: bool) -> SentInstance:
    row = item.row
    return SentInstance(
        row.sop_class_uid,
        row.sop_instance_uid,
        storage_dir / row.path,
        item.patient,
        item.study,
        delivered,
    )


def _final_status(plan: RetrievePlan, outcome: RetrieveOutcome) -> str:
    """The final status that went on the wire, as ``0x....``, or why none did."""
    if outcome.status is not None:
        return f"0x{outcome.status:04X}"
    done = len(outcome.completed) + len(outcome.warning) + len(outcome.failed)
    return f"none: the association ended after {done} of {len(plan.to_send)} sub-operations"


def _patients(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PATIENT-level records from the visible study records: counts of what is visible."""
    patients: dict[str, dict[str, Any]] = {}
    for s in studies:
        p = patients.setdefault(
            s["PatientID"],
            {k: s[k] for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")}
            | {
                "NumberOfPatientRelatedStudies": 0,
                "NumberOfPatientRelatedSeries": 0,
                "NumberOfPatientRelatedInstances": 0,
            },
        )
        p["NumberOfPatientRelatedStudies"] += 1
        p["NumberOfPatientRelatedSeries"] += s["NumberOfStudyRelatedSeries"]
        p["NumberOfPatientRelatedInstances"] += s["NumberOfStudyRelatedInstances"]
    return list(patients.values())
