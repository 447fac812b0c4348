"""This gateway's own signing key on disk: rotating it, resuming an interrupted rotation, and
taking up a key that a consortium quorum put in place of a lost or stolen one.

Rotation (``rotate_key``, through the running gateway): the new key is written beside the
key file (``gateway.key.new``, 0600, fsynced), the key-rotation entry is appended (durable),
then the new key file is renamed over the old one, so the old private key is gone. A crash
between the entry and the rename leaves both files; the next start finishes the rename
(``resume_rotation``) if the log holds the rotation, and removes the new file otherwise.

Replacement: ``replace-key request`` writes the new key as ``gateway.key.new`` too, with the
statement to be signed; ``replace-key install`` (gateway stopped) puts the key in place and
the signed statement beside it (``key-replacement.statement``); the next start, once its
peers confirmed its log's tip, appends the key-replacement entry first (``own_key_check``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.ledger.identity import Identity, KeyFileError, create_key_file, load_key_file
from dicomledger.ledger.keychain import (
    KeyChain,
    KeyChangeError,
    Statement,
    check_statement,
)
from dicomledger.ledger.log import Appended, LedgerStore, LogWriter
from dicomledger.ledger.note import verifier_key
from dicomledger.ledger.policy import WitnessPolicy


def new_key_file(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".new")


def statement_file(key_file: Path) -> Path:
    return key_file.with_name("key-replacement.statement")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same(a: object, b: object) -> bool:
    return a.public_bytes_raw() == b.public_bytes_raw()  # type: ignore[attr-defined]


async def rotate_key(writer: LogWriter, key_file: Path) -> Appended:
    """Rotate the running log's key: a new key file beside the old one, the key-rotation
    entry, then the new file over the old. Returns the entry."""
    pending = new_key_file(key_file)
    pending.unlink(missing_ok=True)  # a request's or an old attempt's: the log never used it
    new_key = create_key_file(pending)
    try:
        appended = await writer.rotate(new_key)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, key_file)
    _fsync_dir(key_file.parent)
    return appended


async def resume_rotation(store: LedgerStore, identity: Identity, key_file: Path) -> tuple[Identity, str | None]:
    """At start, before anything is appended: a ``gateway.key.new`` left by a rotation that
    was interrupted after its entry became durable is put in place; one the log never used
    (the rotation failed, or a replacement not yet installed) is left alone. Returns the
    identity to sign with and what was done, for the log."""
    pending = new_key_file(key_file)
    if not pending.exists() or await store.origin(identity.origin) is None:
        return identity, None
    try:
        new_key = load_key_file(pending)
    except KeyFileError:
        return identity, None
    chain = await store.key_chain(identity.origin)
    if _same(chain.current, new_key.public_key()) and not _same(chain.current, identity.public_key):
        os.replace(pending, key_file)
        _fsync_dir(key_file.parent)
        return Identity(identity.origin, new_key), "finished a key rotation interrupted after its entry was written"
    return identity, None


@dataclass(frozen=True)
class OwnKey:
    """What the start-up check of this gateway's key against its log's key chain found."""

    replacement: bytes | None = None  # a statement to append first (a replacement installed)
    problem: str | None = None  # why the gateway cannot sign its log with its key file's key


async def own_key_check(
    store: LedgerStore, identity: Identity, key_file: Path, policy: WitnessPolicy | None,
    signer_keys: Callable[[str], Sequence[Ed25519PublicKey]] = lambda name: (),
) -> OwnKey:
    """Once the own log's tip is confirmed: the key file's key must be the one in force at
    the tip, or the new key of an installed replacement statement for exactly this tip."""
    origin = identity.origin
    if await store.origin(origin) is None:
        return OwnKey()
    chain = await store.key_chain(origin)
    size = await store.size(origin)
    if _same(chain.current, identity.public_key):
        return OwnKey()
    path = statement_file(key_file)
    if not path.exists():
        return OwnKey(problem=_wrong_key(chain, identity, size))
    try:
        statement = check_statement(path.read_bytes(), policy, signer_keys)
        _check_fits(statement, chain, size, await store.root(origin, size), identity)
    except (OSError, KeyChangeError) as exc:
        return OwnKey(problem=f"{path}: {exc}")
    return OwnKey(replacement=path.read_bytes())


def _wrong_key(chain: KeyChain, identity: Identity, size: int) -> str:
    changed = f" (after the key change at entry {chain.last_index})" if chain.changes else ""
    return (f"the key file holds {identity.vkey}, but this log's entries are signed by "
            f"{verifier_key(chain.origin, chain.current)} now{changed}: restore the key file, or, if the "
            "key is lost or stolen, replace it with a consortium quorum (`dicomledger replace-key`)")


def _check_fits(statement: Statement, chain: KeyChain, size: int, root: bytes, identity: Identity) -> None:
    """A statement fits this log: its origin, its size is the log's size, its root the log's
    root there, its old key the one in force, its new key the key file's."""
    if statement.origin != chain.origin:
        raise KeyChangeError(f"the statement is for {statement.origin}, not {chain.origin}")
    if statement.size != size:
        raise KeyChangeError(f"the statement replaces the key at size {statement.size}, but this log holds {size} entries")
    if statement.root != root:
        raise KeyChangeError(f"the statement pins another history than this log's first {size} entries (root)")
    if not _same(statement.old_key, chain.key_for_size(size)):
        raise KeyChangeError("the statement's old key is not the one this log has in force")
    if not _same(statement.new_key, identity.public_key):
        raise KeyChangeError("the statement's new key is not the key file's")


def new_private_key(key_file: Path) -> Ed25519PrivateKey:
    """A new key, written to ``gateway.key.new`` (for a replacement request)."""
    pending = new_key_file(key_file)
    pending.unlink(missing_ok=True)
    return create_key_file(pending)
