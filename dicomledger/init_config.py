"""The config.toml that ``dicomledger init`` writes: the example configuration
(``config/gateway.example.toml``, shipped in the package as ``gateway.example.toml``) with this
gateway's own values, so the two cannot drift apart."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files

from dicomledger.config import ConfigError

_TABLE = re.compile(r"^\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
_SETTING = re.compile(r"^([A-Za-z0-9_-]+)\s*=")

TomlValue = str | int | Sequence[str]


def example_text() -> str:
    return files("dicomledger").joinpath("gateway.example.toml").read_text(encoding="utf-8")


def toml_value(value: TomlValue) -> str:
    """A string, integer or list of strings as TOML (JSON's string escapes are TOML's)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def with_values(example: str, values: Mapping[tuple[str, str], TomlValue]) -> str:
    """``example`` with the uncommented setting ``key`` of table ``[table]`` set to each value
    (its comments and every other line as they are); each must be there exactly once."""
    table = ""
    done: set[tuple[str, str]] = set()
    lines = example.splitlines(keepends=True)
    for n, line in enumerate(lines):
        if header := _TABLE.match(line):
            table = header.group(1)
        elif (setting := _SETTING.match(line)) and (table, setting.group(1)) in values:
            where = (table, setting.group(1))
            if where in done:
                raise ConfigError(f"the example configuration sets {where[1]} twice in [{table}]")
            lines[n] = f"{where[1]} = {toml_value(values[where])}\n"
            done.add(where)
    missing = [f"[{t}] {k}" for t, k in values if (t, k) not in done]
    if missing:
        raise ConfigError(f"the example configuration lacks {', '.join(missing)}")
    return "".join(lines)


def render_config(
    *, ae_title: str, host: str, port: int, allowed: Sequence[str], origin: str, peer_port: int
) -> str:
    return with_values(
        example_text(),
        {
            ("gateway", "ae_title"): ae_title,
            ("gateway", "host"): host,
            ("gateway", "port"): port,
            ("gateway", "allowed_calling_aes"): list(allowed),
            ("ledger", "origin"): origin,
            ("peering", "host"): host,
            ("peering", "port"): peer_port,
        },
    )
