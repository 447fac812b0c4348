"""DICOM TLS on loopback with real peers: DCMTK's echoscu, storescu and
findscu with +tls against a gateway made by `init --tls`; DCMTK storescp +tls as a TLS
forwarding destination and as a C-MOVE destination; pynetdicom's TLS SCU (C-ECHO, C-MOVE,
C-GET: DCMTK 3.6.7's movescu and getscu have no TLS); and every refusal (no, wrong or foreign client certificate, plain TCP on the TLS
port, an AE bound to a certificate or source address arriving otherwise) with its one log line."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicomledger.config import ConfigError, load_config
from dicomledger.dicom.net.tls import client_context, server_context
from dicomledger.tls_pki import create_test_pki, issue, write_cert, write_key
from tests import dicomdata
from tests.conftest import DCMTK_ENV, GatewayProcess, dcmtk, free_port
from tests.netharness import NetServer, captured_logs, events
from tests.syslogd import Rsyslog, event_name
from tests.test_consortium import wait_until

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

captured_logs_for_test = contextmanager(captured_logs)

ALLOWED = ("STORESCU", "ECHOSCU", "WS1", "BOUND", "NAMED", "FROMNET")


@dataclass
class Site:
    gw: GatewayProcess
    tls_port: int
    keys: Path  # the gateway's keys/tls: ca.crt, server.*, client.* (CN storescu.test)
    bound: tuple[Path, Path]  # (key, cert) of the certificate BOUND is pinned to
    foreign: tuple[Path, Path]  # (key, cert) under another CA
    pacs_out: Path
    ws1_out: Path  # what WS1 (a storescp +tls) received by C-MOVE
    patient: dicomdata.FakePatient
    files: list[Path]


def fingerprint(cert: Path) -> str:
    return x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.SHA256()).hex()


def log_events(gw: GatewayProcess, event: str) -> list[dict]:
    out = []
    for line in gw.log().splitlines():
        if f'"{event}"' in line:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                out.append(record)
    return out


def tls_opts(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("tls")
    tls_port, pacs_port, ws1_port = free_port(), free_port(), free_port()
    gw = GatewayProcess(tmp / "gw", allow=ALLOWED, init_args=("--tls", "--tls-port", str(tls_port)))
    keys = gw.dir / "keys" / "tls"
    ca_key = load_pem_private_key((keys / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    bound_key, bound_cert = issue(ca_key, ca_cert, "bound.test", ["bound.test"])  # type: ignore[arg-type]
    write_key(tmp / "bound.key", bound_key)
    write_cert(tmp / "bound.crt", bound_cert)
    other = create_test_pki(
        tmp / "other", site="elsewhere", server_names=["localhost"], client_name="storescu.test"
    )
    with open(gw.config, "a") as f:
        f.write(
            f'\n[[ae_bindings]]\ncalling_ae = "BOUND"\ncertificate_sha256 = "{fingerprint(tmp / "bound.crt")}"\n'
            '\n[[ae_bindings]]\ncalling_ae = "NAMED"\ncertificate_name = "storescu.test"\n'
            '\n[[ae_bindings]]\ncalling_ae = "FROMNET"\naddresses = ["192.0.2.0/24"]\n'
            "\n[forwarding]\nretry_initial = 0.2\nretry_max = 1.0\n"
            f'\n[[destinations]]\nae_title = "PACS"\naddress = "127.0.0.1:{pacs_port}"\ntls = true\n'
            f'tls_ca = "keys/tls/ca.crt"\ntls_cert = "keys/tls/server.crt"\ntls_key = "keys/tls/server.key"\n'
            f'\n[[destinations]]\nae_title = "WS1"\naddress = "127.0.0.1:{ws1_port}"\ntls = true\n'
            'tls_ca = "keys/tls/ca.crt"\ntls_cert = "keys/tls/server.crt"\ntls_key = "keys/tls/server.key"\n'
            'tls_server_name = "storescu.test"\n'  # WS1 presents the client certificate
            '\n[[routes]]\nto = ["PACS"]\nmodality = "MR"\n'
        )
    pacs_out, ws1_out = tmp / "pacs", tmp / "ws1"
    pacs_log, ws1_log = open(tmp / "storescp-pacs.log", "w"), open(tmp / "storescp-ws1.log", "w")
    receivers = []
    for aet, out, port, key, cert, log in (
        ("PACS", pacs_out, pacs_port, keys / "server.key", keys / "server.crt", pacs_log),
        ("WS1", ws1_out, ws1_port, keys / "client.key", keys / "client.crt", ws1_log),
    ):
        out.mkdir()
        receivers.append(
            subprocess.Popen(
                [
                    "storescp",
                    "-v",
                    "-aet",
                    aet,
                    "-od",
                    str(out),
                    *tls_opts(key, cert, keys / "ca.crt"),
                    str(port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )
        )
    patient = dicomdata.fake_patient("tls")
    files = dicomdata.make_mr_series(tmp / "mr", 3, seed="tls", patient=patient)
    try:
        gw.start()
        try:
            granted = gw.cli("grant", "--patient-id", patient.patient_id, "--to", "PACS")
            assert granted.returncode == 0, granted.stderr
            granted = gw.cli("grant", "--patient-id", patient.patient_id, "--to", "WS1")
            assert granted.returncode == 0, granted.stderr
            yield Site(
                gw,
                tls_port,
                keys,
                (tmp / "bound.key", tmp / "bound.crt"),
                (other.client_key, other.client_cert),
                pacs_out,
                ws1_out,
                patient,
                files,
            )
        finally:
            gw.stop()
    finally:
        for proc in receivers:
            proc.terminate()
            proc.wait(timeout=10)
        pacs_log.close()
        ws1_log.close()


def echoscu(
    site: Site, aet: str, *options: str, port: int | None = None
) -> subprocess.CompletedProcess:
    return dcmtk(
        "echoscu",
        "-v",
        "-aet",
        aet,
        "-aec",
        site.gw.ae_title,
        *options,
        "127.0.0.1",
        str(site.tls_port if port is None else port),
        timeout=60,
    )


def client_tls(site: Site) -> list[str]:
    return tls_opts(site.keys / "client.key", site.keys / "client.crt", site.keys / "ca.crt")


# -- init --tls ------------------------------------------------------------------------------


def test_init_tls_writes_private_keys_and_fills_the_config(site):
    for name in ("ca.key", "server.key", "client.key", "ca.crt", "server.crt", "client.crt"):
        assert stat.S_IMODE((site.keys / name).stat().st_mode) == 0o600, name
    config = load_config(site.gw.config)
    assert config.tls is not None and config.tls.port == site.tls_port
    assert config.tls.ca_file == site.keys / "ca.crt" and config.tls.require_client_certificate
    text = site.gw.config.read_text()
    assert (
        f'certificate_sha256 = "{fingerprint(site.keys / "client.crt")}"' in text
    )  # the commented example
    # DCMTK checks the server certificate against the CA offline
    checked = dcmtk(
        "echoscu", "+tla", "+cf", str(site.keys / "ca.crt"), "+vc", str(site.keys / "server.crt")
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- real TLS peers ----------------------------------------------------------------------------


def test_echoscu_and_storescu_over_tls(site, tmp_path):
    result = echoscu(site, "ECHOSCU", *client_tls(site))
    assert result.returncode == 0, result.stdout + result.stderr
    files = dicomdata.make_ct_series(tmp_path / "ct", 2, 32, 32, seed="tls-ct")
    images = site.gw.dir / "data" / "images"
    stored_before = sum(1 for p in images.rglob("*") if p.is_file())
    result = dcmtk(
        "storescu",
        "-v",
        "-aet",
        "STORESCU",
        "-aec",
        site.gw.ae_title,
        *client_tls(site),
        "127.0.0.1",
        str(site.tls_port),
        *map(str, files),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and output.count("Received Store Response (Success)") == 2, output
    assert (
        sum(1 for p in images.rglob("*") if p.is_file()) == stored_before + 2
    )  # Success: stored and anchored
    # the plain port still serves plain TCP alongside
    assert echoscu(site, "ECHOSCU", port=site.gw.port).returncode == 0


def test_forwarded_moved_and_got_over_tls(site, tmp_path):
    result = dcmtk(
        "storescu",
        "-v",
        "-aet",
        "STORESCU",
        "-aec",
        site.gw.ae_title,
        *client_tls(site),
        "127.0.0.1",
        str(site.tls_port),
        *map(str, site.files),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in site.files}
    # forwarding: storescp +tls requires and checks our client certificate
    wait_until(
        lambda: len(list(site.pacs_out.iterdir())) >= len(sent),
        timeout=30,
        what="forwarded over TLS",
    )
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in site.pacs_out.iterdir()} == sent

    # C-FIND over TLS (WS1 is granted the patient: it sees the study)
    found = tmp_path / "found"
    found.mkdir()
    result = dcmtk(
        "findscu",
        "-v",
        "-aet",
        "WS1",
        "-aec",
        site.gw.ae_title,
        "-S",
        "-X",
        "-od",
        str(found),
        *client_tls(site),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"PatientID={site.patient.patient_id}",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(site.tls_port),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    studies = {str(pydicom.dcmread(p).StudyInstanceUID) for p in found.glob("rsp*.dcm")}
    study = str(pydicom.dcmread(site.files[0]).StudyInstanceUID)
    assert studies == {study}

    # C-MOVE over TLS (DCMTK 3.6.7's movescu and getscu have no TLS: pynetdicom's TLS SCU asks)
    # to WS1, a storescp +tls: the gateway opens TLS to it, checking its name and presenting ours
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", study
    assoc = tls_scu(site, "WS1", StudyRootQueryRetrieveInformationModelMove)
    try:
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_move(
                identifier, "WS1", StudyRootQueryRetrieveInformationModelMove
            )
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in site.ws1_out.iterdir()} == sent

    # C-GET over TLS: the instances come back on the TLS association itself
    got: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        got.append(event.dataset)
        return 0x0000

    assoc = tls_scu(
        site,
        "WS1",
        StudyRootQueryRetrieveInformationModelGet,
        MRImageStorage,
        roles=[build_role(MRImageStorage, scp_role=True)],
        handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        ]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert {str(ds.SOPInstanceUID) for ds in got} == sent


def tls_scu(
    site: Site, aet: str, *contexts: str, roles: list | None = None, handlers: list | None = None
) -> Association:
    """pynetdicom's TLS SCU, with the test client certificate."""
    context = ssl.create_default_context(cafile=site.keys / "ca.crt")
    context.load_cert_chain(site.keys / "client.crt", site.keys / "client.key")
    ae = AE(ae_title=aet)
    for abstract in contexts:
        ae.add_requested_context(abstract)
    assoc = ae.associate(
        "127.0.0.1",
        site.tls_port,
        ae_title=site.gw.ae_title,
        tls_args=(context, "localhost"),
        ext_neg=roles or [],
        evt_handlers=handlers or [],
    )
    assert assoc.is_established
    return assoc


