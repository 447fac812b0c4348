"""The authenticated, encrypted channel between gateways: mutual TLS with pinned certificates.

Each gateway has a self-signed TLS certificate made by `dicomledger init`. A gateway trusts
exactly the certificates of the peers in its config (and presents its own), so a peer not
in the config cannot connect, and we cannot be talked into connecting to an impostor.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def create_tls_identity(cert_path: Path, key_path: Path, name: str) -> None:
    """A new P-256 key (0600) and a self-signed certificate naming ``name``, valid 10 years."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dicomledger-peer")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, hex: how we recognise which peer connected."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprint(pem: bytes) -> str:
    return fingerprint(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))


def _context(purpose: ssl.Purpose, cert: Path, key: Path, peer_certs: list[bytes]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = False  # identity is the pinned certificate, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    if peer_certs:
        ctx.load_verify_locations(cadata="".join(p.decode() for p in peer_certs))
    return ctx


def server_context(cert: Path, key: Path, peer_certs: list[bytes]) -> ssl.SSLContext:
    """Requires a client certificate that is one of ``peer_certs``."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, peer_certs)


def client_context(cert: Path, key: Path, peer_certs: list[bytes]) -> ssl.SSLContext:
    """Presents our certificate; accepts only a server certificate among ``peer_certs``."""
    return _context(ssl.Purpose.SERVER_AUTH, cert, key, peer_certs)
