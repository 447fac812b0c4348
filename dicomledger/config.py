"""Load and validate a gateway's TOML config into typed objects; one clear error per mistake.

Relative paths in the file are relative to the directory holding the file, so a gateway
directory made by ``dicomledger init`` can be moved as a whole.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomledger.common.errors import ConfigurationError
from dicomledger.dicom.net.tls import AeBinding, networks, normalise_fingerprint
from dicomledger.ledger.note import NoteError, parse_verifier_key
from dicomledger.ledger.policy import PolicyError, WitnessPolicy, parse_policy

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no controls


_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


class ConfigError(ConfigurationError, ValueError):
    """A config mistake; str() is one line naming the file, the key and the fix."""


@dataclass(frozen=True)
class GatewayConfig:
    ae_title: str
    host: str
    port: int
    allowed_calling_aes: tuple[str, ...]  # "*" admits any calling AE
    max_associations: int
    max_pdu_size: int  # 0 = unlimited
    accept_unknown_sop_classes: bool
    network_timeout: float
    # Largest size a Deflated Explicit VR dataset may inflate to (bytes); beyond it: 0xC000
    max_inflated_size: int = 512 * 2**20

    def allows(self, calling_ae: str) -> bool:
        return "*" in self.allowed_calling_aes or calling_ae in self.allowed_calling_aes


@dataclass(frozen=True)
class LedgerConfig:
    origin: str
    key_file: Path
    database: Path
    checkpoint_interval: float


@dataclass(frozen=True)
class StorageConfig:
    directory: Path
    index: Path
    # Erasure requests seen, scrub passes and findings (holds SOP Instance UIDs; stays local).
    lifecycle: Path | None = None


@dataclass(frozen=True)
class PeerConfig:
    origin: str  # the peer's log origin, also its signed-note key name
    host: str
    port: int
    public_key: Ed25519PublicKey  # from its verifier key (vkey)
    tls_cert: bytes  # its pinned TLS certificate (PEM)


@dataclass(frozen=True)
class WitnessConfig:
    """A standard C2SP tlog-witness outside the consortium, asked to cosign our checkpoints."""

    name: str  # its cosigner name (the name in its vkey)
    url: str  # its submission prefix: add-checkpoint is POSTed to url + "/add-checkpoint"
    public_key: Ed25519PublicKey  # from its vkey (type 0x04 as witnesses publish it, or 0x01)
    tls_cert: bytes | None = None  # pinned certificate (PEM); None: the system's CAs
    # At most one request per interval seconds (the newest checkpoint then): public witnesses
    # budget each log's requests per day.
    interval: float = 60.0


@dataclass(frozen=True)
class PeeringConfig:
    host: str
    port: int
    tls_cert: Path
    tls_key: Path
    gossip_interval: float
    fanout: int
    max_message_bytes: int
    peers: tuple[PeerConfig, ...]
    # Seconds after which a witness's cosignature on our (unchanged) checkpoint is renewed.
    heartbeat_interval: float = 60.0
    # Longest pause, in seconds, before pulling again from a peer whose entries did not verify.
    backoff_max: float = 300.0
    witnesses: tuple[WitnessConfig, ...] = ()
    # Seconds a start waits for a peer to confirm this gateway's own log (and hand back any
    # entries it lost, e.g. to a restore) before it refuses to start without --accept-local-tip.
    startup_wait: float = 60.0
    # The consortium's witness policy (C2SP tlog-policy): which gateways' signatures make a
    # quorum for a key-replacement statement; peers must hold the same one.
    witness_policy: WitnessPolicy | None = None


@dataclass(frozen=True)
class PermissionsConfig:
    # A gateway whose log anchored images of a patient may sign grants and revocations for
    # that patient with its own key (the custodian).
    custodian_may_sign: bool = True
    # Consent authorities trusted consortium-wide: issuer name -> public key (from vkeys).
    authorities: tuple[tuple[str, Ed25519PublicKey], ...] = ()
    # Issuer keys this gateway holds and may sign with (`grant --issuer NAME`): name -> key file.
    issuer_keys: tuple[tuple[str, Path], ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS on our listener (PS3.15 Annex B)."""

    certificate: Path  # ours (PEM), with its chain
    key: Path
    ca_file: Path | None  # CAs that vouch for client certificates (None: none asked for)
    require_client_certificate: bool
    port: (
        int | None
    )  # a TLS port alongside plain TCP on gateway.port; None: gateway.port is TLS only


