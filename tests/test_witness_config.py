"""[[witnesses]]: standard tlog-witnesses asked to cosign our checkpoints; each mistake is one
clear line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.config import ConfigError, load_config
from dicomledger.ledger.note import SIG_COSIGNATURE_V1, verifier_key

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "gateway.example.toml"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key()
VKEY = verifier_key("witness.example.org/w1", KEY, SIG_COSIGNATURE_V1)


def config(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.read_text() + "".join(f"\n[[witnesses]]\n{t}\n" for t in tables))
    return path


def test_witnesses_load(tmp_path):
    cert = tmp_path / "w.crt"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    other = verifier_key("witness.example.net", KEY)  # the 0x01 form of a key is accepted too
    cfg = load_config(
        config(
            tmp_path,
            f'vkey = "{VKEY}"\nurl = "https://witness.example.org/w1/"',
            f'vkey = "{other}"\nurl = "http://192.0.2.7:8080"\ntls_cert = "{cert}"\ninterval = 0',
        )
    )
    assert cfg.peering is not None
    w1, w2 = cfg.peering.witnesses
    assert (w1.name, w1.url, w1.tls_cert, w1.interval) == (
        "witness.example.org/w1",
        "https://witness.example.org/w1",
        None,
        60.0,
    )
    assert (w2.name, w2.url, w2.tls_cert, w2.interval) == (
        "witness.example.net",
        "http://192.0.2.7:8080",
        cert.read_bytes(),
        0.0,
    )
    assert (
        w1.public_key.public_bytes_raw()
        == w2.public_key.public_bytes_raw()
        == KEY.public_bytes_raw()
    )
    assert load_config(EXAMPLE).peering.witnesses == ()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "table, message",
    [
        ('url = "https://w.example"', r"witnesses\[0\]\.vkey is missing"),
        (f'vkey = "{VKEY}"', r"witnesses\[0\]\.url is missing"),
        (
            'vkey = "not a vkey"\nurl = "https://w.example"',
            r"witnesses\[0\]\.vkey is not a verifier key",
        ),
        (
            f'vkey = "{VKEY}"\nurl = "w.example/w1"',
            r"witnesses\[0\]\.url must be the witness's submission prefix",
        ),
        (f'vkey = "{VKEY}"\nurl = "https://w.example/w1?x=1"', r"witnesses\[0\]\.url must be"),
        (
            f'vkey = "{VKEY}"\nurl = "https://w.example"\ntls_cert = "nowhere.crt"',
            r"witnesses\[0\]\.tls_cert .* cannot be read",
        ),
        (
            f'vkey = "{VKEY}"\nurl = "https://w.example"\nurll = "x"',
            r"witnesses\[0\]\.urll is not a known setting",
        ),
        (
            f'vkey = "{VKEY}"\nurl = "https://w.example"\ninterval = -1',
            r"witnesses\[0\]\.interval must be zero or more",
        ),
        (
            f'vkey = "{VKEY}"\nurl = "https://w.example"\ninterval = "1m"',
            r"witnesses\[0\]\.interval must be",
        ),
        (
            f'vkey = "{verifier_key("hospital-a.example/dicomledger", KEY)}"\nurl = "https://w.example"',
            r"witnesses\[0\]\.vkey names 'hospital-a.example/dicomledger', already this gateway",
        ),
    ],
)
def test_each_mistake_names_key_and_fix(tmp_path, table, message):
    path = config(tmp_path, table)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_witness_listed_twice(tmp_path):
    table = f'vkey = "{VKEY}"\nurl = "https://w.example"'
    with pytest.raises(
        ConfigError, match=r"witnesses\[1\]\.vkey names 'witness.example.org/w1', already"
    ):
        load_config(config(tmp_path, table, table))


def test_witnesses_need_a_peering_section(tmp_path):
    path = tmp_path / "config.toml"
    text = EXAMPLE.read_text()
    start, end = text.index("[peering]"), text.index("# One [[peers]]")
    path.write_text(
        text[:start] + text[end:] + f'\n[[witnesses]]\nvkey = "{VKEY}"\nurl = "https://w.example"\n'
    )
    with pytest.raises(
        ConfigError, match=r"\[\[witnesses\]\] are listed but there is no \[peering\] section"
    ):
        load_config(path)
