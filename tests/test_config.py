"""Config mistakes are reported as one clear line naming the key and the fix."""

from pathlib import Path

import pytest

from dicomledger.config import ConfigError, load_config
from tests.conftest import dicomledger

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "gateway.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_config_loads_with_relative_paths_resolved():
    cfg = load_config(EXAMPLE)
    assert cfg.gateway.ae_title == "DICOMLEDGER" and cfg.gateway.port == 11112
    assert cfg.gateway.allows("STORESCU") and not cfg.gateway.allows("INTRUDER")
    assert cfg.ledger.database == EXAMPLE.parent / "data" / "ledger.db"


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("port = 11112", 'port = "eleven"', r"gateway\.port must be an integer"),
        ("port = 11112", "port = 70000", r"gateway\.port must be between 1 and 65535"),
        (
            'ae_title = "DICOMLEDGER"',
            'ae_title = "THIS_TITLE_IS_MUCH_TOO_LONG"',
            r"gateway\.ae_title .*not a valid AE title",
        ),
        (
            'allowed_calling_aes = ["STORESCU", "ECHOSCU", "CT_SCANNER1"]',
            "allowed_calling_aes = []",
            r"allowed_calling_aes is empty",
        ),
        ("max_pdu_size = 0", "max_pdu_sise = 0", r"gateway\.max_pdu_sise is not a known setting"),
        ('origin = "hospital-a.example/dicomledger"', 'origin = "has space"', r"ledger\.origin"),
        ('key_file = "keys/gateway.key"\n', "", r"ledger\.key_file is missing"),
        ("[storage]", "[storrage]", r"\[storrage\] is not a known section"),
        (
            "checkpoint_interval = 1.0",
            "checkpoint_interval = -1",
            r"checkpoint_interval must be positive",
        ),
        ('level = "info"', 'level = "loud"', r"logging\.level"),
        (
            "heartbeat_interval = 60.0",
            "heartbeat_interval = 0",
            r"peering\.heartbeat_interval must be positive",
        ),
        (
            "backoff_max = 300.0",
            "backoff_max = -1",
            r"peering\.backoff_max must be zero or more seconds",
        ),
        ("port = 11112", "port = ", r"not valid TOML"),
    ],
)
def test_each_mistake_names_key_and_fix(tmp_path, old, new, message):
    text = EXAMPLE.read_text()
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*dicomledger init"):
        load_config(tmp_path / "nope.toml")


def test_cli_reports_config_error_in_one_line_with_exit_2(tmp_path):
    path = write(tmp_path, EXAMPLE.read_text().replace("port = 11112", "port = 0"))
    result = dicomledger("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "gateway.port must be between 1 and 65535" in result.stderr


def test_cli_refuses_a_world_readable_key(tmp_path):
    assert dicomledger("init", "--dir", str(tmp_path / "gw")).returncode == 0
    key = tmp_path / "gw" / "keys" / "gateway.key"
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    result = dicomledger("verify", "--config", str(tmp_path / "gw" / "config.toml"))
    assert result.returncode == 2 and "chmod 600" in result.stderr


def _uncommented(block_start: str, block_end: str) -> str:
    """The example config's commented block from ``block_start`` up to ``block_end``, uncommented."""
    text = EXAMPLE.read_text()
    block = text[text.index(block_start) : text.index(block_end)]
    return "\n".join(
        ln[2:]
        for ln in block.splitlines()
        if ln.startswith("# [") or (ln.startswith("# ") and " = " in ln.split("#")[1])
    )


def test_the_example_config_documents_metrics_and_storage_commitment(tmp_path):
    """Uncommented, the [metrics], [storage_commitment] and [[commitment_requestors]] blocks load
    and name every setting."""
    from dicomledger.config import CommitmentRequestor, MetricsConfig, StorageCommitmentConfig

    block = _uncommented("# [metrics]\n", "# ATNA audit trail")
    path = write(tmp_path, EXAMPLE.read_text() + "\n" + block + "\n")
    cfg = load_config(path)
    assert cfg.metrics == MetricsConfig(host="127.0.0.1", port=9112, checkpoint_stale_after=60.0)
    assert cfg.storage_commitment == StorageCommitmentConfig(
        enabled=True,
        requestors=(CommitmentRequestor("CT_SCANNER_1", "192.0.2.40", 104),),
        report_timeout=30.0,
    )
    documented = {ln.split(" = ")[0] for ln in block.splitlines() if " = " in ln}
    settings = (
        (set(MetricsConfig.__dataclass_fields__) | {"enabled"})
        | (set(StorageCommitmentConfig.__dataclass_fields__) - {"requestors"})
        | {"ae_title", "address"}
    )
    assert settings <= documented, settings - documented


def test_metrics_and_commitment_settings_are_checked(tmp_path):
    base = EXAMPLE.read_text()
    assert load_config(write(tmp_path, base)).metrics is None  # off by default
    assert load_config(write(tmp_path, base)).storage_commitment.enabled
    for extra, message in [
        ("[metrics]\nenabled = true\nport = 11112\n", "metrics.port is the DICOM port"),
        (
            "[metrics]\nenabled = true\nchekpoint_stale_after = 5\n",
            "chekpoint_stale_after is not a known setting",
        ),
        (
            "[metrics]\nenabled = true\ncheckpoint_stale_after = 0.5\n",
            "must be at least ledger.checkpoint_interval",
        ),
        (
            '[[commitment_requestors]]\nae_title = "CT"\naddress = "nowhere"\n',
            "address must be host:port",
        ),
        (
            '[[commitment_requestors]]\nae_title = "CT"\naddress = "h:1"\n[[commitment_requestors]]\n'
            'ae_title = "CT"\naddress = "h:2"\n',
            "listed twice",
        ),
        ("[storage_commitment]\nreport_timeout = 0\n", "report_timeout must be a positive number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, base + "\n" + extra))
