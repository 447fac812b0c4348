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
        ('ae_title = "DICOMLEDGER"', 'ae_title = "THIS_TITLE_IS_MUCH_TOO_LONG"', r"gateway\.ae_title .*not a valid AE title"),
        ('allowed_calling_aes = ["STORESCU", "ECHOSCU", "CT_SCANNER1"]', "allowed_calling_aes = []", r"allowed_calling_aes is empty"),
        ("max_pdu_size = 0", "max_pdu_sise = 0", r"gateway\.max_pdu_sise is not a known setting"),
        ('origin = "hospital-a.example/dicomledger"', 'origin = "has space"', r"ledger\.origin"),
        ('key_file = "keys/gateway.key"\n', "", r"ledger\.key_file is missing"),
        ("[storage]", "[storrage]", r"\[storrage\] is not a known section"),
        ("checkpoint_interval = 1.0", "checkpoint_interval = -1", r"checkpoint_interval must be positive"),
        ('level = "info"', 'level = "loud"', r"logging\.level"),
        ("heartbeat_interval = 60.0", "heartbeat_interval = 0", r"peering\.heartbeat_interval must be positive"),
        ("backoff_max = 300.0", "backoff_max = -1", r"peering\.backoff_max must be zero or more seconds"),
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