def test_pynetdicom_tls_scu(site):
    assoc = tls_scu(site, "ECHOSCU", Verification)
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        assoc.release()


# -- refusals ------------------------------------------------------------------------------------


def handshake_refusals(site: Site) -> list[dict]:
    return log_events(site.gw, "tls handshake refused")


def refused_after(site: Site, before: int, what: str) -> dict:
    wait_until(lambda: len(handshake_refusals(site)) > before, timeout=10, what=what)
    refusals = handshake_refusals(site)
    assert len(refusals) == before + 1, refusals[before:]
    line = refusals[-1]
    assert line["peer"].startswith("127.0.0.1:") and line["level"] == "warning"
    assert "Traceback" not in site.gw.log()
    return line


def test_no_client_certificate_is_refused_at_the_handshake(site):
    before = len(handshake_refusals(site))
    result = echoscu(site, "ECHOSCU", "+tla", "+cf", str(site.keys / "ca.crt"))
    assert result.returncode != 0
    line = refused_after(site, before, "no-certificate refusal")
    assert "did not return a certificate" in line["reason"], line


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(site):
    before = len(handshake_refusals(site))
    key, cert = site.foreign
    result = echoscu(site, "ECHOSCU", *tls_opts(key, cert, site.keys / "ca.crt"))
    assert result.returncode != 0
    line = refused_after(site, before, "foreign-certificate refusal")
    assert "certificate" in line["reason"] and (
        "unknown ca" in line["reason"] or "verify failed" in line["reason"]
    ), line