@dataclass(frozen=True)
class DestinationTls:
    """How we open TLS to a forwarding / C-MOVE destination."""

    ca_file: Path | None  # CAs that vouch for its certificate (None: the system's)
    certificate: Path | None  # ours, if it asks for a client certificate
    key: Path | None
    server_name: str  # the name (or address) its certificate must carry


@dataclass(frozen=True)
class DestinationConfig:
    ae_title: str
    host: str
    port: int
    site: str | None  # the gateway origin this AE belongs to (grants "AE@site", "@site")
    concurrency: int  # parallel associations to it
    tls: DestinationTls | None = None  # None: plain TCP


@dataclass(frozen=True)
class RouteConfig:
    to: tuple[str, ...]  # destination AE titles
    calling_aes: tuple[str, ...] = ()  # empty: any
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()

    def matches(self, calling_ae: str, modality: str | None, sop_class: str) -> bool:
        return (
            (not self.calling_aes or calling_ae in self.calling_aes)
            and (not self.modalities or (modality or "") in self.modalities)
            and (not self.sop_classes or sop_class in self.sop_classes)
        )


@dataclass(frozen=True)
class ForwardingConfig:
    queue: Path  # SQLite file of the durable forward queue
    calling_ae: str  # our AE title towards destinations
    max_attempts: int  # then the job is parked as failed
    retry_initial: float  # seconds; doubles per attempt up to retry_max
    retry_max: float
    destinations: tuple[DestinationConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    def destination(self, ae_title: str) -> DestinationConfig | None:
        return next((d for d in self.destinations if d.ae_title == ae_title), None)


@dataclass(frozen=True)
class AtnaConfig:
    """The ATNA audit trail: DICOM audit messages (PS3.15 A.5) to the hospital's audit
    repository over syslog, TLS (RFC 5425) or UDP (RFC 5426), through a durable queue."""

    host: str
    port: int
    transport: str  # "tls" or "udp"
    tls_ca: Path | None  # CA certificates that vouch for the repository (None: the system's)
    tls_cert: Path | None  # our client certificate (mutual node authentication)
    tls_key: Path | None
    tls_server_name: str  # the name the repository's certificate must carry
    queue: Path  # SQLite file of the durable message queue (holds PHI: private)
    max_queued: int  # messages; beyond it new ones are dropped, counted and reported
    retry_initial: float  # seconds; doubles per failed attempt up to retry_max
    retry_max: float
    source_id: str  # AuditSourceID
    enterprise_site: str | None  # AuditEnterpriseSiteID
    hostname: str | None  # syslog HOSTNAME; None: this machine's name
    transfer_window: float  # seconds a study's received instances gather into one message


@dataclass(frozen=True)
class ErasureConfig:
    # Gateways whose `erased` entries this gateway applies to the copies it holds of the
    # instances they anchored (received from them by forwarding); others are shown in status.
    honour_from: tuple[str, ...] = ()
    # Seconds between looks for erasures that arrived by replication.
    poll_interval: float = 2.0


@dataclass(frozen=True)
class RetentionRule:
    keep_years: int
    modalities: tuple[str, ...] = ()  # empty: every study


@dataclass(frozen=True)
class RetentionConfig:
    rules: tuple[RetentionRule, ...] = ()  # none: nothing is ever erased by age
    # Hours between automatic runs of the policy; 0: only `dicomledger retention`.
    check_interval_hours: float = 24.0


@dataclass(frozen=True)
class ScrubConfig:
    enabled: bool = True
    max_rate_mb_s: float = 20.0  # read budget of the background scrub (MB = 10^6 bytes)
    full_pass_days: float = 7.0  # a background pass starts this long after the last one started


@dataclass(frozen=True)
class MetricsConfig:
    """The local HTTP endpoint for operations: Prometheus /metrics, /healthz, /readyz."""

    host: str
    port: int
    # /readyz fails when entries have waited longer than this for a signed checkpoint
    checkpoint_stale_after: float


@dataclass(frozen=True)
class CommitmentRequestor:
    """Where a Storage Commitment requestor takes its N-EVENT-REPORT on a new association."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class StorageCommitmentConfig:
    enabled: bool = True
    # Each requestor's address for reports its own association no longer can carry (it closed)
    requestors: tuple[CommitmentRequestor, ...] = ()
    report_timeout: float = (
        30.0  # seconds for the requestor to answer the N-EVENT-REPORT (and to connect)
    )

    def requestor(self, ae_title: str) -> CommitmentRequestor | None:
        return next((r for r in self.requestors if r.ae_title == ae_title), None)


@dataclass(frozen=True)
class Config:
    path: Path
    gateway: GatewayConfig
    ledger: LedgerConfig
    storage: StorageConfig
    pseudonym_secret_file: Path
    log_level: str
    peering: PeeringConfig | None = None
    permissions: PermissionsConfig = PermissionsConfig()
    forwarding: ForwardingConfig | None = None
    admin_socket: Path | None = None  # local admin interface (grant, revoke, permissions)
    atna: AtnaConfig | None = None  # None: no audit messages (the default)
    erasure: ErasureConfig = ErasureConfig()
    retention: RetentionConfig = RetentionConfig()
    scrub: ScrubConfig = ScrubConfig()
    metrics: MetricsConfig | None = None  # None: no HTTP endpoint (the default)
    storage_commitment: StorageCommitmentConfig = StorageCommitmentConfig()
    tls: TlsConfig | None = None  # None: no TLS listener
    ae_bindings: tuple[AeBinding, ...] = ()  # calling AEs bound to a certificate / source addresses

    @property
    def lifecycle_db(self) -> Path:
        return self.storage.lifecycle or self.storage.index.with_name("lifecycle.db")

    def pseudonym_secret(self) -> bytes:
        try:
            secret = self.pseudonym_secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: pseudonyms.secret_file {self.pseudonym_secret_file} cannot be read "
                f"({exc.strerror}); create it with `dicomledger init` or copy the consortium's secret there"
            ) from None
        if len(secret) < 32:
            raise ConfigError(
                f"{self.path}: pseudonyms.secret_file {self.pseudonym_secret_file} holds "
                f"{len(secret)} bytes; the consortium secret must be at least 32 bytes"
            )
        return secret


class _Section:
    """Typed access to one TOML table; every failure names file, key and fix."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        self.path, self.name = path, name
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def _fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.name}.{key} {problem}")

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self._fail(key, f"is missing; add `{key} = ...` under [{self.name}]")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self._fail(key, f"must be {_KIND_NAMES[kind]}, got {value!r}")
        return value

    def int_in(self, key: str, low: int, high: int, default: Any = ...) -> int:
        value: int = self.get(key, int, default)
        if not low <= value <= high:
            raise self._fail(key, f"must be between {low} and {high}, got {value}")
        return value

    def path_(self, key: str, default: Any = ...) -> Path:
        value = Path(self.get(key, str, default))
        return value if value.is_absolute() else self.path.parent / value

    def ae_title(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not AE_TITLE_RE.match(value) or not value.strip():
            raise self._fail(
                key,
                f"has {value!r}, not a valid AE title (1-16 printable characters, no backslash)",
            )
        return value.strip()

    def done(self) -> None:
        unknown = set(self.data) - self.used
        if unknown:
            raise self._fail(sorted(unknown)[0], "is not a known setting; check the spelling")


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found; create one with `dicomledger init --dir DIR`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    known = {
        "gateway",
        "ledger",
        "storage",
        "pseudonyms",
        "logging",
        "peering",
        "peers",
        "witnesses",
        "permissions",
        "forwarding",
        "destinations",
        "routes",
        "atna",
        "erasure",
        "retention",
        "scrub",
        "metrics",
        "storage_commitment",
        "commitment_requestors",
        "tls",
        "ae_bindings",
    }
    for table in raw:
        if table not in known:
            raise ConfigError(
                f"{path}: [{table}] is not a known section; known: {', '.join(sorted(known))}"
            )

    g = _Section(path, "gateway", raw.get("gateway"))
    allowed = g.get("allowed_calling_aes", list)
    if not allowed:
        raise g._fail(
            "allowed_calling_aes", 'is empty, so nobody could connect; list AE titles or "*"'
        )
    gateway = GatewayConfig(
        ae_title=g.ae_title("ae_title", g.get("ae_title", str)),
        host=g.get("host", str, "127.0.0.1"),
        port=g.int_in("port", 1, 65535),
        allowed_calling_aes=tuple(
            a if a == "*" else g.ae_title("allowed_calling_aes", a) for a in allowed
        ),
        max_associations=g.int_in("max_associations", 1, 10000, 64),
        max_pdu_size=g.int_in("max_pdu_size", 0, 2**32 - 1, 0),
        accept_unknown_sop_classes=g.get("accept_unknown_sop_classes", bool, False),
        network_timeout=g.get("network_timeout", float, 60.0),
        max_inflated_size=g.int_in("max_inflated_size", 1024, 2**42, 512 * 2**20),
    )
    admin_socket = g.path_("admin_socket", "data/admin.sock")
    if len(str(admin_socket)) > 100:  # AF_UNIX paths are limited to 108 bytes
        raise g._fail(
            "admin_socket", f"path {admin_socket} is too long for a Unix socket; use a shorter one"
        )
    g.done()

    lg = _Section(path, "ledger", raw.get("ledger"))
    origin = lg.get("origin", str)
    if not origin or any(c.isspace() or c == "+" for c in origin):
        raise lg._fail(
            "origin",
            f"is {origin!r}; use a name like hospital-a.example/dicomledger (no spaces or '+')",
        )
    checkpoint_interval = lg.get("checkpoint_interval", float, 1.0)
    if checkpoint_interval <= 0:
        raise lg._fail(
            "checkpoint_interval", f"must be positive seconds, got {checkpoint_interval}"
        )
    ledger = LedgerConfig(
        origin=origin,
        key_file=lg.path_("key_file"),
        database=lg.path_("database"),
        checkpoint_interval=checkpoint_interval,
    )
    lg.done()

    st = _Section(path, "storage", raw.get("storage"))
    storage = StorageConfig(
        directory=st.path_("directory"),
        index=st.path_("index"),
        lifecycle=st.path_("lifecycle") if "lifecycle" in st.data else None,
    )
    st.done()

    ps = _Section(path, "pseudonyms", raw.get("pseudonyms"))
    secret_file = ps.path_("secret_file")
    ps.done()

    lo = _Section(path, "logging", raw.get("logging"))
    level = lo.get("level", str, "info").lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise lo._fail("level", f"is {level!r}; use debug, info, warning or error")
    lo.done()

    tls = _tls(path, raw, gateway.port)
    return Config(
        path,
        gateway,
        ledger,
        storage,
        secret_file,
        level,
        _peering(path, raw, ledger.origin),
        permissions=_permissions(path, raw),
        forwarding=_forwarding(path, raw, gateway.ae_title),
        admin_socket=admin_socket,
        atna=_atna(path, raw, ledger.origin),
        erasure=_erasure(path, raw),
        retention=_retention(path, raw),
        scrub=_scrub(path, raw),
        tls=tls,
        ae_bindings=_ae_bindings(path, raw, gateway, tls),
        metrics=_metrics(path, raw, ledger.checkpoint_interval, gateway.port),
        storage_commitment=_storage_commitment(path, raw),
    )


def _metrics(
    path: Path, raw: dict[str, Any], checkpoint_interval: float, dicom_port: int
) -> MetricsConfig | None:
    sec = _Section(path, "metrics", raw.get("metrics"))
    enabled = sec.get("enabled", bool, False)
    config = MetricsConfig(
        host=sec.get("host", str, "127.0.0.1"),
        port=sec.int_in("port", 0, 65535, 9112),
        checkpoint_stale_after=_positive(
            sec, "checkpoint_stale_after", max(60.0, 10 * checkpoint_interval)
        ),
    )
    sec.done()
    if enabled and config.port == dicom_port and config.port != 0:
        raise sec._fail(
            "port",
            f"is the DICOM port ({dicom_port}); the metrics endpoint needs a port of its own",
        )
    if config.checkpoint_stale_after < checkpoint_interval:
        raise sec._fail(
            "checkpoint_stale_after",
            f"must be at least ledger.checkpoint_interval ({checkpoint_interval:g} s)",
        )
    return config if enabled else None


def _storage_commitment(path: Path, raw: dict[str, Any]) -> StorageCommitmentConfig:
    sec = _Section(path, "storage_commitment", raw.get("storage_commitment"))
    enabled = sec.get("enabled", bool, True)
    timeout = _positive(sec, "report_timeout", 30.0)
    sec.done()
    requestors = []
    for i, item in enumerate(_tables(path, raw, "commitment_requestors")):
        req = _Section(path, f"commitment_requestors[{i}]", item)
        host, _, port = req.get("address", str).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise req._fail(
                "address",
                "must be host:port of the requestor's own DICOM listener, e.g. 192.0.2.40:104",
            )
        requestors.append(
            CommitmentRequestor(
                req.ae_title("ae_title", req.get("ae_title", str)), host.strip("[]"), int(port)
            )
        )
        req.done()
    if len({r.ae_title for r in requestors}) != len(requestors):
        raise ConfigError(
            f"{path}: the same ae_title is listed twice under [[commitment_requestors]]"
        )
    return StorageCommitmentConfig(
        enabled=enabled, requestors=tuple(requestors), report_timeout=timeout
    )


def _tls(path: Path, raw: dict[str, Any], plain_port: int) -> TlsConfig | None:
    if "tls" not in raw:
        return None
    t = _Section(path, "tls", raw.get("tls"))
    mode = t.get("mode", str, "alongside")
    if mode not in ("alongside", "only"):
        raise t._fail(
            "mode",
            f'is {mode!r}; use "alongside" (TLS on tls.port and plain TCP on gateway.port) '
            'or "only" (gateway.port speaks TLS only)',
        )
    port = t.int_in("port", 1, 65535) if mode == "alongside" else None
    if mode == "only" and "port" in t.data:
        raise t._fail(
            "port", 'is for mode = "alongside"; with mode = "only" TLS is served on gateway.port'
        )
    if port == plain_port:
        raise t._fail("port", f'is gateway.port ({port}); choose another port or set mode = "only"')
    ca_file = t.path_("ca_file") if t.get("ca_file", str, None) else None
    require = t.get("require_client_certificate", bool, True)
    if require and ca_file is None:
        raise t._fail(
            "ca_file",
            "is missing, and require_client_certificate is true: name the CA file that "
            "vouches for client certificates, or set require_client_certificate = false",
        )
    config = TlsConfig(
        certificate=t.path_("certificate"),
        key=t.path_("key"),
        ca_file=ca_file,
        require_client_certificate=require,
        port=port,
    )
    t.done()
    return config


def _ae_bindings(
    path: Path, raw: dict[str, Any], gateway: GatewayConfig, tls: TlsConfig | None
) -> tuple[AeBinding, ...]:
    bindings: list[AeBinding] = []
    for i, item in enumerate(_tables(path, raw, "ae_bindings")):
        sec = _Section(path, f"ae_bindings[{i}]", item)
        calling_ae = sec.ae_title("calling_ae", sec.get("calling_ae", str))
        if not gateway.allows(calling_ae):
            raise sec._fail(
                "calling_ae", f"is {calling_ae!r}, which gateway.allowed_calling_aes does not list"
            )
        if calling_ae in (b.calling_ae for b in bindings):
            raise sec._fail(
                "calling_ae",
                f"binds {calling_ae!r} a second time; one [[ae_bindings]] per AE title",
            )
        fingerprints = frozenset(
            normalise_fingerprint(f) for f in _strings(sec, "certificate_sha256")
        )
        if any(len(f) != 64 or not all(c in "0123456789abcdef" for c in f) for f in fingerprints):
            raise sec._fail(
                "certificate_sha256",
                "must be SHA-256 fingerprints (64 hex digits, colons allowed), "
                "as `openssl x509 -noout -fingerprint -sha256 -in CERT` prints them",
            )
        try:
            addresses = networks(_strings(sec, "addresses"))
        except ValueError as exc:
            raise sec._fail("addresses", f"has a bad address or network ({exc})") from None
        binding = AeBinding(
            calling_ae, fingerprints, frozenset(_strings(sec, "certificate_name")), addresses
        )
        if not binding.needs_tls and not addresses:
            raise sec._fail(
                "calling_ae",
                "is bound to nothing; add certificate_sha256, certificate_name or addresses",
            )
        if binding.needs_tls and (tls is None or tls.ca_file is None):
            raise sec._fail(
                "calling_ae",
                "is bound to a certificate, but no [tls] section with a ca_file "
                "checks client certificates",
            )
        bindings.append(binding)
        sec.done()
    return tuple(bindings)


def _atna(path: Path, raw: dict[str, Any], origin: str) -> AtnaConfig | None:
    if "atna" not in raw:
        return None
    at = _Section(path, "atna", raw["atna"])
    enabled = at.get("enabled", bool, False)
    repository = at.get("repository", str, ... if enabled else "")
    transport = at.get("transport", str, "tls")
    if transport not in ("tls", "udp"):
        raise at._fail("transport", f'is {transport!r}; use "tls" (RFC 5425) or "udp" (RFC 5426)')
    host, _, port = repository.rpartition(":")
    if enabled and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        raise at._fail(
            "repository",
            "must be host:port of the audit repository's syslog, e.g. audit.example:6514",
        )
    optional = {
        key: at.path_(key) if at.get(key, str, None) else None
        for key in ("tls_ca", "tls_cert", "tls_key")
    }
    if (optional["tls_cert"] is None) != (optional["tls_key"] is None):
        raise at._fail(
            "tls_cert",
            "and tls_key go together: set both (our client certificate and its key) or neither",
        )
    for key, file in optional.items():
        if enabled and transport == "tls" and file is not None and not file.is_file():
            raise at._fail(key, f"{file} is not a readable file")
    config = AtnaConfig(
        host=host.strip("[]"),
        port=int(port) if port.isdigit() else 0,
        transport=transport,
        tls_ca=optional["tls_ca"],
        tls_cert=optional["tls_cert"],
        tls_key=optional["tls_key"],
        tls_server_name=at.get("tls_server_name", str, host.strip("[]")),
        queue=at.path_("queue", "data/atna.db"),
        max_queued=at.int_in("max_queued", 1, 10**9, 100_000),
        retry_initial=at.get("retry_initial", float, 1.0),
        retry_max=at.get("retry_max", float, 60.0),
        source_id=at.get("source_id", str, origin),
        enterprise_site=at.get("enterprise_site", str, None),
        hostname=at.get("hostname", str, None),
        transfer_window=at.get("transfer_window", float, 2.0),
    )
    at.done()
    if not 0 < config.retry_initial <= config.retry_max:
        raise at._fail("retry_initial", "must be positive seconds and at most retry_max")
    if not 0 <= config.transfer_window <= 3600:
        raise at._fail("transfer_window", "must be between 0 and 3600 seconds")
    if not config.source_id.strip():
        raise at._fail(
            "source_id", "is empty; name this gateway as the audit repository should know it"
        )
    return config if enabled else None


def _positive(sec: _Section, key: str, default: float, zero_ok: bool = False) -> float:
    value: float = sec.get(key, float, default)
    if value < 0 or (value == 0 and not zero_ok):
        raise sec._fail(
            key, f"must be {'zero or more' if zero_ok else 'a positive number'}, got {value}"
        )
    return value


def _erasure(path: Path, raw: dict[str, Any]) -> ErasureConfig:
    sec = _Section(path, "erasure", raw.get("erasure"))
    honour = sec.get("honour_from", list, [])
    for origin in honour:
        if (
            not isinstance(origin, str)
            or not origin
            or any(c.isspace() or c == "+" for c in origin)
        ):
            raise sec._fail(
                "honour_from",
                f"has {origin!r}; list gateway origins such as hospital-a.example/dicomledger",
            )
    config = ErasureConfig(
        honour_from=tuple(honour), poll_interval=_positive(sec, "poll_interval", 2.0)
    )
    sec.done()
    return config


def _retention(path: Path, raw: dict[str, Any]) -> RetentionConfig:
    sec = _Section(path, "retention", raw.get("retention"))
    rules = []
    for i, item in enumerate(sec.get("rules", list, [])):
        rule = _Section(path, f"retention.rules[{i}]", item)
        rules.append(
            RetentionRule(
                keep_years=rule.int_in("keep_years", 1, 200),
                modalities=_strings(rule, "modality"),
            )
        )
        rule.done()
    config = RetentionConfig(
        rules=tuple(rules),
        check_interval_hours=_positive(sec, "check_interval_hours", 24.0, zero_ok=True),
    )
    sec.done()
    return config


def _scrub(path: Path, raw: dict[str, Any]) -> ScrubConfig:
    sec = _Section(path, "scrub", raw.get("scrub"))
    config = ScrubConfig(
        enabled=sec.get("enabled", bool, True),
        max_rate_mb_s=_positive(sec, "max_rate_mb_s", 20.0),
        full_pass_days=_positive(sec, "full_pass_days", 7.0),
    )
    sec.done()
    return config


def _permissions(path: Path, raw: dict[str, Any]) -> PermissionsConfig:
    pm = _Section(path, "permissions", raw.get("permissions"))
    authorities = []
    for vkey in pm.get("authorities", list, []):
        try:
            if not isinstance(vkey, str):
                raise NoteError("not a string")
            authorities.append(parse_verifier_key(vkey))
        except NoteError as exc:
            raise pm._fail("authorities", f"has {vkey!r}, not a verifier key ({exc})") from None
    keys_raw = pm.get("issuer_keys", dict, {})
    issuer_keys = []
    for name, file in keys_raw.items():
        if not isinstance(file, str):
            raise pm._fail("issuer_keys", f"{name} must be the path of a key file")
        key_path = Path(file) if Path(file).is_absolute() else path.parent / file
        issuer_keys.append((name, key_path))
    config = PermissionsConfig(
        custodian_may_sign=pm.get("custodian_may_sign", bool, True),
        authorities=tuple(authorities),
        issuer_keys=tuple(issuer_keys),
    )
    pm.done()
    return config


def _strings(sec: _Section, key: str) -> tuple[str, ...]:
    value = sec.get(key, object, [])  # a string or a list of strings
    items = [value] if isinstance(value, str) else value
    if not all(isinstance(v, str) and v for v in items):
        raise sec._fail(key, "must be a string or a list of non-empty strings")
    return tuple(items)


def _forwarding(path: Path, raw: dict[str, Any], own_ae: str) -> ForwardingConfig | None:
    if not raw.get("destinations") and not raw.get("routes") and "forwarding" not in raw:
        return None
    fw = _Section(path, "forwarding", raw.get("forwarding"))
    calling_ae = fw.get("calling_ae", str, own_ae)
    config = ForwardingConfig(
        queue=fw.path_("queue", "data/forward.db"),
        calling_ae=fw.ae_title("calling_ae", calling_ae),
        max_attempts=fw.int_in("max_attempts", 1, 10**6, 50),
        retry_initial=fw.get("retry_initial", float, 2.0),
        retry_max=fw.get("retry_max", float, 600.0),
    )
    if not 0 < config.retry_initial <= config.retry_max:
        raise fw._fail("retry_initial", "must be positive seconds and at most retry_max")
    fw.done()
    destinations = []
    for i, item in enumerate(_tables(path, raw, "destinations")):
        sec = _Section(path, f"destinations[{i}]", item)
        host, _, port = sec.get("address", str).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise sec._fail("address", "must be host:port, e.g. 192.0.2.30:104")
        site = sec.get("site", str, None)
        tls = None
        if sec.get("tls", bool, False):
            files = {
                key: sec.path_(key) if sec.get(key, str, None) else None
                for key in ("tls_ca", "tls_cert", "tls_key")
            }
            if (files["tls_cert"] is None) != (files["tls_key"] is None):
                raise sec._fail(
                    "tls_cert",
                    "and tls_key go together: set both (our client certificate and its key) or neither",
                )
            tls = DestinationTls(
                files["tls_ca"],
                files["tls_cert"],
                files["tls_key"],
                sec.get("tls_server_name", str, host.strip("[]")),
            )
        else:
            for key in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"):
                if key in sec.data:
                    raise sec._fail(
                        key,
                        "is set but tls is not true; add `tls = true` to use TLS to this destination",
                    )
        destinations.append(
            DestinationConfig(
                ae_title=sec.ae_title("ae_title", sec.get("ae_title", str)),
                host=host,
                port=int(port),
                site=site,
                concurrency=sec.int_in("concurrency", 1, 32, 1),
                tls=tls,
            )
        )
        sec.done()
    titles = [d.ae_title for d in destinations]
    if len(set(titles)) != len(titles):
        raise ConfigError(f"{path}: the same ae_title is listed twice under [[destinations]]")
    routes = []
    for i, item in enumerate(_tables(path, raw, "routes")):
        sec = _Section(path, f"routes[{i}]", item)
        to = _strings(sec, "to")
        for ae in to:
            if ae not in titles:
                raise sec._fail(
                    "to", f"names {ae!r}, which is not under [[destinations]]; add it there"
                )
        if not to:
            raise sec._fail("to", "is empty; name the destination AE titles this route sends to")
        routes.append(
            RouteConfig(
                to=to,
                calling_aes=_strings(sec, "calling_ae"),
                modalities=_strings(sec, "modality"),
                sop_classes=_strings(sec, "sop_class"),
            )
        )
        sec.done()
    return ForwardingConfig(
        **{**config.__dict__, "destinations": tuple(destinations), "routes": tuple(routes)}
    )


def _tables(path: Path, raw: dict[str, Any], name: str) -> list[Any]:
    items = raw.get(name, [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: {name} must be an array of tables: write [[{name}]]")
    return items


def _peering(path: Path, raw: dict[str, Any], own_origin: str) -> PeeringConfig | None:
    if "peering" not in raw:
        for listed in ("peers", "witnesses"):
            if raw.get(listed):
                raise ConfigError(
                    f"{path}: [[{listed}]] are listed but there is no [peering] section to reach them from"
                )
        return None
    pe = _Section(path, "peering", raw["peering"])
    peering = PeeringConfig(
        host=pe.get("host", str, "127.0.0.1"),
        port=pe.int_in("port", 1, 65535),
        tls_cert=pe.path_("tls_cert"),
        tls_key=pe.path_("tls_key"),
        gossip_interval=pe.get("gossip_interval", float, 1.0),
        fanout=pe.int_in("fanout", 1, 100, 3),
        max_message_bytes=pe.int_in("max_message_bytes", 1024, 2**30, 8 * 2**20),
        peers=(),
        heartbeat_interval=pe.get("heartbeat_interval", float, 60.0),
        backoff_max=pe.get("backoff_max", float, 300.0),
        startup_wait=pe.get("startup_wait", float, 60.0),
        witness_policy=_witness_policy(pe) if "witness_policy" in pe.data else None,
    )
    pe.done()
    if peering.gossip_interval <= 0:
        raise pe._fail("gossip_interval", "must be positive seconds")
    if peering.heartbeat_interval <= 0:
        raise pe._fail("heartbeat_interval", "must be positive seconds")
    if peering.backoff_max < 0:
        raise pe._fail("backoff_max", "must be zero or more seconds")
    if peering.startup_wait <= 0:
        raise pe._fail("startup_wait", "must be positive seconds")
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError(f"{path}: peers must be an array of tables: write [[peers]]")
    peers = []
    for i, item in enumerate(peers_raw):
        sec = _Section(path, f"peers[{i}]", item)
        origin = sec.get("origin", str)
        host, _, port = sec.get("address", str).rpartition(":")
        if not host or not port.isdigit():
            raise sec._fail("address", "must be host:port, e.g. 192.0.2.10:7443")
        try:
            name, public_key = parse_verifier_key(sec.get("vkey", str))
        except NoteError as exc:
            raise sec._fail(
                "vkey", f"is not a verifier key ({exc}); copy the peer's trust.txt line"
            ) from None
        if name != origin:
            raise sec._fail("vkey", f"names {name!r} but origin is {origin!r}")
        if origin == own_origin:
            raise sec._fail("origin", "is this gateway's own origin")
        cert_path = sec.path_("tls_cert")
        try:
            cert = cert_path.read_bytes()
        except OSError as exc:
            raise sec._fail(
                "tls_cert",
                f"{cert_path} cannot be read ({exc.strerror}); copy the peer's peer-tls.crt there",
            ) from None
        sec.done()
        peers.append(PeerConfig(origin, host, int(port), public_key, cert))
    if len({p.origin for p in peers}) != len(peers):
        raise ConfigError(f"{path}: the same origin is listed twice under [[peers]]")
    witnesses = _witnesses(path, raw, {own_origin, *(p.origin for p in peers)})
    return PeeringConfig(**{**peering.__dict__, "peers": tuple(peers), "witnesses": witnesses})


def _witness_policy(pe: _Section) -> WitnessPolicy:
    """[peering] witness_policy: a C2SP tlog-policy file, one line naming the mistake."""
    policy_path = pe.path_("witness_policy")
    try:
        return parse_policy(policy_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise pe._fail("witness_policy", f"{policy_path} cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, PolicyError) as exc:
        raise pe._fail("witness_policy", f"{policy_path} is not a witness policy: {exc}") from None


def _witnesses(path: Path, raw: dict[str, Any], taken: set[str]) -> tuple[WitnessConfig, ...]:
    """[[witnesses]]: standard tlog-witnesses, each a vkey (its name), a URL, a pinned cert
    or none (the system's certificate authorities then vouch for its HTTPS server)."""
    items = raw.get("witnesses", [])
    if not isinstance(items, list):
        raise ConfigError(f"{path}: witnesses must be an array of tables: write [[witnesses]]")
    witnesses = []
    for i, item in enumerate(items):
        sec = _Section(path, f"witnesses[{i}]", item)
        try:
            name, public_key = parse_verifier_key(sec.get("vkey", str))
        except NoteError as exc:
            raise sec._fail(
                "vkey", f"is not a verifier key ({exc}); copy the key the witness publishes"
            ) from None
        if name in taken:
            raise sec._fail(
                "vkey",
                f"names {name!r}, already this gateway, one of its [[peers]] or [[witnesses]]",
            )
        taken.add(name)
        url = sec.get("url", str).rstrip("/")
        if not url.startswith(("https://", "http://")) or any(
            c.isspace() or c in "?#" for c in url
        ):
            raise sec._fail(
                "url", "must be the witness's submission prefix, e.g. https://witness.example/w1"
            )
        cert = None
        if "tls_cert" in sec.data:
            cert_path = sec.path_("tls_cert")
            try:
                cert = cert_path.read_bytes()
            except OSError as exc:
                raise sec._fail(
                    "tls_cert", f"{cert_path} cannot be read ({exc.strerror})"
                ) from None
        interval = sec.get("interval", float, 60.0)
        if interval < 0:
            raise sec._fail("interval", "must be zero or more seconds")
        sec.done()
        witnesses.append(WitnessConfig(name, url, public_key, cert, interval))
    return tuple(witnesses)
