"""`dicomledger verify-file`: is this DICOM file's pixel data anchored on the ledger?

Looks the file's hashes up among the anchors of every log in the local ledger: the hash of
the pixel data as stored (survives header edits), then the canonical hash of the decoded
pixel values (survives lossless transcoding). If neither is found but the instance itself
was anchored, its pixels were altered: MISMATCH.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicomledger.config import Config
from dicomledger.dicom.pixelhash import PixelHashError, hash_instance_file
from dicomledger.ledger.entries import Entry, decode_entry
from dicomledger.ledger.log import LedgerStore
from dicomledger.ledger.pseudonym import pseudonym

ANCHORED, MISMATCH, ERROR, NOT_ANCHORED = 0, 1, 2, 3


def _when(entry: Entry) -> str:
    return datetime.fromtimestamp(entry.time_ms / 1000, UTC).isoformat(timespec="milliseconds")


async def _lookup(db: Path, keys: list[str]) -> list[Entry]:
    store = await LedgerStore.open(db)
    try:
        found: list[Entry] = []
        for key in keys:
            for origin, index in await store.find(key):
                found.append(decode_entry(await store.entry(origin, index)))
        return found
    finally:
        await store.close()


def verify_file(config: Config, path: Path) -> int:
    try:
        sop_instance_uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        hashes = hash_instance_file(path)
    except (OSError, InvalidDicomError, AttributeError, PixelHashError) as exc:
        print(f"ERROR: cannot read {path} as DICOM: {exc}")
        return ERROR
    instance = pseudonym(config.pseudonym_secret(), "instance", sop_instance_uid)
    what = "pixel data" if hashes.method == "pixel" else "content"
    exact = asyncio.run(_lookup(config.ledger.database, [f"sha256:{hashes.sha256.hex()}"]))
    if exact:
        for e in exact:
            print(f"ANCHORED: {what} hash {hashes.sha256.hex()} recorded by {e.origin} "
                  f"as entry {e.index} at {_when(e)}")
        return ANCHORED
    if hashes.decoded_sha256 is not None:
        decoded = asyncio.run(
            _lookup(config.ledger.database, [f"decoded:{hashes.decoded_sha256.hex()}"])
        )
        if decoded:
            for e in decoded:
                print(f"ANCHORED: decoded pixel values match (lossless transcoding) entry "
                      f"{e.index} of {e.origin} at {_when(e)}")
            return ANCHORED
    same_instance = asyncio.run(_lookup(config.ledger.database, [f"instance:{instance}"]))
    if same_instance:
        for e in same_instance:
            print(f"MISMATCH: this instance was anchored by {e.origin} as entry {e.index} at "
                  f"{_when(e)} with {what} hash {e.payload.get('sha256')}; "
                  f"this file's {what} hash is {hashes.sha256.hex()}")
        return MISMATCH
    print(f"NOT ANCHORED: no anchor of this {what} or of instance {sop_instance_uid} in the ledger")
    return NOT_ANCHORED
