"""`dicomledger verify-file`: is this DICOM file anchored on the ledger, and as which instance?

Looks the file's hashes up among the anchors of every log in the local ledger, each anchor
compared under the hash method it names (docs/pixel-hash.md): the pixel data as stored
(survives header edits) or the content hash of an object without pixel data, then the
canonical hash of the decoded pixel values (survives lossless transcoding). A match counts
for this file only if the anchor is of this file's SOP Instance UID; pixels anchored only as
another instance get their own verdict. No match, but the instance itself was anchored: its
pixels (or content) were altered, MISMATCH.

Verdicts and exit codes (README.md):

* 0 ANCHORED: anchored as this SOP instance
* 1 MISMATCH: this SOP instance was anchored with other pixel data (or content)
* 2 ERROR: the file cannot be read or hashed
* 3 NOT ANCHORED: neither this pixel data (or content) nor this SOP instance is anchored
* 4 ANCHORED AS ANOTHER INSTANCE: this pixel data is anchored, but only for other SOP
  instances; this file's SOP Instance UID was never received
* 5 ERASED: anchored as this SOP instance, but every gateway that anchored it has erased it
  since (an ``erased`` entry covers each anchor, ``ledger/erasure.py``): the anchors stay on
  the ledger, the images are gone

An anchor that an erasure covers is printed with that erasure; it counts as ANCHORED only if
another anchor of the file is not erased.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomledger.config import Config
from dicomledger.dicom.pixelhash import (
    CONTENT,
    CONTENT_CANONICAL,
    PIXEL,
    InstanceHashes,
    PixelHashError,
    hash_instance_file,
)
from dicomledger.dicom.store import FileStore
from dicomledger.ledger.entries import IMAGE_ANCHORED, Entry, decode_entry
from dicomledger.ledger.erasure import Erasure, ErasureLookup
from dicomledger.ledger.log import LedgerStore
from dicomledger.ledger.pseudonym import pseudonym

ANCHORED, MISMATCH, ERROR, NOT_ANCHORED, ANCHORED_AS_ANOTHER_INSTANCE, ERASED = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Anchors:
    """The image-anchored entries that concern one file."""

    same_hash: list[Entry]  # its sha256 under the method the entry names
    same_decoded: list[Entry]  # its decoded pixel values
    same_instance: list[Entry]  # its SOP Instance UID
    erased: dict[
        tuple[str, int], Erasure
    ]  # (origin, index) of an anchor above -> the erasure covering it


def _when(entry: Entry) -> str:
    return datetime.fromtimestamp(entry.time_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _where(entry: Entry) -> str:
    return f"{entry.origin} as entry {entry.index} at {_when(entry)}"


def _entry(entry: Entry) -> str:
    return f"entry {entry.index} of {entry.origin} at {_when(entry)}"


async def _anchors(db: Path, hashes: InstanceHashes, instance: str) -> Anchors:
    store = await LedgerStore.open(db)

    async def entries(key: str) -> list[Entry]:
        found = [
            decode_entry(await store.entry(origin, index))
            for origin, index in await store.find(key)
        ]
        return [e for e in found if e.kind == IMAGE_ANCHORED]

    try:
        same_hash = []
        for method in (PIXEL, CONTENT_CANONICAL, CONTENT):
            digest = hashes.sha256_for(method)
            if digest is not None:
                same_hash += [
                    e
                    for e in await entries(f"sha256:{digest.hex()}")
                    if e.payload.get("hash_method") == method
                ]
        decoded = []
        if hashes.decoded_sha256 is not None:
            decoded = await entries(f"decoded:{hashes.decoded_sha256.hex()}")
        same_instance = await entries(f"instance:{instance}")
        lookup = ErasureLookup(store)
        erased = {}
        for e in [*same_hash, *decoded, *same_instance]:
            if (erasure := await lookup.covering(e)) is not None:
                erased[e.origin, e.index] = erasure
        return Anchors(same_hash, decoded, same_instance, erased)
    finally:
        await store.close()


def verify_file(config: Config, path: Path) -> int:
    try:
        header = dcmread(path, stop_before_pixels=True)
        sop_instance_uid = str(header.SOPInstanceUID)
        hashes = hash_instance_file(path)
    except (OSError, InvalidDicomError, AttributeError, PixelHashError) as exc:
        print(f"ERROR: cannot read {path} as DICOM: {exc}")
        return ERROR
    instance = pseudonym(config.pseudonym_secret(), "instance", sop_instance_uid)
    what = "pixel data" if hashes.method == PIXEL else "content"
    found = asyncio.run(_anchors(config.ledger.database, hashes, instance))
    mine = [e for e in found.same_hash if e.payload.get("instance") == instance]
    mine_decoded = [e for e in found.same_decoded if e.payload.get("instance") == instance]
    others = [(e, what) for e in found.same_hash if e.payload.get("instance") != instance]
    others += [
        (e, "decoded pixel values")
        for e in found.same_decoded
        if e.payload.get("instance") != instance
    ]

    def erasure(e: Entry) -> Erasure | None:
        return found.erased.get((e.origin, e.index))

    live = [e for e in mine if erasure(e) is None]
    live_decoded = [e for e in mine_decoded if erasure(e) is None]
    if live:
        for e in live:
            print(f"ANCHORED: {what} hash {e.payload.get('sha256')} recorded by {_where(e)}")
    elif live_decoded:
        for e in live_decoded:
            print(
                f"ANCHORED: decoded pixel values match (lossless transcoding) entry "
                f"{e.index} of {e.origin} at {_when(e)}"
            )
    unique = {
        (e.origin, e.index): e for e in [*mine, *mine_decoded]
    }  # one anchor may match both ways
    for e in unique.values():
        if (gone := erasure(e)) is not None:
            lead = (
                "  also ERASED: anchored"
                if live or live_decoded
                else f"ERASED: this {what} was anchored"
            )
            print(f"{lead} as this instance by {_where(e)}; erased there by {_erasure_text(gone)}")
    if mine or mine_decoded:
        return ANCHORED if live or live_decoded else ERASED
    if found.same_instance:
        via_stored = _matches_a_stored_copy(config, header, hashes, found.same_instance)
        if via_stored:
            for e in via_stored:
                print(
                    f"ANCHORED: content equal (canonical encoding) to the stored copy anchored "
                    f"by {_where(e)}, whose bytes match that entry's content hash"
                )
            return ANCHORED
        for e in found.same_instance:
            if (gone := erasure(e)) is not None:
                print(
                    f"  (the images anchored by {_where(e)} were erased there by {_erasure_text(gone)})"
                )
            method = e.payload.get("hash_method")
            ours = hashes.sha256_for(method) if isinstance(method, str) else None
            print(
                f"MISMATCH: this instance was anchored by {_where(e)} with "
                f"{_method_label(method)} hash {e.payload.get('sha256')}; this file's is "
                + (
                    ours.hex()
                    if ours is not None
                    else f"a {hashes.method} hash, {hashes.sha256.hex()}"
                )
            )
            if method == CONTENT and ours is not None:
                print(
                    "  (that anchor hashed the dataset bytes as received: a copy re-encoded on "
                    "its way differs from it unless the gateway's stored copy is at hand)"
                )
        for e, label in others:
            print(
                f"  this file's {label} hash matches {_entry(e)}, which anchored another SOP "
                f"instance, {e.payload.get('instance')}"
            )
        return MISMATCH
    if others:
        for e, label in others:
            print(
                f"ANCHORED AS ANOTHER INSTANCE: this file's {label} hash matches {_entry(e)}, "
                f"which anchored SOP instance {e.payload.get('instance')}; this file's SOP "
                f"Instance UID {sop_instance_uid} was never received"
            )
        return ANCHORED_AS_ANOTHER_INSTANCE
    print(f"NOT ANCHORED: no anchor of this {what} or of instance {sop_instance_uid} in the ledger")
    return NOT_ANCHORED


def _erasure_text(e: Erasure) -> str:
    when = datetime.fromtimestamp(e.time_ms / 1000, UTC).isoformat(timespec="milliseconds")
    text = f"entry {e.index} at {when} (reason {e.reason}"
    if e.request is not None:
        text += f", applying the erasure {e.request.origin} entry {e.request.index}"
    return text + ")"


def _method_label(method: object) -> str:
    labels = {
        PIXEL: "pixel data",
        CONTENT_CANONICAL: "content",
        CONTENT: "content (bytes as received)",
    }
    return labels.get(method, f"{method!r}") if isinstance(method, str) else "unknown"


def _matches_a_stored_copy(
    config: Config, header: Dataset, hashes: InstanceHashes, anchors: list[Entry]
) -> list[Entry]:
    """Anchors of this instance made with the CONTENT method (bytes as received) cannot
    recognise a copy re-encoded on its way. The gateway's stored copy can: if its bytes
    still match the anchor, and its canonical encoding equals this file's, the file's
    content is the anchored content."""
    if hashes.method != CONTENT_CANONICAL:
        return []
    matched = []
    for entry in anchors:
        anchored = entry.payload.get("sha256")
        if entry.payload.get("hash_method") != CONTENT or not isinstance(anchored, str):
            continue
        try:
            copies = FileStore(config.storage.directory).versions(
                str(header.StudyInstanceUID),
                str(header.SeriesInstanceUID),
                str(header.SOPInstanceUID),
                bytes.fromhex(anchored),
            )
        except (ValueError, AttributeError):
            continue
        for copy in copies:
            try:
                stored = hash_instance_file(copy)
            except (OSError, ValueError):
                continue  # not readable: nothing to add
            untouched = stored.sha256_for(CONTENT) == bytes.fromhex(anchored)
            if untouched and (stored.method, stored.sha256) == (hashes.method, hashes.sha256):
                matched.append(entry)
                break
    return matched
