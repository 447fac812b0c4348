"""The metrics and health endpoint: scraped with real HTTP clients (curl,
urllib) while DCMTK's storescu and a pynetdicom SCU send to a gateway process."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomledger.config import load_config
from dicomledger.gateway import Gateway
from tests.conftest import GatewayProcess, consortium, dcmtk, free_port
from tests.dicomdata import make_ct_series

pytestmark = pytest.mark.e2e  # starts gateways or DCMTK tools


def enable_metrics(gw: GatewayProcess) -> int:
    port = free_port()
    with open(gw.config, "a") as f:
        f.write(f'\n[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n')
    return port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics with curl, parsed by prometheus_client's own parser: (sample name, labels) -> value."""
    run = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(run.stdout)
        for s in family.samples
    }


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def test_metrics_scraped_during_a_send(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "ECHOSCU", "PYSCU"))
    port = enable_metrics(gw)
    gw.start()
    try:
        assert get(port, "/healthz")[0] == 200
        status, ready = get(port, "/readyz")
        assert (
            status,
            ready["status"],
            ready["dicom_listening"],
            ready["ledger_writable"],
            ready["checkpoint_fresh"],
        ) == (200, "ready", True, True, True)
        before = scrape(port)
        assert value(before, "dicomledger_associations_open") == 0
        assert value(before, "dicomledger_c_store_duration_seconds_count") == 0
        entries_before = value(before, "dicomledger_ledger_entries")

        files = make_ct_series(tmp_path / "ct", 6, rows=64, cols=64)
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
        assert assoc.is_established
        try:
            for path in files[:3]:
                assert assoc.send_c_store(str(path)).Status == 0x0000
            during = scrape(port)  # the association is still open
        finally:
            assoc.release()
        assert value(during, "dicomledger_associations_open") == 1
        assert value(during, "dicomledger_c_store_total", status="0x0000") == 3
        assert value(during, "dicomledger_c_store_duration_seconds_count") == 3
        assert value(during, "dicomledger_c_store_duration_seconds_bucket", le="+Inf") == 3
        assert value(during, "dicomledger_c_store_duration_seconds_sum") > 0
        sizes = sum(p.stat().st_size for p in files[:3])
        # the received data sets as stored (a Part 10 header on each): at least the files' data sets
        assert value(during, "dicomledger_received_bytes_total") >= sizes * 0.9
        assert value(during, "dicomledger_ledger_entries") >= entries_before + 3

        assert gw.storescu(*files[3:]).returncode == 0
        assert (
            dcmtk(
                "echoscu", "-aet", "INTRUDER", "-aec", gw.ae_title, "127.0.0.1", str(gw.port)
            ).returncode
            != 0
        )
        after = scrape(port)
        assert value(after, "dicomledger_associations_open") == 0
        assert value(after, "dicomledger_associations_total", outcome="released") == 2
        assert value(after, "dicomledger_associations_total", outcome="refused") == 1
        assert value(after, "dicomledger_c_store_total", status="0x0000") == 6
        assert value(after, "dicomledger_tamper_alarms_total") == 0
        assert value(after, "dicomledger_retrievals_total", outcome="retrieved") == 0
        assert value(after, "dicomledger_checkpoint_age_seconds") >= 0
        assert value(after, "process_resident_memory_bytes") > 0
        # a second C-STORE of one instance under another patient: refused with its own status
        assert ("dicomledger_c_store_total", (("status", "0xC000"),)) not in after
    finally:
        gw.stop()
    assert "Traceback" not in gw.log()