def test_plain_tcp_to_the_tls_port_is_refused_cleanly(site):
    before = len(handshake_refusals(site))
    result = echoscu(site, "ECHOSCU")  # no +tls: an A-ASSOCIATE-RQ where a ClientHello belongs
    assert result.returncode != 0
    line = refused_after(site, before, "plain-TCP refusal")
    assert "not a TLS handshake" in line["reason"], line
    with socket.create_connection(
        ("127.0.0.1", site.tls_port), timeout=10
    ) as raw:  # and bytes that are no PDU
        raw.sendall(b"\x01\x00" * 40)
        try:
            assert raw.recv(100) == b""
        except ConnectionResetError:
            pass
    wait_until(
        lambda: len(handshake_refusals(site)) == before + 2, timeout=10, what="second refusal"
    )
    assert echoscu(site, "ECHOSCU", *client_tls(site)).returncode == 0  # the listener is fine


def association_refusals(site: Site, calling_ae: str) -> list[dict]:
    return [
        e for e in log_events(site.gw, "association refused") if e.get("calling_ae") == calling_ae
    ]


def test_ae_bound_to_a_certificate_is_refused_with_another_or_on_plain_tcp(site):
    key, cert = site.bound
    ok = echoscu(site, "BOUND", *tls_opts(key, cert, site.keys / "ca.crt"))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    other = echoscu(site, "BOUND", *client_tls(site))  # valid under the CA, but not the pinned one
    assert other.returncode != 0 and "Association Rejected" in other.stdout + other.stderr
    plain = echoscu(site, "BOUND", port=site.gw.port)
    assert plain.returncode != 0 and "Association Rejected" in plain.stdout + plain.stderr
    wait_until(
        lambda: len(association_refusals(site, "BOUND")) == 2,
        timeout=10,
        what="two refusals of BOUND",
    )
    with_other, on_plain = association_refusals(site, "BOUND")
    assert "another certificate" in with_other["reason"] and with_other["peer"].startswith(
        "127.0.0.1:"
    )
    assert "plain TCP" in on_plain["reason"] and on_plain["peer"].startswith("127.0.0.1:")

    # bound by subject name: the init client certificate (CN storescu.test) may, the pinned one may not
    assert echoscu(site, "NAMED", *client_tls(site)).returncode == 0
    assert echoscu(site, "NAMED", *tls_opts(key, cert, site.keys / "ca.crt")).returncode != 0
    wait_until(
        lambda: len(association_refusals(site, "NAMED")) == 1, timeout=10, what="refusal of NAMED"
    )
    assert "not for storescu.test" in association_refusals(site, "NAMED")[0]["reason"]


