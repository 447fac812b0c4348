"""Storage Commitment Push Model SCP: pynetdicom as the requesting SCU on
the same association, Orthanc 1.10 as the requestor that takes its report on a new
association, bad N-ACTIONs answered with their status."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
)

from tests.conftest import GatewayProcess, free_port
from tests.dicomdata import make_ct_series
from tests.test_forwarding import entries_of_kind
from tests.test_gateway_interop import ORTHANC, Orthanc
from tests.test_patient_conflict import log_events

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

INSTANCE = "1.2.840.10008.1.20.1.1"


def action_information(transaction: str, references: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


class Requestor:
    """A pynetdicom SCU that asks for commitment and takes the N-EVENT-REPORT on its association."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.reports: list[tuple[int, Dataset]] = []
        self.arrived = threading.Event()
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(StorageCommitmentPushModel)
        ae.add_requested_context(CTImageStorage)
        self.assoc = ae.associate(
            "127.0.0.1",
            gw.port,
            ae_title=gw.ae_title,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )
        assert self.assoc.is_established

    def _on_report(self, event: Any) -> tuple[int, None]:
        self.reports.append((event.request.EventTypeID, event.event_information))
        self.arrived.set()
        return 0x0000, None

    def request(self, information: Dataset, action_type: int = 1) -> Dataset:
        status, _reply = self.assoc.send_n_action(
            information, action_type, StorageCommitmentPushModel, INSTANCE
        )
        return status


def test_pynetdicom_gets_its_report_on_the_same_association(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "ECHOSCU", "PYSCU"))
    gw.start()
    try:
        files = make_ct_series(tmp_path / "ct", 3, rows=32, cols=32)
        assert gw.storescu(*files).returncode == 0
        uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
        requestor = Requestor(gw)
        try:
            status = requestor.request(
                action_information(
                    "1.2.3.999.1",
                    [
                        (CTImageStorage, uids[0]),
                        (CTImageStorage, uids[1]),
                        (MRImageStorage, uids[2]),  # stored, but as CT
                        (CTImageStorage, "1.2.3.999.404"),  # never stored
                    ],
                )
            )
            assert status.Status == 0x0000
            assert requestor.arrived.wait(30), "no N-EVENT-REPORT on the association"
        finally:
            requestor.assoc.release()
        ((event_type, info),) = requestor.reports
        assert event_type == 2  # some failed
        assert info.TransactionUID == "1.2.3.999.1"
        assert info.RetrieveAETitle == gw.ae_title
        assert [
            (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in info.ReferencedSOPSequence
        ] == [(CTImageStorage, uids[0]), (CTImageStorage, uids[1])]
        assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence] == [
            (uids[2], 0x0119),
            ("1.2.3.999.404", 0x0112),
        ]

        # all committed: event type 1, no Failed SOP Sequence
        requestor = Requestor(gw)
        try:
            assert (
                requestor.request(
                    action_information("1.2.3.999.2", [(CTImageStorage, u) for u in uids])
                ).Status
                == 0x0000
            )
            assert requestor.arrived.wait(30)
        finally:
            requestor.assoc.release()
        ((event_type, info),) = requestor.reports
        assert (
            event_type == 1
            and "FailedSOPSequence" not in info
            and len(info.ReferencedSOPSequence) == 3
        )
    finally:
        gw.stop()
    recorded = entries_of_kind(gw, "storage-committed")
    assert recorded == [
        {
            "requestor": "PYSCU",
            "transaction_uid": "1.2.3.999.1",
            "committed": 2,
            "failed": 2,
            "failure_reasons": {"0x0112": 1, "0x0119": 1},
        },
        {
            "requestor": "PYSCU",
            "transaction_uid": "1.2.3.999.2",
            "committed": 3,
            "failed": 0,
            "failure_reasons": {},
        },
    ]
    delivered = log_events(gw, "storage commitment report delivered")
    assert [(e["association"], e["transaction_uid"]) for e in delivered] == [
        ("same", "1.2.3.999.1"),
        ("same", "1.2.3.999.2"),
    ]
    assert "Traceback" not in gw.log()