def test_peer_and_forward_queue_metrics(tmp_path: Path) -> None:
    a, b = consortium(tmp_path, 2)
    port = enable_metrics(a)
    with open(a.config, "a") as f:  # a destination nobody listens at
        f.write(f'\n[[destinations]]\nae_title = "NOWHERE"\naddress = "127.0.0.1:{free_port()}"\n')
    for gw in (a, b):
        gw.start()
    try:
        assert b.storescu(*make_ct_series(tmp_path / "ct", 2, rows=32, cols=32)).returncode == 0
        metrics = {}
        for _ in range(100):  # until A has pulled B's entries by gossip
            metrics = scrape(port)
            lag = metrics.get(("dicomledger_peer_lag_entries", (("peer", b.origin),)))
            if value(metrics, "dicomledger_peer_reachable", peer=b.origin) == 1 and lag == 0:
                break
            subprocess.run(["sleep", "0.2"], check=True)
        assert value(metrics, "dicomledger_peer_reachable", peer=b.origin) == 1
        assert value(metrics, "dicomledger_peer_flagged", peer=b.origin) == 0
        assert value(metrics, "dicomledger_peer_lag_entries", peer=b.origin) == 0
        for state in ("queued", "failed", "parked"):
            assert (
                value(metrics, "dicomledger_forward_jobs", destination="NOWHERE", state=state) == 0
            )
    finally:
        for gw in (b, a):
            gw.stop()


def test_metrics_port_in_use_is_a_clean_start_failure(tmp_path: Path) -> None:
    import socket

    gw = GatewayProcess(tmp_path / "gw")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with open(gw.config, "a") as f:
            f.write(f"\n[metrics]\nenabled = true\nport = {taken.getsockname()[1]}\n")
        with pytest.raises(RuntimeError, match="gateway exited at start"):
            gw.start()
    log = gw.log()
    assert "cannot start the metrics endpoint on 127.0.0.1" in log
    assert "Traceback" not in log


async def test_readyz_fails_once_the_dicom_listener_is_closed(tmp_path: Path) -> None:
    """In process: /readyz answers 503 naming the check once the DICOM listener stops (as
    at shutdown), while /healthz still answers."""
    gw = GatewayProcess(tmp_path / "gw")
    port = enable_metrics(gw)
    gateway = Gateway(load_config(gw.config))
    await gateway.start()
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as answer:
                assert answer.status == 200
            assert gateway.server is not None
            await gateway.server.stop(grace=0.1)
            async with http.get(f"http://127.0.0.1:{port}/readyz") as answer:
                assert answer.status == 503
                body = await answer.json()
                assert body["dicom_listening"] is False and body["ledger_writable"] is True
            async with http.get(f"http://127.0.0.1:{port}/healthz") as answer:
                assert answer.status == 200
    finally:
        await gateway.stop()


def test_retrievals_and_tamper_alarms_are_counted(tmp_path: Path) -> None:
    """DCMTK getscu retrieves a granted study (one retrieval), then again after one stored file
    was altered (a tamper alarm, and the rest retrieved)."""
    import sqlite3

    import pydicom

    from tests.test_gateway_interop import grant, patient_files

    gw = GatewayProcess(tmp_path / "gw", allow=("STORESCU", "WS1"))
    port = enable_metrics(gw)
    gw.start()
    try:
        patient, study, files = patient_files(tmp_path, "metrics-get")
        assert gw.storescu(*files).returncode == 0
        grant(gw, patient, "WS1")
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
        for n in (1, 2):
            if n == 2:  # alter one stored file
                con = sqlite3.connect(f"file:{gw.dir / 'data' / 'index.db'}?mode=ro", uri=True)
                uid = str(pydicom.dcmread(files[0]).SOPInstanceUID)
                (relative,) = con.execute(
                    "SELECT path FROM instances WHERE sop_instance_uid = ?", (uid,)
                ).fetchone()
                con.close()
                stored = gw.dir / "data" / "images" / relative
                data = bytearray(stored.read_bytes())
                data[-5] ^= 0xFF
                stored.write_bytes(bytes(data))
            got = tmp_path / f"got{n}"
            got.mkdir()
            dcmtk(
                "getscu",
                "-aet",
                "WS1",
                "-aec",
                gw.ae_title,
                "-S",
                "-od",
                str(got),
                *keys,
                "127.0.0.1",
                str(gw.port),
            )
            metrics = scrape(port)
            assert value(metrics, "dicomledger_retrievals_total", outcome="retrieved") == n
            assert value(metrics, "dicomledger_tamper_alarms_total") == n - 1
    finally:
        gw.stop()