def test_ae_bound_to_source_addresses_is_refused_from_elsewhere(site):
    result = echoscu(site, "FROMNET", *client_tls(site))
    assert result.returncode != 0 and "Association Rejected" in result.stdout + result.stderr
    wait_until(
        lambda: len(association_refusals(site, "FROMNET")) == 1,
        timeout=10,
        what="refusal of FROMNET",
    )
    line = association_refusals(site, "FROMNET")[0]
    assert "other source addresses than 127.0.0.1" in line["reason"] and line["peer"].startswith(
        "127.0.0.1:"
    )


# -- the listener alone: TLS only, in process -------------------------------------------------------


def test_tls_only_listener_serves_pynetdicom_and_refuses_plain_tcp(tmp_path):
    pki = create_test_pki(
        tmp_path / "pki",
        site="t",
        server_names=["localhost", "127.0.0.1"],
        client_name="modality.test",
    )
    context = server_context(
        pki.server_cert, pki.server_key, pki.ca_cert, require_client_certificate=True
    )
    with NetServer(tmp_path, tls=context) as server:
        assert server.server is not None and server.server.tls_port == server.port
        ae = AE(ae_title="ANY")
        ae.add_requested_context(Verification)
        client = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
        assoc = ae.associate(
            "127.0.0.1", server.port, ae_title="NETSCP", tls_args=(client, "localhost")
        )
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        plain = ae.associate("127.0.0.1", server.port, ae_title="NETSCP")
        assert not plain.is_established
        deadline = time.monotonic() + 5
        while server.connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connections() == 0


