"""Kill -9 while four senders store at once (several batches in flight: files durable,
entries being signed and committed, index rows being written), then restart: nothing a
sender was told Success for is lost, and the index and the ledger agree, row for anchor.
The crash-safety argument these check is in docs/design.md, "One durable commit per image"."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from dicomledger.ledger.entries import IMAGE_ANCHORED, decode_entry
from tests import dicomdata
from tests.conftest import GatewayProcess

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools

SENDERS = 4
PER_SENDER = 120


def acknowledged(output: str) -> list[Path]:
    """The files storescu -v was answered Success for."""
    found, current = [], None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            found.append(Path(current))
    return found


def own_anchors(gw: GatewayProcess) -> dict[int, dict]:
    """Index -> payload of every image-anchored entry of the gateway's own log."""
    con = sqlite3.connect(f"file:{gw.dir / 'data' / 'ledger.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.idx, e.data FROM entries e JOIN origins o ON o.id = e.origin_id WHERE o.name = ?",
            (gw.origin,),
        ).fetchall()
    finally:
        con.close()
    entries = (decode_entry(bytes(data)) for _, data in rows)
    return {e.index: dict(e.payload) for e in entries if e.kind == IMAGE_ANCHORED}


def test_sigkill_with_four_senders_loses_nothing_and_leaves_index_and_ledger_in_step(tmp_path):
    gw = GatewayProcess(tmp_path / "gw")
    gw.start()
    outputs, senders = [], []
    for k in range(SENDERS):
        files = dicomdata.make_mr_series(tmp_path / f"mr{k}", PER_SENDER, seed=f"crash-{k}")
        outputs.append(tmp_path / f"storescu-{k}.out")
        senders.append(gw.storescu_in_background(files, outputs[-1]))
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline
        and sum(len(acknowledged(o.read_text())) for o in outputs) < SENDERS * 25
    ):
        time.sleep(0.005)
    gw.kill()
    for sender in senders:
        sender.wait(timeout=60)
    acked = [f for o in outputs for f in acknowledged(o.read_text())]
    assert SENDERS * 25 <= len(acked) < SENDERS * PER_SENDER, (
        "the kill came too late to test anything"
    )

    gw.start()
    try:
        images = gw.dir / "data" / "images"
        con = sqlite3.connect(f"file:{gw.dir / 'data' / 'index.db'}?mode=ro", uri=True)
        try:
            rows = {
                uid: (path, sha, idx)
                for uid, path, sha, idx in con.execute(
                    "SELECT sop_instance_uid, path, sha256, ledger_index FROM instances"
                )
            }
        finally:
            con.close()
        for f in acked:  # every Success: a row, its anchor and its file
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert uid in rows, f"{f.name} was acknowledged but has no index row"
            path, _, idx = rows[uid]
            assert idx is not None and (images / path).is_file(), (
                f"{f.name}: row without anchor or file"
            )
        anchors = own_anchors(gw)
        for uid, (path, sha, idx) in rows.items():  # every row cites an anchor of its own pixels
            assert idx in anchors, f"row of {uid} cites entry {idx}, which anchors nothing"
            assert anchors[idx]["sha256"] == bytes(sha).hex()
            assert (images / path).is_file()
        cited = {idx for _, _, idx in rows.values()}
        assert set(anchors) <= cited, (
            f"anchors without an index row: {sorted(set(anchors) - cited)[:5]}"
        )
        assert list((images / "tmp").iterdir()) == []
        for f in acked[:: max(1, len(acked) // 8)]:
            assert gw.cli("verify-file", str(f)).returncode == 0
        # the senders' unacknowledged images arrive when sent again, as new or as duplicates
        for k in range(SENDERS):
            rest = sorted((tmp_path / f"mr{k}").iterdir())
            assert gw.storescu(*rest).returncode == 0
    finally:
        gw.stop()
    verify = gw.cli("verify")
    assert verify.returncode == 0, verify.stdout
