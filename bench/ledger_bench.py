"""Ledger core benchmark: appends/s with group commit, proofs and verify at 1,000,000 entries.

    .venv/bin/python bench/ledger_bench.py [--entries 1000000] [--seconds 10] [--dir DIR]

Prints one table. The side-by-side baseline for appends is the same writer forced to
commit every entry alone (no group commit), measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from dicomledger.ledger.identity import Identity  # noqa: E402
from dicomledger.ledger.log import LedgerStore, LogWriter  # noqa: E402
from dicomledger.ledger.note import verifier_key  # noqa: E402
from dicomledger.ledger.proof import (  # noqa: E402
    InclusionProofFile,
    check_proof_file,
    format_proof_file,
    parse_proof_file,
)
from dicomledger.ledger.trust import load_trust_text  # noqa: E402
from dicomledger.ledger.verify import verify_database  # noqa: E402

ORIGIN = "bench.example/dicomledger"
PAYLOAD = {
    "patient": "ab" * 32, "study": "cd" * 32, "series": "ef" * 32, "instance": "01" * 32,
    "hash_method": "pixel", "sha256": "02" * 32, "decoded_sha256": "03" * 32, "frames": 1,
    "frame_root": "04" * 32, "sop_class": "1.2.840.10008.5.1.4.1.1.2",
    "transfer_syntax": "1.2.840.10008.1.2.1", "calling_ae": "STORESCU",
}


async def sustained(path: Path, seconds: float, appenders: int, max_batch: int) -> float:
    store = await LedgerStore.open(path)
    writer = LogWriter(store, Identity(ORIGIN, Ed25519PrivateKey.generate()), max_batch=max_batch)
    await writer.start()
    done = 0
    stop_at = time.perf_counter() + seconds

    async def appender() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await writer.append("image-anchored", PAYLOAD)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(appenders)))
    elapsed = time.perf_counter() - start
    await writer.stop()
    await store.close()
    return done / elapsed


async def build(path: Path, entries: int, key: Ed25519PrivateKey) -> float:
    store = await LedgerStore.open(path)
    writer = LogWriter(store, Identity(ORIGIN, key), max_batch=5000)
    await writer.start()
    start = time.perf_counter()
    step = 5000
    for n in range(0, entries, step):
        await asyncio.gather(*(writer.append("image-anchored", PAYLOAD) for _ in range(min(step, entries - n))))
    rate = entries / (time.perf_counter() - start)
    await writer.sign_checkpoint()
    await writer.stop()
    await store.close()
    return rate


async def proofs(path: Path, entries: int, key: Ed25519PrivateKey, samples: int) -> tuple[list[float], list[float]]:
    store = await LedgerStore.open(path)
    trusted = load_trust_text(verifier_key(ORIGIN, key.public_key()) + "\n")
    make_ms, check_ms = [], []
    rng = random.Random(1)
    for _ in range(samples):
        index = rng.randrange(entries)
        t0 = time.perf_counter()
        size, note = await store.latest_checkpoint(ORIGIN, at_least=index + 1)  # type: ignore[misc]
        data = format_proof_file(InclusionProofFile(
            entry=await store.entry(ORIGIN, index), index=index,
            proof=tuple(await store.inclusion_proof(ORIGIN, index, size)), checkpoint_note=note,
        ))
        t1 = time.perf_counter()
        check_proof_file(parse_proof_file(data), trusted)
        t2 = time.perf_counter()
        make_ms.append((t1 - t0) * 1000)
        check_ms.append((t2 - t1) * 1000)
    await store.close()
    return make_ms, check_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="ledger-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    rows: list[tuple[str, str, str]] = []
    group = asyncio.run(sustained(workdir / "a.db", args.seconds, 256, 2000))
    single = asyncio.run(sustained(workdir / "b.db", args.seconds, 256, 1))
    rows.append(("appends/s, group commit (256 concurrent appenders)", f"{group:,.0f}", ">= 5,000"))
    rows.append(("appends/s, one commit per entry (baseline, same writer)", f"{single:,.0f}", ""))
    rows.append(("group commit / one commit per entry", f"{group / single:.1f}x", ""))

    key = Ed25519PrivateKey.generate()
    big = workdir / "big.db"
    rate = asyncio.run(build(big, args.entries, key))
    rows.append((f"bulk build of {args.entries:,} entries, appends/s", f"{rate:,.0f}", ""))
    make_ms, check_ms = asyncio.run(proofs(big, args.entries, key, 1000))
    rows.append((f"proof generation at {args.entries:,}, ms p50 / p99",
                 f"{statistics.median(make_ms):.2f} / {sorted(make_ms)[989]:.2f}", "< 5"))
    rows.append((f"proof check at {args.entries:,}, ms p50 / p99",
                 f"{statistics.median(check_ms):.2f} / {sorted(check_ms)[989]:.2f}", "< 5"))
    t0 = time.perf_counter()
    report = verify_database(big, {ORIGIN: key.public_key()})
    verify_s = time.perf_counter() - t0
    assert report.ok, report.problem
    rows.append((f"verify of {args.entries:,} entries, s", f"{verify_s:.1f}", "< 60"))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>16}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>16}  {target}")
    print(f"(work files in {workdir})")


if __name__ == "__main__":
    main()
