"""Ledger core benchmark: appends/s with group commit, proofs and verify at 1,000,000 entries.

    .venv/bin/python bench/ledger_bench.py [--entries 1000000] [--seconds 10] [--dir DIR]

Prints one table. The side-by-side baseline for appends is the same writer forced to
commit every entry alone (no group commit), measured in the same run. The auditor's verify
runs as `dicomledger verify --ledger --trust` in its own process, under a 2-of-3 witness
policy; its baseline is the same command re-checking every entry's own signature (what
verify did before checkpoints authenticated the entries they cover). The big log rotates its
key twice (at a third and two thirds of it), so verify and the proof checks follow a key
chain from the first key, as the trust file's key-change lines give it. The last rows say
whether Ed25519 verification and JSON decoding release the GIL (another thread's progress
during one long call), and what two processes give for decoding and hashing entries.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import machine_facts  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from dicomledger.ledger import merkle  # noqa: E402
from dicomledger.ledger.entries import decode_entry, verify_entry_signature  # noqa: E402
from dicomledger.ledger.identity import Identity  # noqa: E402
from dicomledger.ledger.log import LedgerStore, LogWriter  # noqa: E402
from dicomledger.ledger.note import (  # noqa: E402
    SIG_COSIGNATURE_V1,
    cosign_checkpoint,
    parse_note,
    verifier_key,
)
from dicomledger.ledger.proof import (  # noqa: E402
    InclusionProofFile,
    check_proof_file,
    format_proof_file,
    parse_proof_file,
)
from dicomledger.ledger.trust import key_change_line, load_trust  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WITNESSES = {w: Ed25519PrivateKey.generate() for w in "BCD"}  # D never cosigns

ORIGIN = "bench.example/dicomledger"
PAYLOAD = {
    "patient": "ab" * 32,
    "study": "cd" * 32,
    "series": "ef" * 32,
    "instance": "01" * 32,
    "hash_method": "pixel",
    "sha256": "02" * 32,
    "decoded_sha256": "03" * 32,
    "frames": 1,
    "frame_root": "04" * 32,
    "sop_class": "1.2.840.10008.5.1.4.1.1.2",
    "transfer_syntax": "1.2.840.10008.1.2.1",
    "calling_ae": "STORESCU",
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


async def build(path: Path, entries: int, key: Ed25519PrivateKey) -> tuple[float, str]:
    """The big log, two key rotations in it; (appends/s, the trust file's key-change lines)."""
    store = await LedgerStore.open(path)
    writer = LogWriter(store, Identity(ORIGIN, key), max_batch=5000)
    await writer.start()
    start = time.perf_counter()
    step = 5000
    rotate_at = {entries // 3 // step * step, 2 * entries // 3 // step * step}
    changes = []
    for n in range(0, entries, step):
        if n in rotate_at and n:
            changes.append(
                key_change_line((await writer.rotate(Ed25519PrivateKey.generate())).data) + "\n"
            )
        await asyncio.gather(
            *(writer.append("image-anchored", PAYLOAD) for _ in range(min(step, entries - n)))
        )
    rate = entries / (time.perf_counter() - start)
    await writer.sign_checkpoint()
    await writer.stop()
    await store.close()
    return rate, "".join(changes)


async def proofs(
    path: Path, entries: int, key: Ed25519PrivateKey, changes: str, samples: int
) -> tuple[list[float], list[float]]:
    store = await LedgerStore.open(path)
    trusted = load_trust(verifier_key(ORIGIN, key.public_key()) + "\n" + changes)
    make_ms, check_ms = [], []
    rng = random.Random(1)
    for _ in range(samples):
        index = rng.randrange(entries)
        t0 = time.perf_counter()
        size, note = await store.latest_checkpoint(ORIGIN, at_least=index + 1)  # type: ignore[misc]
        data = format_proof_file(
            InclusionProofFile(
                entry=await store.entry(ORIGIN, index),
                index=index,
                proof=tuple(await store.inclusion_proof(ORIGIN, index, size)),
                checkpoint_note=note,
            )
        )
        t1 = time.perf_counter()
        check_proof_file(parse_proof_file(data), trusted)
        t2 = time.perf_counter()
        make_ms.append((t1 - t0) * 1000)
        check_ms.append((t2 - t1) * 1000)
    await store.close()
    return make_ms, check_ms


def witnessed(path: Path, key: Ed25519PrivateKey, changes: str) -> str:
    """B and C cosign the newest checkpoint of the log; returns the auditor's trust file text:
    the log's vkey and the policy 2 of {B, C, D}."""

    async def cosign() -> None:
        store = await LedgerStore.open(path)
        size, note = await store.latest_checkpoint(ORIGIN)  # type: ignore[misc]
        text = parse_note(note).text
        for w in "BC":
            await store.add_cosignature(
                ORIGIN,
                size,
                cosign_checkpoint(text, f"{w.lower()}.example", WITNESSES[w], int(time.time())),
            )
        await store.close()

    asyncio.run(cosign())
    return "".join(
        [
            verifier_key(ORIGIN, key.public_key()) + "\n",
            changes,
            *(
                f"witness {w} {verifier_key(f'{w.lower()}.example', k.public_key(), SIG_COSIGNATURE_V1)}\n"
                for w, k in WITNESSES.items()
            ),
            "group consortium 2 B C D\nquorum consortium\n",
        ]
    )


async def policy_checks(path: Path, entries: int, trust_text: str, samples: int) -> list[float]:
    """ms per `check-proof` under the policy: parse, checkpoint signature, inclusion,
    cosignatures and quorum, the entry's canonical form and own signature."""
    trust = load_trust(trust_text)
    store = await LedgerStore.open(path)
    rng = random.Random(2)
    times = []
    for _ in range(samples):
        index = rng.randrange(entries)
        size, note = await store.latest_checkpoint(ORIGIN, at_least=index + 1)  # type: ignore[misc]
        data = format_proof_file(
            InclusionProofFile(
                entry=await store.entry(ORIGIN, index),
                index=index,
                proof=tuple(await store.inclusion_proof(ORIGIN, index, size)),
                checkpoint_note=note,
            )
        )
        t0 = time.perf_counter()
        proof = parse_proof_file(data)
        result = check_proof_file(proof, trust)
        entry = decode_entry(proof.entry)
        assert entry.index == index and result.quorum is not None
        verify_entry_signature(entry, trust.log_chain(ORIGIN).entry_key(entry.index))  # type: ignore[union-attr]
        times.append((time.perf_counter() - t0) * 1000)
    await store.close()
    return times


def auditor_verify(path: Path, trust_file: Path, *extra: str) -> float:
    """Seconds of `dicomledger verify --ledger --trust`, in its own process."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomledger.cli",
            "verify",
            "--ledger",
            str(path),
            "--trust",
            str(trust_file),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not re.search(r"witness quorum met", done.stdout):
        raise SystemExit(f"verify failed:\n{done.stdout}{done.stderr}")
    return seconds


def _decode_and_hash(items: Sequence[bytes]) -> None:
    for data in items:
        decode_entry(data)
        merkle.leaf_hash(data)


def _two_processes_vs_one(items: Sequence[bytes]) -> float:
    """Time for all items in this process over time for half each in two worker processes
    (a pool started beforehand). Only meaningful when the machine has two idle cores."""

    def one() -> float:
        t0 = time.perf_counter()
        _decode_and_hash(items)
        return time.perf_counter() - t0

    def two(pool: ProcessPoolExecutor) -> float:
        t0 = time.perf_counter()
        list(pool.map(_decode_and_hash, [items[0::2], items[1::2]]))
        return time.perf_counter() - t0

    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_decode_and_hash, [items[:2], items[2:4]]))  # both workers started
        return min(one() for _ in range(3)) / min(two(pool) for _ in range(3))


def _other_thread_pace(call: Callable[[], object], reference: Callable[[], object]) -> float:
    """How far a pure-Python thread gets during one long ``call``, relative to how far it gets
    during ``reference`` (a call known to release the GIL), per second. Near 0: ``call``
    holds the GIL; near 1 (or above): it releases it. Robust to a loaded machine, unlike
    comparing 1 thread with 2."""
    count, stop = [0], threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1

    def pace(fn: Callable[[], object]) -> float:
        before, t0 = count[0], time.perf_counter()
        fn()
        return (count[0] - before) / (time.perf_counter() - t0)

    runner = threading.Thread(target=counter)
    runner.start()
    try:
        time.sleep(0.1)
        return statistics.median(pace(call) / pace(reference) for _ in range(3))
    finally:
        stop.set()
        runner.join()


def gil_rows(path: Path) -> list[tuple[str, str, str]]:
    import cryptography

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    datas = [bytes(d) for (d,) in con.execute("SELECT data FROM entries ORDER BY idx LIMIT 20000")]
    con.close()
    key = Ed25519PrivateKey.generate()
    message = b"m" * 100_000_000
    signature = key.sign(message)
    document = json.dumps({f"k{i}": "v" * 50 for i in range(200_000)})
    releases = lambda: hashlib.sha256(message).digest()  # noqa: E731 (hashlib: >= 2 KiB)
    verify_pace = _other_thread_pace(lambda: key.public_key().verify(signature, message), releases)
    decode_pace = _other_thread_pace(lambda: json.loads(document), releases)
    return [
        (
            f"another thread's pace during Ed25519 verify (cryptography {cryptography.__version__})",
            f"{verify_pace:.0%}",
            "~100%: releases the GIL",
        ),
        ("another thread's pace during JSON decoding", f"{decode_pace:.0%}", "~0%: holds the GIL"),
        (
            "entry decode + leaf hash: 2 processes vs 1 (needs 2 idle cores)",
            f"{_two_processes_vs_one(datas):.2f}x",
            "",
        ),
    ]


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
    rate, changes = asyncio.run(build(big, args.entries, key))
    rows.append(
        (f"bulk build of {args.entries:,} entries (2 key rotations), appends/s", f"{rate:,.0f}", "")
    )
    make_ms, check_ms = asyncio.run(proofs(big, args.entries, key, changes, 1000))
    rows.append(
        (
            f"proof generation at {args.entries:,}, ms p50 / p99",
            f"{statistics.median(make_ms):.2f} / {sorted(make_ms)[989]:.2f}",
            "< 5",
        )
    )
    rows.append(
        (
            f"proof check at {args.entries:,}, ms p50 / p99",
            f"{statistics.median(check_ms):.2f} / {sorted(check_ms)[989]:.2f}",
            "< 5",
        )
    )

    trust_text = witnessed(big, key, changes)
    trust_file = workdir / "trust.txt"
    trust_file.write_text(trust_text)
    policy_ms = asyncio.run(policy_checks(big, args.entries, trust_text, 1000))
    rows.append(
        (
            "check-proof under a 2-of-3 witness policy, ms p50 / p99",
            f"{statistics.median(policy_ms):.2f} / {sorted(policy_ms)[989]:.2f}",
            "< 5",
        )
    )
    audit_s = auditor_verify(big, trust_file)
    rows.append(
        (
            f"auditor's verify (--ledger --trust, 2-of-3 policy) of {args.entries:,} entries, s",
            f"{audit_s:.1f}",
            "< 30",
        )
    )
    every_s = auditor_verify(big, trust_file, "--every-signature")
    rows.append(
        (
            "  the same, re-checking every entry's own signature (former method), s",
            f"{every_s:.1f}",
            "",
        )
    )
    rows += gil_rows(big)

    width = max(len(r[0]) for r in rows)
    print(machine_facts())
    print(f"{'measure'.ljust(width)}  {'value':>16}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>16}  {target}")
    print(f"(work files in {workdir})")


if __name__ == "__main__":
    main()
