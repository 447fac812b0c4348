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

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no controls


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


class ConfigError(ValueError):
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


@dataclass(frozen=True)
class Config:
    path: Path
    gateway: GatewayConfig
    ledger: LedgerConfig
    storage: StorageConfig
    pseudonym_secret_file: Path
    log_level: str

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
        value = self.get(key, int, default)
        if not low <= value <= high:
            raise self._fail(key, f"must be between {low} and {high}, got {value}")
        return value

    def path_(self, key: str, default: Any = ...) -> Path:
        value = Path(self.get(key, str, default))
        return value if value.is_absolute() else self.path.parent / value

    def ae_title(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not AE_TITLE_RE.match(value) or not value.strip():
            raise self._fail(
                key, f"has {value!r}, not a valid AE title (1-16 printable characters, no backslash)"
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
        raise ConfigError(f"{path}: config file not found; create one with `dicomledger init --dir DIR`") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    known = {"gateway", "ledger", "storage", "pseudonyms", "logging"}
    for table in raw:
        if table not in known:
            raise ConfigError(f"{path}: [{table}] is not a known section; known: {', '.join(sorted(known))}")

    g = _Section(path, "gateway", raw.get("gateway"))
    allowed = g.get("allowed_calling_aes", list)
    if not allowed:
        raise g._fail("allowed_calling_aes", 'is empty, so nobody could connect; list AE titles or "*"')
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
    )
    g.done()

    lg = _Section(path, "ledger", raw.get("ledger"))
    origin = lg.get("origin", str)
    if not origin or any(c.isspace() or c == "+" for c in origin):
        raise lg._fail("origin", f"is {origin!r}; use a name like hospital-a.example/dicomledger (no spaces or '+')")
    checkpoint_interval = lg.get("checkpoint_interval", float, 2.0)
    if checkpoint_interval <= 0:
        raise lg._fail("checkpoint_interval", f"must be positive seconds, got {checkpoint_interval}")
    ledger = LedgerConfig(
        origin=origin,
        key_file=lg.path_("key_file"),
        database=lg.path_("database"),
        checkpoint_interval=checkpoint_interval,
    )
    lg.done()

    st = _Section(path, "storage", raw.get("storage"))
    storage = StorageConfig(directory=st.path_("directory"), index=st.path_("index"))
    st.done()

    ps = _Section(path, "pseudonyms", raw.get("pseudonyms"))
    secret_file = ps.path_("secret_file")
    ps.done()

    lo = _Section(path, "logging", raw.get("logging"))
    level = lo.get("level", str, "info").lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise lo._fail("level", f"is {level!r}; use debug, info, warning or error")
    lo.done()

    return Config(path, gateway, ledger, storage, secret_file, level)
