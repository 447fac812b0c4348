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

from dicomledger.ledger import merkle
from dicomledger.ledger.consortium import ConsortiumState
from dicomledger.ledger.entries import ZERO_HASH, EntryError, check_entry, decode_entry
from dicomledger.ledger.identity import Identity, KeyFileError, create_key_file, load_key_file
from dicomledger.ledger.keychain import (
    KeyChain,
    KeyChangeError,
    Request,
    Statement,
    changes_key_of,
    check_change,
    check_statement,
    make_statement,
    parse_statement,
)
from dicomledger.ledger.log import Appended, LedgerStore, LogWriter
from dicomledger.ledger.merkle import Frontier
from dicomledger.ledger.note import verifier_key, verify_note_signature
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


def _same(a: Ed25519PublicKey, b: Ed25519PublicKey) -> bool:
    return a.public_bytes_raw() == b.public_bytes_raw()


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


async def resume_rotation(
    store: LedgerStore, identity: Identity, key_file: Path
) -> tuple[Identity, str | None]:
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
        return Identity(
            identity.origin, new_key
        ), "finished a key rotation interrupted after its entry was written"
    return identity, None


@dataclass(frozen=True)
class OwnKey:
    """What the start-up check of this gateway's key against its log's key chain found."""

    replacement: bytes | None = None  # a statement to append first (a replacement installed)
    problem: str | None = None  # why the gateway cannot sign its log with its key file's key


async def own_key_check(
    store: LedgerStore,
    identity: Identity,
    key_file: Path,
    policy: WitnessPolicy | None,
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
    return (
        f"the key file holds {identity.vkey}, but this log's entries are signed by "
        f"{verifier_key(chain.origin, chain.current)} now{changed}: restore the key file, or, if the "
        "key is lost or stolen, replace it with a consortium quorum (`dicomledger replace-key`)"
    )


def _check_fits(
    statement: Statement, chain: KeyChain, size: int, root: bytes, identity: Identity
) -> None:
    """A statement fits this log: its origin, its size is the log's size, its root the log's
    root there, its old key the one in force, its new key the key file's."""
    if statement.origin != chain.origin:
        raise KeyChangeError(f"the statement is for {statement.origin}, not {chain.origin}")
    if statement.size != size:
        raise KeyChangeError(
            f"the statement replaces the key at size {statement.size}, but this log holds {size} entries"
        )
    if statement.root != root:
        raise KeyChangeError(
            f"the statement pins another history than this log's first {size} entries (root)"
        )
    if not _same(statement.old_key, chain.key_for_size(size)):
        raise KeyChangeError("the statement's old key is not the one this log has in force")
    if not _same(statement.new_key, identity.public_key):
        raise KeyChangeError("the statement's new key is not the key file's")


def new_private_key(key_file: Path) -> Ed25519PrivateKey:
    """A new key, written to ``gateway.key.new`` (for a replacement request)."""
    pending = new_key_file(key_file)
    pending.unlink(missing_ok=True)
    return create_key_file(pending)


# -- replacement: the request, the consortium's signatures, the install ------------------------


async def make_request(store: LedgerStore, origin: str, key_file: Path, reason: str) -> Request:
    """A replacement request for this gateway's own log as it holds it now: a new key
    (``gateway.key.new``), the statement keeping every entry held (signed by the new key),
    and the entries after its newest checkpoint, which its peers may not hold yet."""
    if await store.origin(origin) is None:
        raise KeyChangeError(f"the ledger holds no log of {origin} yet: there is no key to replace")
    chain = await store.key_chain(origin)
    size = await store.size(origin)
    root = await store.root(origin, size)
    newest = await store.latest_checkpoint(origin)
    start = newest[0] if newest is not None else 0
    new_key = new_private_key(key_file)
    statement = make_statement(origin, size, root, chain.key_for_size(size), new_key, reason)
    return Request(start, tuple(await store.entries(origin, start, size)), statement)


async def check_for_signing(
    store: LedgerStore, request: Request, peers: Sequence[str]
) -> Statement:
    """What a consortium gateway checks before it signs a replacement statement for a peer:
    the new key's own signature; that the statement keeps exactly the history this gateway
    holds of that peer (its entries, and the request's tail where it holds fewer, each
    signed by the key in force and chained, giving the statement's root), no more; that it
    replaces the key in force there; and that this gateway never cosigned a larger
    checkpoint of that log. KeyChangeError names the first thing that does not hold."""
    statement = parse_statement(request.statement)
    origin = statement.origin
    if not verify_note_signature(statement.note, origin, statement.new_key):
        raise KeyChangeError(f"the statement is not signed by the new key it names for {origin}")
    if origin not in peers:
        raise KeyChangeError(f"{origin} is not one of this gateway's [[peers]]")
    chain = await store.key_chain(origin)
    held = await store.size(origin)
    if held > statement.size:
        raise KeyChangeError(
            f"this gateway holds {held} entries of {origin}, more than the {statement.size} the statement keeps"
        )
    if held < request.tail_start:
        raise KeyChangeError(
            f"this gateway holds {held} entries of {origin} and the request carries them from entry "
            f"{request.tail_start} only: let it replicate first, or have the request made again"
        )
    tree = Frontier.from_nodes(held, await store.nodes(origin, Frontier.needed_nodes(held)))
    prev = merkle.leaf_hash(await store.entry(origin, held - 1)) if held else ZERO_HASH
    for index in range(held, statement.size):
        data = request.tail[index - request.tail_start]
        try:
            entry = decode_entry(data)
            if changes_key_of(origin, entry.kind, entry.payload):
                check_entry(data, origin=origin, index=index, prev=prev, public_key=None)
                chain = check_change(entry, chain, root=tree.root, policy=None)
            else:
                check_entry(
                    data, origin=origin, index=index, prev=prev, public_key=chain.entry_key(index)
                )
        except EntryError as exc:
            raise KeyChangeError(f"the request's entry {index} of {origin}: {exc}") from None
        prev = merkle.leaf_hash(data)
        tree.append(prev)
    if tree.root() != statement.root:
        raise KeyChangeError(
            f"the statement pins another history of {origin} than the entries held here"
        )
    if not _same(statement.old_key, chain.key_for_size(statement.size)):
        raise KeyChangeError(
            f"the statement's old key is not the key {origin}'s log has in force at its size"
        )
    witnessed = await ConsortiumState(store).witness_state(origin)
    if witnessed is not None and witnessed[0] > statement.size:
        raise KeyChangeError(
            f"this gateway cosigned a checkpoint of {origin} of size {witnessed[0]}, larger than the statement keeps"
        )
    return statement


async def install_replacement(
    store: LedgerStore,
    origin: str,
    key_file: Path,
    request: Request,
    policy: WitnessPolicy | None,
    signer_keys: Callable[[str], Sequence[Ed25519PublicKey]],
) -> Statement:
    """At the gateway whose key is replaced, stopped: the statement must meet the quorum and
    fit the log held; it goes beside the key file and the new key (``gateway.key.new``, made
    with the request) replaces the old key file. The next start appends the statement."""
    pending = new_key_file(key_file)
    if not pending.exists():
        raise KeyChangeError(f"{pending} is missing: install on the gateway that made the request")
    new_key = load_key_file(pending)
    statement = check_statement(request.statement, policy, signer_keys)
    chain = await store.key_chain(origin)
    size = await store.size(origin)
    _check_fits(statement, chain, size, await store.root(origin, size), Identity(origin, new_key))
    path = statement_file(key_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(request.statement)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    os.replace(pending, key_file)
    _fsync_dir(key_file.parent)
    return statement
