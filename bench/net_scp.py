"""The asyncio DICOM layer (dicomledger/dicom/net) as a bare Storage SCP, for net_bench.py.

    .venv/bin/python bench/net_scp.py --port 11113 --output-dir /tmp/out [--ae-title NETSCP]
                                      [--allow STORESCU ...] [--uvloop]

Same settings as bench/bare_scp.py (maximum PDU 0, 64 associations, 60 s timeouts, every
storage SOP class with every transfer syntax, Verification). The on_store handler does what
bare_scp's does and no more: move the temp file into the output folder (os.replace: no
fsync, no parsing, no hashing) and answer Success.

Prints "ready <port>" on stdout once it listens; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's dicomledger

from bare_scp import file_name  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from dicomledger.dicom.net import (
    DicomServer,  # noqa: E402
    StoreRequest,  # noqa: E402
)

SUCCESS = 0x0000


async def serve(args: argparse.Namespace) -> None:
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    async def on_store(request: StoreRequest) -> int:
        request.dataset_path.replace(out / file_name(request.sop_instance_uid))
        return SUCCESS

    server = DicomServer(
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        allowed_calling_aes=args.allow or None,
        on_store=on_store,
        temp_dir=out / "tmp",
        max_associations=args.max_associations,
        max_pdu_size=args.max_pdu,
        network_timeout=60.0,
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {server.port}", flush=True)
    await stop.wait()
    await server.stop(grace=5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--ae-title", default="NETSCP")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--allow", action="append", default=[], help="calling AE title (repeat); none = any"
    )
    parser.add_argument("--max-pdu", type=int, default=0)
    parser.add_argument("--max-associations", type=int, default=64)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
