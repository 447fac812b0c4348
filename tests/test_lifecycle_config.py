"""The [erasure], [retention] and [scrub] settings: the commented example parses, and each
mistake is one line naming the key."""

from pathlib import Path

import pytest

from dicomledger.config import ConfigError, RetentionRule, load_config
from tests.test_config import EXAMPLE, write


def uncommented() -> str:
    """The example with its erasure, retention and scrub sections switched on."""
    text = EXAMPLE.read_text()
    start = text.index("# [erasure]")
    end = text.find("\n# ATNA audit trail", start)  # the next section stays commented
    end = len(text) if end < 0 else end
    lines = [
        line[2:] if line.startswith("# ") and ("=" in line or line.startswith("# [")) else line
        for line in text[start:end].splitlines()
    ]
    return text[:start] + "\n".join(lines) + "\n" + text[end:]


def test_example_sections_parse(tmp_path):
    cfg = load_config(write(tmp_path, uncommented()))
    assert cfg.erasure.honour_from == ("hospital-a.example/dicomledger",)
    assert cfg.retention.rules == (RetentionRule(10, ("CR", "DX")), RetentionRule(30, ()))
    assert (cfg.scrub.enabled, cfg.scrub.max_rate_mb_s, cfg.scrub.full_pass_days) == (
        True,
        20.0,
        7.0,
    )
    assert cfg.lifecycle_db == tmp_path / "data" / "lifecycle.db"
    defaults = load_config(EXAMPLE)  # all optional: nothing erased by age, the scrub on
    assert (
        defaults.retention.rules == ()
        and defaults.scrub.enabled
        and defaults.erasure.honour_from == ()
    )


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "keep_years = 10",
            "keep_years = 0",
            r"retention\.rules\[0\]\.keep_years must be between 1 and 200",
        ),
        (
            "keep_years = 10",
            'keep_years = "ten"',
            r"retention\.rules\[0\]\.keep_years must be an integer",
        ),
        (
            'modality = ["CR", "DX"]',
            "modality = [1]",
            r"retention\.rules\[0\]\.modality must be a string",
        ),
        (
            "check_interval_hours = 24",
            "check_interval_hours = -1",
            r"retention\.check_interval_hours must be zero or more",
        ),
        (
            "max_rate_mb_s = 20.0",
            "max_rate_mb_s = 0",
            r"scrub\.max_rate_mb_s must be a positive number",
        ),
        (
            "full_pass_days = 7.0",
            "full_pass_days = -7",
            r"scrub\.full_pass_days must be a positive number",
        ),
        (
            "[scrub]\nenabled = true",
            "[scrub]\nenabled = 1",
            r"scrub\.enabled must be true or false",
        ),
        (
            'honour_from = ["hospital-a.example/dicomledger"]',
            'honour_from = ["has space"]',
            r"erasure\.honour_from",
        ),
        (
            "poll_interval = 2.0",
            "poll_intervall = 2.0",
            r"erasure\.poll_intervall is not a known setting",
        ),
    ],
)
def test_each_mistake_names_key(tmp_path: Path, old: str, new: str, message: str):
    text = uncommented()
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
