"""The Query/Retrieve response generators (dicom/qr.py) as pynetdicom drives them: order of
yields, C-CANCEL, unsent instances counted as failed and listed. The core here is a small
in-memory one; the wire is covered by tests/test_retrieve.py with DCMTK."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RSP

from dicomledger.dicom.qr import (
    CANCEL,
    PENDING,
    SUB_OPERATIONS_FAILED,
    SUCCESS,
    UNABLE_TO_PERFORM,
    Loaded,
    QRRequest,
    RetrieveOutcome,
    RetrievePlan,
    SubOperation,
    find_responses,
    retrieve_responses,
)


class Core:
    def __init__(self, bad: set[str] = frozenset()) -> None:
        self.bad = bad
        self.finished: list[RetrieveOutcome] = []

    def load(self, sub: SubOperation) -> Loaded:
        if sub.sop_instance_uid in self.bad:
            return Loaded(None, "tamper check failed")
        ds = Dataset()
        ds.SOPInstanceUID = sub.sop_instance_uid
        return Loaded(ds)

    def finish(self, request: QRRequest, plan: RetrievePlan, outcome: RetrieveOutcome) -> None:
        self.finished.append(outcome)


def stored(uid: str, status: int = 0x0000) -> SimpleNamespace:
    rsp = C_STORE_RSP()
    rsp.command_set.AffectedSOPInstanceUID = uid
    rsp.command_set.Status = status
    return SimpleNamespace(message=rsp)


class Assoc:
    def __init__(self) -> None:
        self.bound: list[object] = []

    def bind(self, event: object, handler: object) -> None:
        self.bound.append(handler)

    def unbind(self, event: object, handler: object) -> None:
        self.bound.remove(handler)


def request(service: str = "C-GET") -> QRRequest:
    return QRRequest(service, "study", Dataset(), "WS1", "127.0.0.1:1", "WS1" if service == "C-MOVE" else None)


def subs(n: int) -> list[SubOperation]:
    return [SubOperation(f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", None) for i in range(n)]


def test_find_stops_at_cancel():
    answers = [Dataset() for _ in range(5)]
    calls = iter([False, False, True])
    out = list(find_responses(answers, lambda: next(calls)))
    assert [status for status, _ in out] == [PENDING, PENDING, CANCEL]


def test_get_sends_checked_instances_and_fails_the_rest():
    core, assoc = Core(bad={"1.2.1"}), Assoc()
    plan = RetrievePlan(subs(3), {"1.2.9": "not authorised: no grant"})
    gen = retrieve_responses(core, request(), plan, lambda: False, assoc)
    assert next(gen) == 3  # sub-operations: the 3 to send; the refused one is not one
    sent = []
    item = next(gen)
    while item[0] == PENDING:
        sent.append(str(item[1].SOPInstanceUID))
        assoc.bound[0](stored(sent[-1]))  # the requestor's C-STORE response, as EVT_DIMSE_RECV gives it
        item = gen.send(None)
    assert sent == ["1.2.0", "1.2.2"]  # 1.2.1 failed the check
    status, failed = item
    assert status == SUB_OPERATIONS_FAILED
    assert failed.FailedSOPInstanceUIDList == "1.2.1"  # one value; never the refused one
    gen.close()
    outcome = core.finished[0]
    assert len(core.finished) == 1 and outcome.not_sent == {"1.2.1": "tamper check failed"}
    assert outcome.completed == ["1.2.0", "1.2.2"] and outcome.status == SUB_OPERATIONS_FAILED
    assert assoc.bound == []  # the response tracker is unbound again


def test_sub_operations_pynetdicom_could_not_send_count_as_failed():
    """A yielded instance that gets no C-STORE response (pynetdicom found no presentation
    context the receiver accepted, or could not encode it) is failed, as pynetdicom counts it
    on the wire, and the final status follows pynetdicom's rule."""
    core, assoc = Core(), Assoc()
    gen = retrieve_responses(core, request(), RetrievePlan(subs(3), {}), lambda: False, assoc)
    assert next(gen) == 3
    _, first = next(gen)
    assoc.bound[0](stored(str(first.SOPInstanceUID)))  # answered
    assert gen.send(None)[0] == PENDING  # 1.2.1: pynetdicom could not send it, no response
    assert gen.send(None)[0] == PENDING  # 1.2.2: neither
    with pytest.raises(StopIteration):
        gen.send(None)  # no final from us: pynetdicom sends 0xB000 itself, by the same rule
    outcome = core.finished[0]
    assert outcome.completed == ["1.2.0"] and outcome.failed == outcome.no_response == ["1.2.1", "1.2.2"]
    assert outcome.status == SUB_OPERATIONS_FAILED

    core = Core()
    gen = retrieve_responses(core, request(), RetrievePlan(subs(1), {}), lambda: False, Assoc())
    assert next(gen) == 1 and next(gen)[0] == PENDING
    with pytest.raises(StopIteration):
        gen.send(None)
    assert core.finished[0].status == UNABLE_TO_PERFORM  # all failed: 0xA702


def test_all_refused_is_answered_as_nothing_found_and_cancel_stops_sending():
    core = Core()
    plan = RetrievePlan([], {"1.2.5": "not authorised"})
    gen = retrieve_responses(core, request(), plan, lambda: False, Assoc())
    assert next(gen) == 0  # pynetdicom then answers Success, as for an unknown study
    assert core.finished[0].status == SUCCESS

    core = Core()
    cancelled = iter([False, True])
    plan = RetrievePlan(subs(5), {}, destination=("127.0.0.1", 104))
    gen = retrieve_responses(core, request("C-MOVE"), plan, lambda: next(cancelled), Assoc())
    host, port, kwargs = next(gen)
    assert (host, port) == ("127.0.0.1", 104) and kwargs["contexts"]
    assert next(gen) == 5
    assert next(gen)[0] == PENDING
    assert next(gen)[0] == CANCEL
    gen.close()
    assert core.finished[0].cancelled


def test_unknown_destination_and_unreachable_destination_are_recorded():
    core = Core()
    gen = retrieve_responses(core, request("C-MOVE"), RetrievePlan([], {}, unknown_destination=True), lambda: False, Assoc())
    assert next(gen) == (None, None)  # pynetdicom answers 0xA801
    assert core.finished[0].status == 0xA801

    core = Core()
    gen = retrieve_responses(core, request("C-MOVE"), RetrievePlan(subs(2), {}, destination=("127.0.0.1", 9)), lambda: False, Assoc())
    next(gen)
    next(gen)  # count; pynetdicom then fails to associate and drops the generator
    gen.close()
    assert len(core.finished) == 1 and not core.finished[0].associated
