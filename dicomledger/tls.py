"""The config's TLS settings made into ``ssl.SSLContext`` objects (built by
``dicomledger.dicom.net.tls``): the listener's, and one per TLS destination, shared by
forwarding and C-MOVE. Unreadable or mismatched files raise ``TlsSetupError`` naming them."""

from __future__ import annotations

import ssl
from functools import cache

from dicomledger.common.errors import ConfigurationError
from dicomledger.config import DestinationConfig, TlsConfig
from dicomledger.dicom.net.tls import client_context, server_context


class TlsSetupError(ConfigurationError, ValueError):
    """A certificate, key or CA file of the TLS config cannot be used; str() names it."""


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason.replace("_", " ").lower() if exc.reason else str(exc)
    return exc.strerror or str(exc)


def listener_context(tls: TlsConfig) -> ssl.SSLContext:
    try:
        return server_context(tls.certificate, tls.key, tls.ca_file, tls.require_client_certificate)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"[tls] certificate {tls.certificate}, key {tls.key} or ca_file {tls.ca_file} "
            f"cannot be used: {_why(exc)}"
        ) from None


@cache  # one context per destination: its session cache and loaded files are reused
def destination_context(dest: DestinationConfig) -> ssl.SSLContext | None:
    """None for a plain-TCP destination."""
    if dest.tls is None:
        return None
    t = dest.tls
    try:
        return client_context(t.ca_file, t.certificate, t.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"destination {dest.ae_title}: tls_ca {t.ca_file}, tls_cert {t.certificate} or "
            f"tls_key {t.key} cannot be used: {_why(exc)}"
        ) from None
