"""`dicomledger status`: the ledger and store at a glance."""

from __future__ import annotations

import asyncio

from dicomledger.config import Config
from dicomledger.dicom.index import Index
from dicomledger.ledger.log import LedgerStore


async def _status(config: Config) -> list[str]:
    lines = [f"gateway {config.gateway.ae_title} on {config.gateway.host}:{config.gateway.port}"]
    store = await LedgerStore.open(config.ledger.database)
    try:
        for origin in await store.origins():
            size = await store.size(origin.name)
            cp = await store.latest_checkpoint(origin.name)
            mark = " (this gateway)" if origin.name == config.ledger.origin else ""
            lines.append(
                f"log {origin.name}{mark}: {size} entries, newest checkpoint at size "
                f"{cp[0] if cp else 'none'}"
            )
    finally:
        await store.close()
    index = await Index.open(config.storage.index)
    try:
        lines.append(f"stored instances: {await index.count_instances()}")
        unanchored = await index.unanchored()
        if unanchored:
            lines.append(f"instances awaiting an anchor: {len(unanchored)}")
    finally:
        await index.close()
    return lines


def status(config: Config) -> int:
    for line in asyncio.run(_status(config)):
        print(line)
    return 0