def test_bcp195_contexts():
    client = client_context(None)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.options & ssl.OP_NO_COMPRESSION and client.options & ssl.OP_NO_RENEGOTIATION
    suites = {c["name"] for c in client.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert suites and all("GCM" in s and ("ECDHE" in s or "DHE" in s) for s in suites), suites


# -- config --------------------------------------------------------------------------------------


def test_tls_config_mistakes_are_named(site, tmp_path):
    base = site.gw.config.read_text().split("\n[[ae_bindings]]")[0]
    cases = {
        '\n[[ae_bindings]]\ncalling_ae = "NOBODY"\ncertificate_name = "x"\n': "allowed_calling_aes does not list",
        '\n[[ae_bindings]]\ncalling_ae = "BOUND"\ncertificate_sha256 = "abc"\n': "64 hex digits",
        '\n[[ae_bindings]]\ncalling_ae = "BOUND"\naddresses = ["not-an-address"]\n': "bad address",
        '\n[[ae_bindings]]\ncalling_ae = "BOUND"\n': "bound to nothing",
    }
    for extra, problem in cases.items():
        path = tmp_path / "config.toml"
        path.write_text(base + extra)
        with pytest.raises(ConfigError, match=problem):
            load_config(path)
    path.write_text(base.replace('mode = "alongside"', 'mode = "sideways"'))
    with pytest.raises(ConfigError, match="tls.mode"):
        load_config(path)


def test_a_port_probe_is_a_closed_connection_not_a_refusal(tmp_path):
    """A load balancer's TCP check connects and closes: logged as closed, no Security Alert."""
    pki = create_test_pki(
        tmp_path / "pki", site="t", server_names=["localhost"], client_name="m.test"
    )
    context = server_context(
        pki.server_cert, pki.server_key, pki.ca_cert, require_client_certificate=True
    )
    refused: list[tuple[str, str]] = []
    with (
        captured_logs_for_test() as logs,
        NetServer(
            tmp_path,
            tls=context,
            on_tls_refused=lambda address, reason: refused.append((address, reason)),
        ) as server,
    ):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        wait_until(lambda: events(logs, "connection closed"), timeout=10, what="the probe's line")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01\x00\x05hello")  # a broken ClientHello: a refusal
            wait_until(lambda: refused, timeout=10, what="the refusal")
    (closed,) = events(logs, "connection closed")
    assert "during the TLS handshake" in closed["reason"] and closed["peer"].startswith(
        "127.0.0.1:"
    )
    (line,) = events(logs, "tls handshake refused")
    assert refused == [(line["peer"], line["reason"])]


def test_the_example_config_documents_every_tls_setting(tmp_path):
    """Uncommented, config/gateway.example.toml's [tls], [[ae_bindings]] and destination TLS
    lines load, and name every setting."""
    example = (
        Path(__file__).resolve().parent.parent / "config" / "gateway.example.toml"
    ).read_text()

    def block(start: str) -> list[str]:
        lines = example.partition(start)[2].split("\n\n")[0].splitlines()
        return [ln[2:] for ln in lines if ln.startswith("# ") and " = " in ln.split("#")[1]]

    tls, binding = block("# [tls]\n"), block("# [[ae_bindings]]\n")
    destination = [
        ln for ln in block("# [[destinations]]\n") if ln.startswith(("ae_title", "address", "tls"))
    ]
    path = tmp_path / "config.toml"
    path.write_text(
        example
        + "\n[tls]\n"
        + "\n".join(tls)
        + "\n\n[[ae_bindings]]\n"
        + "\n".join(binding)
        + "\n\n[[destinations]]\n"
        + "\n".join(destination)
        + "\n"
    )
    config = load_config(path)
    assert (
        config.tls is not None and config.tls.port == 2762 and config.tls.require_client_certificate
    )
    (bound,) = config.ae_bindings
    assert bound.calling_ae == "CT_SCANNER1" and bound.needs_tls and len(bound.addresses) == 2
    assert config.forwarding is not None and config.forwarding.destinations[0].tls is not None
    documented = {ln.split(" = ")[0] for ln in tls + binding + destination}
    settings = {
        "mode",
        "port",
        "certificate",
        "key",
        "ca_file",
        "require_client_certificate",
        "calling_ae",
        "certificate_sha256",
        "certificate_name",
        "addresses",
        "tls",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "tls_server_name",
    }
    assert settings <= documented, settings - documented


def test_tls_only_gateway_audits_refused_handshakes_and_bindings(tmp_path):
    """`init --tls-only`: gateway.port speaks TLS only; a handshake without a client certificate
    and an AE bound to another source address each reach the audit repository as a Security
    Alert (Node Authentication) naming the reason."""
    syslog = Rsyslog(tmp_path / "syslog")
    syslog.start()
    try:
        gw = GatewayProcess(tmp_path / "gw", init_args=("--tls-only",))
        keys = gw.dir / "keys" / "tls"
        with open(gw.config, "a") as f:
            f.write('\n[[ae_bindings]]\ncalling_ae = "ECHOSCU"\naddresses = ["192.0.2.7"]\n')
            f.write(syslog.atna_section("tls"))
        assert load_config(gw.config).tls.port is None  # type: ignore[union-attr]
        gw.start()
        try:
            tls = tls_opts(keys / "client.key", keys / "client.crt", keys / "ca.crt")
            stored = gw.storescu(
                *dicomdata.make_mr_series(tmp_path / "mr", 1, seed="tls-only"), options=tuple(tls)
            )
            assert stored.returncode == 0, stored.stdout + stored.stderr
            assert (
                gw.storescu(
                    *dicomdata.make_mr_series(tmp_path / "mr2", 1, seed="tls-only-2")
                ).returncode
                != 0
            )
            assert (
                dcmtk(
                    "echoscu",
                    "-aet",
                    "ECHOSCU",
                    "-aec",
                    gw.ae_title,
                    "+tla",
                    "+cf",
                    str(keys / "ca.crt"),
                    "127.0.0.1",
                    str(gw.port),
                ).returncode
                != 0
            )
            assert (
                dcmtk(
                    "echoscu",
                    "-aet",
                    "ECHOSCU",
                    "-aec",
                    gw.ae_title,
                    *tls,
                    "127.0.0.1",
                    str(gw.port),
                ).returncode
                != 0
            )

            def alerts(messages: list[dict]) -> list[str]:
                return [
                    str(x["body"])
                    for x in messages
                    if event_name(x["body"]) == "Security Alert: Node Authentication"
                ]

            messages = syslog.wait_for(
                lambda ms: len(alerts(ms)) >= 3, what="three Security Alerts"
            )
        finally:
            assert gw.stop() == 0
    finally:
        syslog.stop()
    found = alerts(messages)
    assert (
        sum(
            "TLS handshake refused on the DICOM listener" in a and "not a TLS handshake" in a
            for a in found
        )
        == 1
    )
    assert (
        sum(
            "TLS handshake refused on the DICOM listener" in a
            and "did not return a certificate" in a
            for a in found
        )
        == 1
    )
    assert sum("other source addresses than 127.0.0.1" in a for a in found) == 1
    assert (
        len(log_events(gw, "tls handshake refused")) == 2
        and len(log_events(gw, "association refused")) == 1
    )
