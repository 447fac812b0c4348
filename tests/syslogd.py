"""A real syslog daemon for the tests: Debian's rsyslog, started on loopback with its own config,
pid file and work directory, a TLS listener (RFC 5425, gtls driver, client certificates
required) and a UDP listener (RFC 5426), each writing every message as received (``%rawmsg%``,
one per line) to its own file. ``scripts/test`` installs rsyslog and rsyslog-gnutls.

    with Rsyslog(tmp_path / "syslog") as syslog:
        ... gateway config: syslog.atna_section() ...
        syslog.wait_for(lambda ms: len(ms) >= 3)
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.atna_schema import parse_syslog
from tests.conftest import free_port


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_test_pki(directory: Path) -> None:
    """ca.pem; server.pem/.key (localhost, 127.0.0.1) for rsyslog; client.pem/.key for the gateway."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("dicomledger test audit CA"))
        .issuer_name(_name("dicomledger test audit CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, cn in (("server", "localhost"), ("client", "gateway.test")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(cn), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


CONFIG = """\
global(workDirectory="{work}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{pki}/ca.pem"
       defaultNetstreamDriverCertFile="{pki}/server.pem"
       defaultNetstreamDriverKeyFile="{pki}/server.key")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="tls") {{ action(type="omfile" file="{out}/tls.log" template="raw") }}
ruleset(name="udp") {{ action(type="omfile" file="{out}/udp.log" template="raw") }}
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{tls_port}" ruleset="tls")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="udp")
"""


class Rsyslog:
    def __init__(self, directory: Path) -> None:
        if shutil.which("rsyslogd") is None:
            pytest.fail(
                "rsyslogd not installed: run ./scripts/test, which installs rsyslog and rsyslog-gnutls"
            )
        self.dir = directory
        self.pki = directory / "pki"
        make_test_pki(self.pki)
        self.tls_port = free_port()
        self.udp_port = free_udp_port()
        (directory / "work").mkdir()
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(
            CONFIG.format(
                work=directory / "work",
                pki=self.pki,
                out=directory,
                tls_port=self.tls_port,
                udp_port=self.udp_port,
            )
        )
        self.proc: subprocess.Popen | None = None

    def atna_section(self, transport: str = "tls", **extra: object) -> str:
        """A gateway's [atna] section sending to this daemon (retries fast, for the tests)."""
        port = self.tls_port if transport == "tls" else self.udp_port
        settings = {
            "enabled": True,
            "repository": f"127.0.0.1:{port}",
            "transport": transport,
            "tls_ca": str(self.pki / "ca.pem"),
            "tls_cert": str(self.pki / "client.pem"),
            "tls_key": str(self.pki / "client.key"),
            "tls_server_name": "localhost",
            "retry_initial": 0.2,
            "retry_max": 0.5,
            "transfer_window": 0.3,
            **extra,
        }
        lines = ["", "[atna]"]
        for key, value in settings.items():
            text = (
                "true"
                if value is True
                else "false"
                if value is False
                else (f'"{value}"' if isinstance(value, str) else str(value))
            )
            lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.log = open(self.dir / "rsyslogd.out", "ab")
        self.proc = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {(self.dir / 'rsyslogd.out').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("rsyslogd did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def __enter__(self) -> Rsyslog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def raw(self, transport: str = "tls") -> list[bytes]:
        path = self.dir / f"{transport}.log"
        if not path.exists():
            return []
        return [line for line in path.read_bytes().split(b"\n") if line]

    def messages(self, transport: str = "tls") -> list[dict[str, object]]:
        """Every message received so far, parsed (RFC 5424 checked on the way)."""
        return [parse_syslog(line) for line in self.raw(transport)]

    def wait_for(
        self,
        condition: Callable[[list[dict[str, object]]], bool],
        transport: str = "tls",
        timeout: float = 30.0,
        what: str = "",
    ) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(transport)
            if condition(found):
                return found
            if time.monotonic() > deadline:
                events = [event_name(m["body"]) for m in found]  # type: ignore[arg-type]
                raise AssertionError(f"timed out waiting for {what}; received: {events}")
            time.sleep(0.1)


def event_name(body: bytes) -> str:
    """The EventID meaning (and event type) of an audit message body, for messages and filters."""
    from xml.etree import ElementTree as ET

    root = ET.fromstring(body)
    event = root.find("EventIdentification")
    assert event is not None
    name = event.find("EventID").get("originalText")  # type: ignore[union-attr]
    types = [t.get("originalText") for t in event.findall("EventTypeCode")]
    return f"{name}: {', '.join(types)}" if types else str(name)
