"""Proofs for auditors: one assembled from the ledger database (``dicomledger prove``), and one
checked with nothing but a trust file (``dicomledger check-proof``). The file format is
``proof.py``'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dicomledger.common.errors import DicomLedgerError
from dicomledger.ledger.entries import Entry, EntryError, decode_entry, verify_entry_signature
from dicomledger.ledger.identity import Identity
from dicomledger.ledger.log import LedgerStore, sign_checkpoint
from dicomledger.ledger.proof import (
    InclusionProofFile,
    ProofCheck,
    check_proof_file,
    format_proof_file,
    parse_proof_file,
)
from dicomledger.ledger.trust import Trust


class ProofUnavailable(DicomLedgerError, LookupError):
    """The ledger holds no such log or entry, or no checkpoint covers the entry yet."""


async def build_proof(
    store: LedgerStore, origin: str, index: int, own_identity: Callable[[], Identity] | None = None
) -> bytes:
    """The proof file of entry ``index`` of ``origin``'s log, against the newest stored
    checkpoint that covers it. Without one, ``own_identity`` (given for this gateway's own log
    only) signs and stores a checkpoint of the log as it is."""
    if await store.origin(origin) is None:
        raise ProofUnavailable(f"the ledger holds no log for origin {origin!r}")
    size = await store.size(origin)
    if not 0 <= index < size:
        raise ProofUnavailable(f"{origin} has entries 0..{size - 1}; there is no entry {index}")
    latest = await store.latest_checkpoint(origin, at_least=index + 1)
    if latest is None:
        if own_identity is None:
            raise ProofUnavailable(f"no checkpoint of {origin} covers entry {index} yet")
        latest = (size, await sign_checkpoint(store, own_identity(), size))
    cp_size, note = latest
    return format_proof_file(
        InclusionProofFile(
            entry=await store.entry(origin, index),
            index=index,
            proof=tuple(await store.inclusion_proof(origin, index, cp_size)),
            checkpoint_note=note,
        )
    )


@dataclass(frozen=True)
class CheckedProof:
    proof: InclusionProofFile
    entry: Entry
    result: ProofCheck


def check_entry_proof(data: bytes, trusted: Trust) -> CheckedProof:
    """A proof file checked in full: its inclusion proof and checkpoint (``check_proof_file``),
    and its entry signed by the key its log had in force at that index. Raises ProofFileError,
    NoteError or EntryError naming the first problem."""
    proof = parse_proof_file(data)
    result = check_proof_file(proof, trusted)
    entry = decode_entry(proof.entry)
    if entry.origin != result.origin or entry.index != proof.index:
        raise EntryError(
            f"entry says {entry.origin} index {entry.index}, "
            f"the proof is for {result.origin} index {proof.index}"
        )
    chain = trusted.log_chain(result.origin)
    assert chain is not None  # check_proof_file found it
    verify_entry_signature(entry, chain.entry_key(entry.index))
    return CheckedProof(proof, entry, result)
