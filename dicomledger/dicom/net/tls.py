"""DICOM TLS (PS3.15 Annex B, the BCP 195 profile): the ``ssl.SSLContext`` objects of the
listener and of our associations to destinations, what a verified client certificate says,
and the per-AE binding of a calling AE title to a certificate and source addresses.

BCP 195 (RFC 7525/9325): TLS 1.2 or later, the AEAD ECDHE/DHE suites with forward secrecy,
no TLS compression, no renegotiation. TLS 1.3's suites are all AEAD and stay enabled.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    )
    return context


def server_context(
    certificate: Path, key: Path, ca_file: Path | None, require_client_certificate: bool
) -> ssl.SSLContext:
    """The listener's context: presents ``certificate``; client certificates are checked against
    ``ca_file`` (required, or only checked when one is sent). Raises OSError/ssl.SSLError on
    unreadable or mismatched files."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(certificate, key)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(
    ca_file: Path | None,
    certificate: Path | None = None,
    key: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """Our context towards a destination: its certificate must chain to ``ca_file`` (None: the
    system's CAs); ``certificate``/``key``: ours, for destinations that require one."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs()
    if certificate is not None:
        context.load_cert_chain(certificate, key)
    context.check_hostname = check_hostname
    return context


def handshake_failure(exc: BaseException) -> str:
    """One short reason for a failed handshake (no traceback), e.g. 'certificate verify failed:
    unable to get local issuer certificate' or 'peer did not return a certificate'."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason in (
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "UNKNOWN_PROTOCOL",
    ):
        return f"not a TLS handshake: plain TCP on the TLS port? ({exc.reason.replace('_', ' ').lower()})"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc) or type(exc).__name__


def normalise_fingerprint(text: str) -> str:
    """'AB:CD:...' (as ``openssl x509 -fingerprint -sha256`` prints it) or 'abcd...' -> 'abcd...'."""
    return text.replace(":", "").strip().lower()


@dataclass(frozen=True)
class TlsPeer:
    """The verified certificate a client presented."""

    sha256: str  # fingerprint of the DER certificate, lower-case hex
    names: frozenset[str]  # subject common names and DNS / IP subject alternative names


def tls_peer(ssl_object: Any) -> TlsPeer | None:
    """What the handshake on ``ssl_object`` verified; None without a client certificate."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    parsed = ssl_object.getpeercert() or {}  # filled only for a certificate that was verified
    names = {
        value for rdn in parsed.get("subject", ()) for key, value in rdn if key == "commonName"
    }
    names |= {
        value for kind, value in parsed.get("subjectAltName", ()) if kind in ("DNS", "IP Address")
    }
    return TlsPeer(hashlib.sha256(der).hexdigest(), frozenset(names))


@dataclass(frozen=True)
class AeBinding:
    """A calling AE title bound to a certificate and/or source addresses: an association that
    claims it is refused unless it came the way bound here."""

    calling_ae: str
    certificate_sha256: frozenset[str] = frozenset()  # pinned fingerprints (any of them)
    certificate_names: frozenset[str] = frozenset()  # CN or SAN the certificate must carry (any)
    addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # source networks

    @property
    def needs_tls(self) -> bool:
        return bool(self.certificate_sha256 or self.certificate_names)

    def refusal(self, peer: TlsPeer | None, tls: bool, host: str) -> str | None:
        """Why an association from ``host`` (over TLS or not, with ``peer``'s certificate) may
        not use this AE title; None if it may."""
        if self.needs_tls:
            if not tls:
                return f"calling AE {self.calling_ae} is bound to a certificate and came over plain TCP"
            if peer is None:
                return (
                    f"calling AE {self.calling_ae} is bound to a certificate and none was presented"
                )
            if self.certificate_sha256 and peer.sha256 not in self.certificate_sha256:
                return (
                    f"calling AE {self.calling_ae} came with another certificate "
                    f"(sha256 {peer.sha256[:16]}..., not the one pinned)"
                )
            if self.certificate_names and not self.certificate_names & peer.names:
                return (
                    f"calling AE {self.calling_ae} came with a certificate for "
                    f"{', '.join(sorted(peer.names)) or 'no name'}, not for {', '.join(sorted(self.certificate_names))}"
                )
        if self.addresses:
            try:
                source = ipaddress.ip_address(host)
            except ValueError:
                return f"calling AE {self.calling_ae} is bound to source addresses; {host} is not an IP address"
            if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
                source = (
                    source.ipv4_mapped
                )  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
            if not any(source in network for network in self.addresses):
                return (
                    f"calling AE {self.calling_ae} is bound to other source addresses than {host}"
                )
        return None


def networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """'192.0.2.10' or '192.0.2.0/24' -> networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)
