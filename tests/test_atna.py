"""ATNA audit trail: DICOM audit messages (PS3.15 A.5) from a gateway process to a real syslog
daemon (rsyslog, loopback only) over TLS (RFC 5425) and UDP (RFC 5426). Every message that
arrives is checked as RFC 5424 and against the A.5.1 schema and A.5.3 event rules
(tests/atna_schema.py); a repository that is down loses nothing."""

from __future__ import annotations

import base64
import socket
import sqlite3
import ssl
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree as ET

import pydicom
import pytest

from dicomledger.atna import messages as m
from dicomledger.atna.syslog import octet_counted, syslog_message
from dicomledger.config import AtnaConfig, ConfigError, load_config
from tests import atna_schema, dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, dcmtk, free_port
from tests.syslogd import Rsyslog, event_name
from tests.test_consortium import wait_until

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

# -- the message formats, on their own -----------------------------------------------------------


def test_syslog_message_is_rfc5424_and_octet_counted():
    when = datetime(2026, 3, 4, 5, 6, 7, 890123, UTC)
    body = "<AuditMessage>é</AuditMessage>".encode()
    message = syslog_message(
        body,
        time=when,
        hostname="gw 1.example",
        app_name="dicomledger",
        procid="42",
        msgid="IHE+RFC-3881",
        severity=4,
    )
    assert (
        message
        == (
            "<84>1 2026-03-04T05:06:07.890123Z gw1.example dicomledger 42 IHE+RFC-3881 - \ufeff"
            "<AuditMessage>é</AuditMessage>"
        ).encode()
    )
    fields = atna_schema.parse_syslog(message)
    assert (fields["facility"], fields["severity"], fields["body"]) == (10, 4, body)
    framed = octet_counted(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(message) == len(rest) and rest == message  # bytes, not characters
    assert (
        syslog_message(b"x", time=when, hostname="", app_name="a", procid="1", msgid="m").split(
            b" "
        )[2]
        == b"-"
    )


def _sample_messages() -> list[m.AuditMessage]:
    src = m.AuditSource("gw.test/dicomledger", "Hospital A")
    us = m.Node("GATEWAY", "127.0.0.1", pid=1234)
    when = datetime.now(UTC)
    study = m.Study("1.2.3.4", (m.SopClassCount(dicomdata.CT_IMAGE, 3),), accession="ACC1")
    patient = m.Patient("PID1", "DOE^JANE")
    return [
        m.application_activity(
            started=True, application=us, launcher="root", source=src, time=when
        ),
        m.application_activity(started=False, application=us, launcher=None, source=src, time=when),
        m.instances_transferred(
            sender=m.Node("CT1", "192.0.2.1"),
            receiver=us,
            requestor="sender",
            patient=patient,
            studies=[study],
            outcome=m.SUCCESS,
            outcome_description=None,
            source=src,
            time=when,
        ),
        m.instances_transferred(
            sender=us,
            receiver=m.Node("WS1", "ws1.example"),
            requestor=m.Node("WS2", "192.0.2.9"),
            patient=patient,
            studies=[study, m.Study("1.2.3.5", (m.SopClassCount(dicomdata.MR_IMAGE, 1),))],
            outcome=m.MINOR_FAILURE,
            outcome_description="not delivered",
            source=src,
            time=when,
        ),
        m.query(
            requestor=m.Node("WS1", "192.0.2.9"),
            responder=us,
            sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
            identifier=b"\x08\x00\x52\x00",
            transfer_syntax_uid="1.2.840.10008.1.2",
            source=src,
            time=when,
        ),
        m.security_alert(
            alert=m.TAMPER_ALARM,
            outcome=m.SERIOUS_FAILURE,
            reporter=us,
            performers=(m.remote("192.0.2.9", "WS1"),),
            subjects=(
                study.participant_object(("pixel data differs",)),
                patient.participant_object(),
            ),
            description="pixel data differs <&> \x00 from the anchor",
            source=src,
            time=when,
        ),
    ]


def test_every_event_we_build_validates_against_the_schema():
    for message in _sample_messages():
        root = atna_schema.check(m.to_xml(message))
        assert root.find("EventIdentification/EventID").get("csd-code") == message.event_id.value


def test_the_schema_checker_refuses_what_the_standard_refuses():
    """The checker has teeth: each of these breaks A.5.1 or A.5.3 and is named."""
    good = m.to_xml(_sample_messages()[2])

    def broken(edit) -> list[str]:
        root = ET.fromstring(good)
        edit(root)
        return atna_schema.problems(ET.tostring(root))

    def swap_source_and_participant(root):
        source = root.find("AuditSourceIdentification")
        root.remove(source)
        root.insert(1, source)

    assert any(
        "wrong element or order" in p or "needs at least" in p
        for p in broken(swap_source_and_participant)
    )
    assert any(
        "UserIsRequestor" in p
        for p in broken(lambda r: r.find("ActiveParticipant").attrib.pop("UserIsRequestor"))
    )
    assert any(
        "EventActionCode" in p
        for p in broken(lambda r: r.find("EventIdentification").set("EventActionCode", "X"))
    )
    assert any(
        "xsd:dateTime" in p
        for p in broken(lambda r: r.find("EventIdentification").set("EventDateTime", "yesterday"))
    )
    assert any(
        "meaning" in p
        for p in broken(
            lambda r: r.find("EventIdentification/EventID").set("originalText", "Query")
        )
    )
    assert any(
        "patient" in p
        for p in broken(lambda r: r.remove(r.findall("ParticipantObjectIdentification")[-1]))
    )
    assert any(
        "Destination" in p
        for p in broken(
            lambda r: r.find("ActiveParticipant[2]/RoleIDCode").set("csd-code", "110153")
        )
    )
    assert any("Extra is not allowed" in p for p in broken(lambda r: ET.SubElement(r, "Extra")))


def test_atna_config_is_off_by_default_and_checked(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    assert load_config(gw.config).atna is None
    with open(gw.config, "a") as f:
        f.write('\n[atna]\nenabled = false\nrepository = "x"\n')
    assert load_config(gw.config).atna is None  # documented in the example, off until enabled
    for section, problem in [
        ('enabled = true\nrepository = "audit.example"', "atna.repository must be host:port"),
        ('enabled = true\nrepository = "a:6514"\ntransport = "tcp"', "atna.transport"),
        (
            'enabled = true\nrepository = "a:6514"\ntls_cert = "x.pem"',
            "tls_cert and tls_key go together",
        ),
        ('enabled = true\nrepository = "a:6514"\ntls_ca = "missing.pem"', "atna.tls_ca"),
        ('enabled = true\nrepository = "a:6514"\nretry_initial = 0', "atna.retry_initial"),
        (
            'enabled = true\nrepository = "a:6514"\nmax_queue = 5',
            "atna.max_queue is not a known setting",
        ),
    ]:
        text = gw.config.read_text().split("\n[atna]")[0]
        gw.config.write_text(f"{text}\n[atna]\n{section}\n")
        with pytest.raises(ConfigError, match=problem):
            load_config(gw.config)
    text = gw.config.read_text().split("\n[atna]")[0]
    gw.config.write_text(
        f'{text}\n[atna]\nenabled = true\nrepository = "audit.example:6514"\ntransport = "udp"\n'
    )
    atna = load_config(gw.config).atna
    assert atna is not None and (atna.host, atna.port, atna.transport) == (
        "audit.example",
        6514,
        "udp",
    )
    assert atna.queue == gw.dir / "data" / "atna.db" and atna.source_id == gw.origin


def test_the_example_config_documents_every_atna_setting(tmp_path):
    """Uncommented, config/gateway.example.toml's [atna] block loads, and names every setting."""
    example = Path(__file__).resolve().parent.parent / "config" / "gateway.example.toml"
    head, _, block = example.read_text().partition("# [atna]\n")
    lines = ["[atna]"] + [
        ln[2:] for ln in block.splitlines() if ln.startswith("# ") and " = " in ln.split("#")[1]
    ]
    for name in ("audit-ca.pem", "audit-client.pem", "audit-client.key"):
        (tmp_path / "keys").mkdir(exist_ok=True)
        (tmp_path / "keys" / name).write_text("test")
    config = tmp_path / "config.toml"
    config.write_text(head + "\n".join(lines) + "\n")
    atna = load_config(config).atna
    assert atna is not None and (atna.host, atna.port, atna.transport) == (
        "audit.hospital-a.example",
        6514,
        "tls",
    )
    assert (atna.max_queued, atna.retry_initial, atna.retry_max, atna.transfer_window) == (
        100000,
        1.0,
        60.0,
        2.0,
    )
    documented = {ln.split(" = ")[0] for ln in lines[1:]}
    settings = set(AtnaConfig.__dataclass_fields__) - {"host", "port"} | {"enabled", "repository"}
    assert settings <= documented, settings - documented


# -- a gateway and a real syslog daemon ------------------------------------------------------------


@pytest.fixture
def syslog(tmp_path: Path):
    daemon = Rsyslog(tmp_path / "syslog")
    daemon.start()
    yield daemon
    daemon.stop()


def audited_gateway(
    tmp_path: Path,
    syslog: Rsyslog,
    name: str = "gw",
    allow=("STORESCU", "ECHOSCU", "WS1"),
    transport: str = "tls",
    **settings: object,
) -> GatewayProcess:
    gw = GatewayProcess(tmp_path / name, allow=allow)
    with open(gw.config, "a") as f:
        f.write(syslog.atna_section(transport, **settings))
    return gw


def bodies(messages: list[dict[str, object]]) -> list[ET.Element]:
    """Each message's XML, checked against the schema and rules; RFC 5424 header checked too."""
    out = []
    for msg in messages:
        assert (msg["facility"], msg["app"], msg["msgid"]) == (10, "dicomledger", "IHE+RFC-3881"), (
            msg
        )
        out.append(atna_schema.check(msg["body"]))  # type: ignore[arg-type]
    return out


def named(messages: list[dict[str, object]], name: str) -> list[ET.Element]:
    return [atna_schema.check(msg["body"]) for msg in messages if event_name(msg["body"]) == name]  # type: ignore[arg-type]


def patient_ids(root: ET.Element) -> list[str]:
    return [
        o.get("ParticipantObjectID")
        for o in root.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCodeRole") == "1"
    ]


def sop_counts(root: ET.Element) -> dict[str, dict[str, int]]:
    """Study UID -> SOP class -> NumberOfInstances."""
    return {
        o.get("ParticipantObjectID"): {
            s.get("UID"): int(s.get("NumberOfInstances")) for s in o.findall("SOPClass")
        }
        for o in root.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCodeRole") == "3"
        and o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    }


def participant(root: ET.Element, role: str) -> ET.Element:
    (p,) = [
        p
        for p in root.findall("ActiveParticipant")
        if p.find(f"RoleIDCode[@csd-code='{role}']") is not None
    ]
    return p


def test_gateway_events_reach_the_repository_over_tls(tmp_path, syslog):
    """Start, C-STOREs of two patients, a C-FIND, a refused association and a refused TLS
    handshake, stop: each arrives as its audit message, valid, naming the right AEs, roles,
    patients, studies and counts; the gateway's own log names no patient."""
    gw = audited_gateway(tmp_path, syslog)
    a, b = dicomdata.fake_patient("atna-a"), dicomdata.fake_patient("atna-b")
    study_a, study_b = dicomdata.fake_uid("study", "atna-a"), dicomdata.fake_uid("study", "atna-b")
    files_a = dicomdata.make_ct_series(
        tmp_path / "a", 3, 32, 32, patient=a, study_uid=study_a, seed="atna-a"
    )
    files_b = dicomdata.make_mr_series(
        tmp_path / "b", 2, patient=b, study_uid=study_b, seed="atna-b"
    )
    gw.start()
    try:
        assert gw.storescu(*files_a, *files_b).returncode == 0
        refused = dcmtk(
            "echoscu", "-aet", "INTRUDER", "-aec", gw.ae_title, "127.0.0.1", str(gw.port)
        )
        assert refused.returncode != 0
        found = dcmtk(
            "findscu",
            "-aet",
            "WS1",
            "-aec",
            gw.ae_title,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"PatientName={a.name.split('^')[0]}*",
            "-k",
            "StudyInstanceUID",
            "127.0.0.1",
            str(gw.port),
        )
        assert found.returncode == 0, found.stdout + found.stderr
        # a stranger without a client certificate at the peer API: refused at the handshake
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:  # (TLS 1.3: the refusal may come after our side thinks the handshake is done)
            with (
                socket.create_connection(("127.0.0.1", gw.peer_port)) as raw,
                context.wrap_socket(raw) as tls,
            ):
                tls.sendall(b"GET /v1/checkpoints HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.recv(100) == b""
        except (ssl.SSLError, OSError):
            pass
        syslog.wait_for(
            lambda ms: sum(event_name(x["body"]) == "DICOM Instances Transferred" for x in ms) == 2,
            what="a transfer message per patient",
        )
    finally:
        assert gw.stop() == 0
    messages = syslog.wait_for(
        lambda ms: any("Application Stop" in event_name(x["body"]) for x in ms),
        what="Application Stop",
    )
    roots = bodies(messages)
    names = [event_name(x["body"]) for x in messages]
    assert (
        names[0] == "Application Activity: Application Start"
        and names[-1] == "Application Activity: Application Stop"
    )
    assert sorted(names) == sorted(
        [
            "Application Activity: Application Start",
            "DICOM Instances Transferred",
            "DICOM Instances Transferred",
            "Query",
            "Security Alert: Node Authentication",
            "Security Alert: Node Authentication",
            "Application Activity: Application Stop",
        ]
    ), names
    assert len({m_["procid"] for m_ in messages}) == 1 and messages[0]["procid"] == str(gw.proc.pid)

    start = roots[0]
    app = participant(start, "110150")
    assert (
        app.get("UserID") == str(gw.proc.pid)
        and app.get("AlternativeUserID") == f"AETITLES={gw.ae_title}"
    )
    assert start.find("AuditSourceIdentification").get("AuditSourceID") == gw.origin

    transfers = {patient_ids(r)[0]: r for r in named(messages, "DICOM Instances Transferred")}
    assert set(transfers) == {a.patient_id, b.patient_id}
    ta = transfers[a.patient_id]
    assert ta.find("EventIdentification").get("EventActionCode") == "C"
    assert sop_counts(ta) == {study_a: {dicomdata.CT_IMAGE: 3}}
    assert sop_counts(transfers[b.patient_id]) == {study_b: {dicomdata.MR_IMAGE: 2}}
    source, destination = participant(ta, "110153"), participant(ta, "110152")
    assert (
        source.get("UserID"),
        source.get("UserIsRequestor"),
        source.get("NetworkAccessPointID"),
    ) == ("STORESCU", "true", "127.0.0.1")
    assert (destination.get("AlternativeUserID"), destination.get("UserIsRequestor")) == (
        f"AETITLES={gw.ae_title}",
        "false",
    )
    patient = [
        o
        for o in ta.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCodeRole") == "1"
    ][0]
    assert patient.find("ParticipantObjectName").text == a.name
    assert [x.get("Number") for x in ta.iter("Accession")] == [a.accession]

    (query,) = named(messages, "Query")
    assert participant(query, "110153").get("UserID") == "WS1"
    identifier = base64.b64decode(
        query.find("ParticipantObjectIdentification/ParticipantObjectQuery").text
    )
    decoded = pydicom.dcmread(pydicom.filebase.DicomBytesIO(identifier), force=True)
    assert (
        str(decoded.PatientName) == f"{a.name.split('^')[0]}*"
        and decoded.QueryRetrieveLevel == "STUDY"
    )

    alerts = named(messages, "Security Alert: Node Authentication")
    descriptions = [r.find("EventIdentification/EventOutcomeDescription").text for r in alerts]
    assert any("INTRUDER" in d or "allowed_calling_aes" in d for d in descriptions), descriptions
    assert any("TLS handshake refused on the peer API" in d for d in descriptions), descriptions
    assert all(r.find("EventIdentification").get("EventOutcomeIndicator") == "4" for r in alerts)
    assert all(x["severity"] == 4 for x in messages if "Security Alert" in event_name(x["body"]))

    log = gw.log()  # PHI goes to the repository only
    for phi in (a.patient_id, a.name, b.patient_id, a.name.split("^")[0]):
        assert phi not in log
    assert '"audit trail started"' in log and "audit repository unreachable" not in log


def queued(gw: GatewayProcess) -> int:
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'atna.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        con.close()


def test_a_repository_that_is_down_loses_nothing(tmp_path):
    """The repository is down at start, comes up, goes down mid-connection, and is down across a
    gateway restart: every audit message arrives exactly once, in order."""
    syslog = Rsyslog(tmp_path / "syslog")
    gw = audited_gateway(tmp_path, syslog)
    series = [
        dicomdata.make_mr_series(
            tmp_path / f"s{i}", 2, patient=dicomdata.fake_patient(f"down-{i}"), seed=f"down-{i}"
        )
        for i in range(3)
    ]
    try:
        gw.start()  # repository down
        assert gw.storescu(*series[0]).returncode == 0
        wait_until(lambda: queued(gw) == 2, what="Application Start and the transfer to be queued")
        wait_until(lambda: "audit repository unreachable" in gw.log(), what="the outage log line")
        assert gw.log().count("audit repository unreachable") == 1  # once per outage, not per retry
        assert oct((gw.dir / "data" / "atna.db").stat().st_mode & 0o777) == "0o600"

        syslog.start()
        syslog.wait_for(lambda ms: len(ms) == 2, what="the queued messages")
        wait_until(lambda: "audit repository reachable again" in gw.log(), what="the recovery line")

        syslog.stop()  # down again, with our connection open
        assert gw.storescu(*series[1]).returncode == 0
        wait_until(
            lambda: gw.log().count("audit repository unreachable") == 2, what="the second outage"
        )
        syslog.start()
        syslog.wait_for(lambda ms: len(ms) == 3, what="the transfer made while it was down")

        syslog.stop()
        assert gw.stop() == 0  # Application Stop stays queued
        assert queued(gw) == 1
        gw.start()
        assert gw.storescu(*series[2]).returncode == 0
        syslog.start()
        assert gw.stop() == 0
        messages = syslog.wait_for(lambda ms: len(ms) >= 7, what="every message")
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()
        syslog.stop()
    names = [event_name(x["body"]) for x in messages]
    assert names == [
        "Application Activity: Application Start",
        "DICOM Instances Transferred",
        "DICOM Instances Transferred",
        "Application Activity: Application Stop",
        "Application Activity: Application Start",
        "DICOM Instances Transferred",
        "Application Activity: Application Stop",
    ], names
    roots = bodies(messages)
    assert [patient_ids(r) for r in roots if patient_ids(r)] == [
        [dicomdata.fake_patient(f"down-{i}").patient_id] for i in range(3)
    ]
    assert queued(gw) == 0


def test_udp_transport(tmp_path, syslog):
    gw = audited_gateway(tmp_path, syslog, transport="udp")
    patient = dicomdata.fake_patient("udp")
    gw.start()
    try:
        assert (
            gw.storescu(
                *dicomdata.make_mr_series(tmp_path / "s", 2, patient=patient, seed="udp")
            ).returncode
            == 0
        )
        messages = syslog.wait_for(lambda ms: len(ms) == 2, transport="udp", what="two datagrams")
    finally:
        gw.stop()
    roots = bodies(messages)
    assert [event_name(x["body"]) for x in messages] == [
        "Application Activity: Application Start",
        "DICOM Instances Transferred",
    ]
    assert patient_ids(roots[1]) == [patient.patient_id]
    assert syslog.raw("tls") == []


def test_a_full_queue_drops_new_messages_and_says_how_many(tmp_path):
    """max_queued 3 with the repository down: the fourth and later events are dropped, one error
    line says so, and once the queue drains an "Audit Recording Stopped" alert counts them."""
    syslog = Rsyslog(tmp_path / "syslog")
    gw = audited_gateway(tmp_path, syslog, max_queued=3)
    try:
        gw.start()
        for i in range(4):  # four patients: four transfer messages, after Application Start
            assert (
                gw.storescu(
                    *dicomdata.make_mr_series(
                        tmp_path / f"p{i}",
                        1,
                        patient=dicomdata.fake_patient(f"full-{i}"),
                        seed=f"full-{i}",
                    )
                ).returncode
                == 0
            )
        wait_until(lambda: "audit queue full" in gw.log(), what="the queue-full line")
        assert gw.log().count("audit queue full") == 1
        syslog.start()
        messages = syslog.wait_for(
            lambda ms: any("Audit Recording Stopped" in event_name(x["body"]) for x in ms),
            what="the Audit Recording Stopped alert",
        )
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()
        syslog.stop()
    names = [event_name(x["body"]) for x in messages]
    assert names[:3] == [
        "Application Activity: Application Start",
        "DICOM Instances Transferred",
        "DICOM Instances Transferred",
    ]
    (alert,) = named(messages, "Security Alert: Audit Recording Stopped")
    text = alert.find("EventIdentification/EventOutcomeDescription").text
    assert text.startswith("2 audit events were dropped"), text
    bodies(messages)


# -- forwarding, retrieval, tamper alarm ----------------------------------------------------------


def test_forward_move_get_tamper_alarm_and_grants_are_audited(tmp_path, syslog):
    """Forwarding to a DCMTK storescp, a C-MOVE and a C-GET by a workstation, a move after a
    stored file was tampered with, grants and a revocation: Instances Transferred messages with
    the roles of each case, a Security Alert naming the instance, Patient Record messages."""
    received = tmp_path / "pacs"
    received.mkdir()
    pacs_port, ws1_port = free_port(), free_port()
    # a window the three images surely arrive within, even on a starved machine, and that
    # the two C-MOVEs fall within too: each must still be a message of its own
    gw = audited_gateway(tmp_path, syslog, transfer_window=3.0)
    with open(gw.config, "a") as f:
        f.write(
            "\n[forwarding]\nretry_initial = 0.2\nretry_max = 1.0\n"
            f'\n[[destinations]]\nae_title = "PACS"\naddress = "127.0.0.1:{pacs_port}"\n'
            f'\n[[destinations]]\nae_title = "WS1"\naddress = "127.0.0.1:{ws1_port}"\n'
            '\n[[routes]]\nto = ["PACS"]\nmodality = "MR"\n'
        )
    patient = dicomdata.fake_patient("fwd")
    study = dicomdata.fake_uid("study", "fwd")
    files = dicomdata.make_mr_series(
        tmp_path / "mr", 3, patient=patient, study_uid=study, seed="fwd"
    )
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(received), "+uf", str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=DCMTK_ENV,
    )
    gw.start()
    try:
        assert (
            gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS").returncode == 0
        )  # before the images
        assert gw.storescu(*files).returncode == 0
        assert gw.cli("grant", "--patient-id", patient.patient_id, "--to", "WS1").returncode == 0
        wait_until(lambda: len(list(received.iterdir())) == 3, what="three forwards")
        keys = ("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")
        for out in ("moved", "got", "moved2"):
            (tmp_path / out).mkdir()
        moved = dcmtk(
            "movescu",
            "-aet",
            "WS1",
            "-aec",
            gw.ae_title,
            "-aem",
            "WS1",
            "+P",
            str(ws1_port),
            "-S",
            "-od",
            str(tmp_path / "moved"),
            *keys,
            "127.0.0.1",
            str(gw.port),
        )
        assert moved.returncode == 0, moved.stdout + moved.stderr
        got = dcmtk(
            "getscu",
            "-aet",
            "WS1",
            "-aec",
            gw.ae_title,
            "-S",
            "-od",
            str(tmp_path / "got"),
            *keys,
            "127.0.0.1",
            str(gw.port),
        )
        assert got.returncode == 0, got.stdout + got.stderr
        # tamper with one stored file: the next move does not send it and raises the alarm
        con = sqlite3.connect(f"file:{gw.dir / 'data' / 'index.db'}?mode=ro", uri=True)
        uid = str(pydicom.dcmread(files[1]).SOPInstanceUID)
        (relative,) = con.execute(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()
        con.close()
        stored = gw.dir / "data" / "images" / relative
        data = bytearray(stored.read_bytes())
        data[-5] ^= 0xFF
        stored.write_bytes(bytes(data))
        dcmtk(
            "movescu",
            "-aet",
            "WS1",
            "-aec",
            gw.ae_title,
            "-aem",
            "WS1",
            "+P",
            str(ws1_port),
            "-S",
            "-od",
            str(tmp_path / "moved2"),
            *keys,
            "127.0.0.1",
            str(gw.port),
        )
        assert gw.cli("revoke", "--patient-id", patient.patient_id, "--to", "WS1").returncode == 0
        messages = syslog.wait_for(
            lambda ms: (
                sum(event_name(x["body"]) == "DICOM Instances Transferred" for x in ms) >= 5
                and any("Stored Instance" in event_name(x["body"]) for x in ms)
                and sum(event_name(x["body"]) == "Patient Record" for x in ms) == 3
            ),
            what="forward, move, get and alarm",
        )
    finally:
        gw.stop()
        pacs.terminate()
        pacs.wait(timeout=10)
    # the grant to PACS came before any image of the patient: the gateway knows it only by its
    # pseudonym (the command sends no Patient ID), which A.5.3.9's patient ID type cannot carry
    first_record = next(x for x in messages if event_name(x["body"]) == "Patient Record")
    assert atna_schema.problems(first_record["body"]) == [
        "Patient Record: exactly one patient (ID type 2, RFC-3881)"
    ]
    bodies([x for x in messages if x is not first_record])
    transfers = named(messages, "DICOM Instances Transferred")
    received_here = [
        r for r in transfers if r.find("EventIdentification").get("EventActionCode") == "C"
    ]
    sent = [r for r in transfers if r.find("EventIdentification").get("EventActionCode") == "R"]
    assert len(received_here) == 1 and sop_counts(received_here[0]) == {
        study: {dicomdata.MR_IMAGE: 3}
    }
    by_destination = {}
    for r in sent:
        assert patient_ids(r) == [patient.patient_id]
        by_destination.setdefault(participant(r, "110152").get("UserID"), []).append(r)
    (forward,) = by_destination["PACS"]
    assert sop_counts(forward) == {study: {dicomdata.MR_IMAGE: 3}}
    assert (
        participant(forward, "110153").get("UserIsRequestor") == "true"
    )  # we sent on our own initiative
    assert participant(forward, "110152").get("UserIsRequestor") == "false"
    ws1 = by_destination["WS1"]
    assert len(ws1) == 3  # C-MOVE, C-GET, and the move after the tamper (2 of 3 sent)
    # told apart by content, not by arrival order (the sends may finish in either order)
    (get,) = [r for r in ws1 if len(r.findall("ActiveParticipant")) == 2]
    move, move2 = sorted(
        (r for r in ws1 if r is not get), key=lambda r: -sum(sop_counts(r)[study].values())
    )
    # C-MOVE: we are the source, WS1 the destination, and WS1 as the requestor (a third participant)
    assert [p.get("UserIsRequestor") for p in move.findall("ActiveParticipant")] == [
        "false",
        "false",
        "true",
    ]
    assert move.findall("ActiveParticipant")[2].get("UserID") == "WS1"
    # C-GET: the receiver asked
    assert [p.get("UserIsRequestor") for p in get.findall("ActiveParticipant")] == ["false", "true"]
    assert sop_counts(move) == sop_counts(get) == {study: {dicomdata.MR_IMAGE: 3}}
    assert sop_counts(move2) == {study: {dicomdata.MR_IMAGE: 2}}
    (alarm,) = named(messages, "Security Alert: Stored Instance Differs From Its Ledger Anchor")
    assert alarm.find("EventIdentification").get("EventOutcomeIndicator") == "8"
    assert [i.get("UID") for i in alarm.iter("Instance")] == [uid]
    assert patient_ids(alarm) == [patient.patient_id]
    assert "pixel hash" in alarm.find("EventIdentification/EventOutcomeDescription").text
    # grants and the revocation: Patient Record, naming the patient by Patient ID (the gateway got
    # only the pseudonym from the command and found the patient in its index)
    records = [
        ET.fromstring(x["body"]) for x in messages if event_name(x["body"]) == "Patient Record"
    ]
    assert [patient_ids(r) for r in records][1:] == [[patient.patient_id]] * 2
    pseudonymous = records[0].find("ParticipantObjectIdentification")
    assert (
        pseudonymous.find("ParticipantObjectIDTypeCode").get("csd-code") == "DL-PATIENT-PSEUDONYM"
    )
    assert patient.patient_id not in ET.tostring(records[0]).decode()
    assert [r.find("EventIdentification").get("EventActionCode") for r in records] == ["U"] * 3
    texts = [
        r.find("ParticipantObjectIdentification/ParticipantObjectDescription").text for r in records
    ]
    assert texts[0].startswith(
        "grant of access to all the patient's images for PACS (ledger entry"
    ), texts
    assert texts[1].startswith("grant of access to all the patient's images for WS1"), texts
    assert texts[2].startswith("revocation of access to all the patient's images for WS1"), texts


# -- the consortium: equivocation ------------------------------------------------------------------


def test_equivocation_is_a_security_alert(tmp_path, syslog):
    """Peer C asks B to cosign two checkpoints of the same size with different roots, both signed
    with C's key: B flags C and sends a Security Alert naming C."""
    import asyncio

    import aiohttp

    from dicomledger.ledger.checkpoint import Checkpoint, format_checkpoint
    from dicomledger.ledger.identity import load_key_file
    from dicomledger.ledger.note import Note, format_note, sign_note_text
    from dicomledger.ledger.peer_tls import client_context

    c = GatewayProcess(tmp_path / "c", ae_title="GWC")  # never started: the test speaks for it
    b = audited_gateway(tmp_path, syslog, name="b")
    b.add_peer(c)
    c_key = load_key_file(c.config.parent / "keys" / "gateway.key")

    def note(root: bytes) -> str:
        text = format_checkpoint(Checkpoint(c.origin, 5, root))
        return base64.b64encode(
            format_note(Note(text, (sign_note_text(text, c.origin, c_key),)))
        ).decode()

    async def ask() -> list[int]:
        ctx = client_context(
            c.dir / "keys" / "peer-tls.crt",
            c.dir / "keys" / "peer-tls.key",
            [(b.dir / "keys" / "peer-tls.crt").read_bytes()],
        )
        statuses = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            for old, root in ((0, b"\x01" * 32), (5, b"\x02" * 32)):
                async with session.post(
                    f"https://127.0.0.1:{b.peer_port}/v1/add-checkpoint",
                    json={"note": note(root), "old_size": old, "proof": []},
                ) as resp:
                    statuses.append(resp.status)
        return statuses

    b.start(accept_local_tip=True)  # its one peer, C, never runs: nobody can confirm its tip
    try:
        statuses = asyncio.run(ask())
        assert statuses[0] == 200 and statuses[1] >= 400, statuses
        messages = syslog.wait_for(
            lambda ms: any("Peer Gateway" in event_name(x["body"]) for x in ms),
            what="the equivocation alert",
        )
    finally:
        b.stop()
    assert "EQUIVOCATION" in b.log()
    (alert,) = named(messages, "Security Alert: Peer Gateway Signed Two Histories")
    (subject,) = alert.findall("ParticipantObjectIdentification")
    assert subject.get("ParticipantObjectID") == c.origin
    assert subject.find("ParticipantObjectIDTypeCode").get("csd-code") == "110182"
    assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "8"
