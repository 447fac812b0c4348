"""Bare pynetdicom Storage SCP: the baseline the gateway is measured against.

    .venv/bin/python bench/bare_scp.py --port 11113 --output-dir /tmp/out [--ae-title BARESCP]
                                       [--allow STORESCU --allow BENCHSCU]

The pynetdicom settings the gateway used before its own DICOM layer (dicomledger/dicom/net):
chunked receive into a temp file on the output file system, maximum PDU 0 (unlimited), 64
associations, 60 s timeouts, all storage SOP classes with all transfer syntaxes, Verification. The C-STORE
handler only moves pynetdicom's temp file into the output folder (os.replace: no fsync, no
parsing, no hashing) and answers Success.

Prints "ready <port>" on stdout once it listens; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

SUCCESS = 0x0000
_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def file_name(sop_instance_uid: str) -> str:
    uid = sop_instance_uid.strip("\x00 ")
    if _SAFE_UID.match(uid) and len(uid) <= 64:
        return f"{uid}.dcm"
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".dcm"


def make_ae(ae_title: str, allowed: list[str] | None, max_pdu: int, max_associations: int) -> AE:
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = False
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = max_pdu
    if allowed:
        ae.require_calling_aet = allowed
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60.0
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    return ae


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--ae-title", default="BARESCP")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--allow", action="append", default=[], help="calling AE title (repeat); none = any"
    )
    parser.add_argument("--max-pdu", type=int, default=0)
    parser.add_argument("--max-associations", type=int, default=64)
    args = parser.parse_args(argv)

    out: Path = args.output_dir
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(tmp)  # pynetdicom's temp files land on the output file system

    def on_store(event: evt.Event) -> int:
        os.replace(event.dataset_path, out / file_name(str(event.request.AffectedSOPInstanceUID)))
        return SUCCESS

    def on_echo(event: evt.Event) -> int:
        return SUCCESS

    ae = make_ae(args.ae_title, args.allow or None, args.max_pdu, args.max_associations)
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, on_echo)]
    server = ae.start_server((args.host, args.port), block=False, evt_handlers=handlers)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"ready {server.server_address[1]}", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
