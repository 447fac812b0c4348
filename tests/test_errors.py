"""One error root: every error the package raises on purpose is a DicomLedgerError of one family,
and a command turns any of them into one line and an exit code, never a traceback."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import dicomledger
from dicomledger.common.errors import (
    ConfigurationError,
    DicomError,
    DicomLedgerError,
    LedgerFormatError,
    PeerError,
    StorageError,
)
from tests.conftest import dicomledger as run_cli

FAMILIES = (ConfigurationError, StorageError, LedgerFormatError, PeerError, DicomError)
# Exceptions that carry control flow inside one module and never reach a caller as an error.
CONTROL_FLOW = {
    "dicomledger.dicom.net.operation.Refusal",  # answered as a DIMSE status
    "dicomledger.dicom.pixelhash.NeedsDecoder",  # the hash is taken another way
    "dicomledger.dicom.fastread.Deferred",  # pydicom reads the instance instead
    "dicomledger.dicom.fastread._NeedMore",
    "dicomledger.gateway.StartupInterrupted",  # told to stop while starting
}


def exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(dicomledger.__path__, "dicomledger."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
            ):
                found[f"{info.name}.{name}"] = value
    return found


def test_every_error_of_the_package_has_the_root_and_one_family():
    classes = exception_classes()
    assert "dicomledger.ledger.note.NoteError" in classes  # the walk found the modules
    for name, cls in classes.items():
        if name in CONTROL_FLOW:
            continue
        assert issubclass(cls, DicomLedgerError), f"{name} does not derive from DicomLedgerError"
        families = [f for f in FAMILIES if issubclass(cls, f)]
        assert len(families) <= 1, f"{name} is in {families}"
    assert CONTROL_FLOW <= set(classes)  # the exceptions above still exist


def test_the_errors_keep_their_standard_bases():
    """Handlers written for ``ValueError`` or ``OSError`` still catch them."""
    from dicomledger.config import ConfigError
    from dicomledger.dicom.store import StoreError
    from dicomledger.ledger.note import NoteError

    assert issubclass(ConfigError, ConfigurationError) and issubclass(ConfigError, ValueError)
    assert issubclass(NoteError, LedgerFormatError) and issubclass(NoteError, ValueError)
    assert issubclass(StoreError, StorageError) and issubclass(StoreError, OSError)


@pytest.fixture
def malformed_checkpoint(tmp_path: Path) -> Path:
    """A gateway's config whose ledger holds a log with one entry and a checkpoint that is not
    a signed note: valid SQLite, invalid ledger data."""
    from dicomledger.ledger.log import LedgerStore

    directory = tmp_path / "gw"
    origin = "gw.test/dicomledger"
    run_cli(
        "init",
        "--dir",
        str(directory),
        "--ae-title",
        "GW",
        "--port",
        "11112",
        "--origin",
        origin,
        check=True,
    )
    config = directory / "config.toml"
    database = directory / "data" / "ledger.db"

    async def create() -> int:
        store = await LedgerStore.open(database)
        try:
            return (await store.ensure_origin(origin, Ed25519PrivateKey.generate().public_key())).id
        finally:
            await store.close()

    origin_id = asyncio.run(create())
    with sqlite3.connect(database) as db:
        db.execute(
            "INSERT INTO entries (origin_id, idx, data) VALUES (?, 0, ?)", (origin_id, b"{}")
        )
        db.execute(
            "INSERT INTO checkpoints (origin_id, size, note) VALUES (?, 1, ?)",
            (origin_id, b"not a note"),
        )
    db.close()
    return config


@pytest.mark.e2e  # runs `dicomledger` commands
@pytest.mark.parametrize(
    "command",
    [("prove", "--entry", "0", "-o", "proof"), ("peers",)],
    ids=lambda c: c[0],
)
def test_malformed_ledger_data_is_one_line_and_exit_1(malformed_checkpoint, tmp_path, command):
    command = tuple(str(tmp_path / a) if a == "proof" else a for a in command)
    result = run_cli(*command, "--config", str(malformed_checkpoint))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("dicomledger: ") and result.stderr.count("\n") == 1, (
        result.stderr
    )
