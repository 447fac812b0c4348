"""`dicomledger init` writes the example configuration with the gateway's own values, so the
config it writes and config/gateway.example.toml cannot drift apart."""

from __future__ import annotations

import pytest

from dicomledger.config import ConfigError, load_config
from dicomledger.init_config import with_values
from tests.conftest import ROOT, dicomledger

EXAMPLE = ROOT / "config" / "gateway.example.toml"
OWN_VALUES = {  # line of the example -> line of init's config
    'ae_title = "DICOMLEDGER"': 'ae_title = "GW7"',
    'host = "127.0.0.1"': 'host = "0.0.0.0"',  # [gateway] and [peering]
    "port = 11112": "port = 11999",
    'allowed_calling_aes = ["STORESCU", "ECHOSCU", "CT_SCANNER1"]': 'allowed_calling_aes = ["CT1", "PACS"]',
    'origin = "hospital-a.example/dicomledger"': 'origin = "gw7.test/dicomledger"',
    "port = 12112": "port = 13999",
}


@pytest.mark.e2e  # runs `dicomledger init`
def test_init_writes_the_example_with_its_own_values(tmp_path):
    result = dicomledger(
        "init",
        "--dir",
        str(tmp_path / "gw"),
        "--ae-title",
        "GW7",
        "--host",
        "0.0.0.0",
        "--port",
        "11999",
        "--peer-port",
        "13999",
        "--allow",
        "CT1",
        "--allow",
        "PACS",
        "--origin",
        "gw7.test/dicomledger",
    )
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "gw" / "config.toml").read_text().splitlines()
    example = EXAMPLE.read_text().splitlines()
    assert len(written) == len(example)
    for ours, theirs in zip(written, example, strict=True):
        assert ours == OWN_VALUES.get(theirs, theirs)
    # the templates of the sections an operator adds later come along, commented
    for template in (
        "# [forwarding]",
        "# [[destinations]]",
        "# [[routes]]",
        "# [permissions]",
        "# [atna]",
    ):
        assert template in written
    config = load_config(tmp_path / "gw" / "config.toml")
    assert (config.gateway.ae_title, config.gateway.host, config.gateway.port) == (
        "GW7",
        "0.0.0.0",
        11999,
    )
    assert config.gateway.allowed_calling_aes == ("CT1", "PACS")
    assert config.ledger.origin == "gw7.test/dicomledger"
    assert config.peering is not None and config.peering.port == 13999


def test_a_setting_the_example_lacks_is_an_error():
    with pytest.raises(ConfigError, match=r"lacks \[gateway\] port"):
        with_values("[gateway]\n# port = 104\n[ledger]\nport = 1\n", {("gateway", "port"): 104})
    with pytest.raises(ConfigError, match="twice"):
        with_values("[gateway]\nport = 1\nport = 2\n", {("gateway", "port"): 104})


def test_only_the_named_settings_change():
    text = (
        "[gateway]\nport = 1  # the port\n# port = 3\n[other]\nport = 2\n[gateway.sub]\nport = 4\n"
    )
    assert with_values(text, {("gateway", "port"): 104}) == (
        "[gateway]\nport = 104\n# port = 3\n[other]\nport = 2\n[gateway.sub]\nport = 4\n"
    )