def test_bad_n_actions_get_their_status_and_one_line(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw", allow=("PYSCU",))
    gw.start()
    try:
        requestor = Requestor(gw)
        try:
            no_transaction = action_information("1.2.3", [(CTImageStorage, "1.2.3.4")])
            del no_transaction.TransactionUID
            assert requestor.request(no_transaction).Status == 0x0120  # missing attribute
            bad_uid = action_information("1.2.3", [(CTImageStorage, "not-a-uid")])
            assert requestor.request(bad_uid).Status == 0x0115  # invalid argument value
            assert (
                requestor.request(
                    action_information("1.2.3", []),
                ).Status
                == 0x0120
            )
            assert (
                requestor.request(
                    action_information("1.2.3", [(CTImageStorage, "1.2.3.4")]), action_type=2
                ).Status
                == 0x0123
            )  # no such action type
            assert not requestor.reports
        finally:
            requestor.assoc.release()
    finally:
        gw.stop()
    refused = [e for e in log_events(gw, "request refused") if e.get("service") == "N-ACTION"]
    assert [e["status"] for e in refused] == ["0x0120", "0x0115", "0x0120", "0x0123"]
    assert entries_of_kind(gw, "storage-committed") == []
    assert "Traceback" not in gw.log()


def test_orthanc_takes_the_report_on_a_new_association(tmp_path: Path) -> None:
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc not installed: run ./scripts/test, which installs it")
    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "ORTHANC"))
    orthanc_port = free_port()
    with open(gw.config, "a") as f:
        f.write(
            f'\n[[commitment_requestors]]\nae_title = "ORTHANC"\naddress = "127.0.0.1:{orthanc_port}"\n'
        )
    gw.start()
    orthanc = Orthanc(tmp_path / "orthanc", orthanc_port, gw)
    try:
        files = make_ct_series(tmp_path / "ct", 2, rows=32, cols=32, seed="commit")
        for f in files:
            orthanc.rest("POST", "/instances", raw=f.read_bytes())
        (study,) = orthanc.rest("GET", "/studies")
        answer = orthanc.rest(
            "POST", "/modalities/gateway/store", {"Resources": [study], "Synchronous": True}
        )
        assert answer["InstancesCount"] == 2 and answer["FailedInstancesCount"] == 0, answer
        uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
        references = [{"SOPClassUID": CTImageStorage, "SOPInstanceUID": u} for u in uids]
        references.append({"SOPClassUID": CTImageStorage, "SOPInstanceUID": "1.2.3.999.405"})
        job = orthanc.rest(
            "POST", "/modalities/gateway/storage-commitment", {"DicomInstances": references}
        )
        result: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = orthanc.rest("GET", job["Path"])
            if result["Status"] != "Pending":
                break
            time.sleep(0.2)
        assert result["Status"] == "Failure", result  # one instance the gateway never received
        assert sorted(s["SOPInstanceUID"] for s in result["Success"]) == sorted(uids)
        assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in result["Failures"]] == [
            ("1.2.3.999.405", 0x0112)
        ]
    finally:
        orthanc.stop()
        gw.stop()
    (recorded,) = entries_of_kind(gw, "storage-committed")
    assert (recorded["requestor"], recorded["committed"], recorded["failed"]) == ("ORTHANC", 2, 1)
    (delivered,) = log_events(gw, "storage commitment report delivered")
    assert delivered["association"] == "new" and delivered["calling_ae"] == "ORTHANC"
    assert "Traceback" not in gw.log()


def test_a_report_with_nowhere_to_go_is_one_error_line(tmp_path: Path) -> None:
    """A requestor that does not take the report on its association and has no configured
    address: the report is not delivered, one error line names the requestor and the transaction."""
    gw = GatewayProcess(tmp_path / "gw", allow=("PYSCU",))
    gw.start()
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(
            "127.0.0.1", gw.port, ae_title=gw.ae_title
        )  # no N-EVENT-REPORT handler
        assert assoc.is_established
        status, _ = assoc.send_n_action(
            action_information("1.2.3.999.3", [(CTImageStorage, "1.2.3.999.406")]),
            1,
            StorageCommitmentPushModel,
            INSTANCE,
        )
        assert status.Status == 0x0000
        assoc.release()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not log_events(
            gw,
            "storage commitment report not delivered: no "
            "address for the requestor (add it under "
            "[[commitment_requestors]])",
        ):
            time.sleep(0.1)
    finally:
        gw.stop()
    (line,) = log_events(
        gw,
        "storage commitment report not delivered: no address for the requestor (add it under "
        "[[commitment_requestors]])",
    )
    assert (line["calling_ae"], line["transaction_uid"], line["level"]) == (
        "PYSCU",
        "1.2.3.999.3",
        "error",
    )
    (recorded,) = entries_of_kind(gw, "storage-committed")
    assert (recorded["committed"], recorded["failed"], recorded["failure_reasons"]) == (
        0,
        1,
        {"0x0112": 1},
    )
    assert "Traceback" not in gw.log()
