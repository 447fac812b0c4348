"""Parse + hash benchmark: the ingest's per-image work on a received file, fast path vs pydicom path.

    .venv/bin/python bench/parse_bench.py [--quick] [--images 200] [--reps 5] [--mf-mb 1000] [--keep] [--work-dir DIR]

What the gateway does with each received file in its worker thread, before storing it:
read the header, hash the pixel data (value, frames, canonical values), check the header
against the C-STORE request. Two ways, on the same files, alternating file by file:

  fast     dicomledger.dicom.fastread.read_instance_fast (struct over the header bytes)
  pydicom  pixelhash.hash_instance_file + instance.instance_header (the path before it)

Sets: MR 64x64 16 bit, CT 512x512 16 bit (12 stored), and one native multi-frame object of
512x512x16 bit frames, about --mf-mb MB (default 1000; --quick: 100 MB, fewer images). Each
file is read once before timing (page cache). Prints the median per image (and MB/s) for
each way, the ratio, and which parser the gateway's read_instance picks. Not part of the
test suite; no network, no processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import (  # bench/ is sys.path[0] when run as a script
    ROOT,
    machine_facts,
    run_in_work_dir,
)

sys.path.insert(0, str(ROOT))
import pydicom  # noqa: E402
from pydicom import config as pydicom_config  # noqa: E402

from dicomledger.dicom.fastread import read_instance, read_instance_fast  # noqa: E402
from dicomledger.dicom.instance import instance_header  # noqa: E402
from dicomledger.dicom.pixelhash import hash_instance_file  # noqa: E402
from tests.dicomdata import make_ct_series, make_mr_series, make_multiframe  # noqa: E402

MB = 1_000_000
TARGET_MR_FAST_US = 200  # the fast path on a 64x64 MR image, median


def pydicom_path(path: Path, sop_class: str, sop_instance: str) -> None:
    hashes = hash_instance_file(path, None)
    assert hashes.header is not None
    instance_header(hashes.header, hashes.header_sha256, sop_class, sop_instance)


def fast_path(path: Path, sop_class: str, sop_instance: str) -> None:
    read_instance_fast(path, None, sop_class_uid=sop_class, sop_instance_uid=sop_instance)


WAYS: dict[str, Callable[[Path, str, str], None]] = {"fast": fast_path, "pydicom": pydicom_path}


def measure(files: list[Path], reps: int) -> dict[str, list[float]]:
    """Seconds per file for each way, alternating which goes first, `reps` passes."""
    uids = {}
    for path in files:
        path.read_bytes()  # into the page cache
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids[path] = (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for rep in range(reps):
        for n, path in enumerate(files):
            order = list(WAYS) if (n + rep) % 2 == 0 else list(reversed(WAYS))
            for way in order:
                started = time.perf_counter()
                WAYS[way](path, *uids[path])
                times[way].append(time.perf_counter() - started)
    return times


def parser_used(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return read_instance(
        path,
        None,
        max_inflated_size=None,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
    ).parser


def run(work: Path, args: argparse.Namespace) -> int:
    pydicom_config.settings.reading_validation_mode = (
        pydicom_config.IGNORE
    )  # as the gateway runs it
    images = 30 if args.quick else args.images
    mf_mb = 100 if args.quick else args.mf_mb
    frame_bytes = 512 * 512 * 2
    print(
        f"generating {images} MR, {max(images // 5, 4)} CT, one multi-frame of ~{mf_mb} MB in {work}",
        file=sys.stderr,
    )
    sets = {
        "MR 64x64": make_mr_series(work / "mr", images),
        "CT 512x512": make_ct_series(work / "ct", max(images // 5, 4)),
        f"multi-frame {mf_mb} MB": [
            make_multiframe(work / "mf", max(mf_mb * MB // frame_bytes, 1), 512, 512)
        ],
    }
    rows = []
    for name, files in sets.items():
        reps = args.reps if len(files) > 1 else max(args.reps // 2, 2)
        times = measure(files, reps)
        size = statistics.median(p.stat().st_size for p in files)
        fast, slow = statistics.median(times["fast"]), statistics.median(times["pydicom"])
        rows.append((name, size, fast, slow, parser_used(files[0])))
    print(
        f"\nparse + hash per image, medians ({args.reps} passes; the multi-frame: {max(args.reps // 2, 2)})"
    )
    print(
        f"{'set':<22}{'file':>10}  {'fast':>11}  {'pydicom':>11}  {'fast MB/s':>10}  {'pydicom MB/s':>12}  "
        f"{'speed-up':>8}  read_instance uses"
    )
    for name, size, fast, slow, parser in rows:
        print(
            f"{name:<22}{size / MB:>8.2f}MB  {_duration(fast):>11}  {_duration(slow):>11}  "
            f"{size / fast / MB:>10.0f}  {size / slow / MB:>12.0f}  {slow / fast:>7.1f}x  {parser}"
        )
    mr_fast = rows[0][2] * 1e6
    mark = "ok" if mr_fast < TARGET_MR_FAST_US else "MISSED"
    print(f"\ntarget: MR fast path < {TARGET_MR_FAST_US} us: {mr_fast:.0f} us  [{mark}]")
    print(machine_facts())
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 MR, 6 CT, a 100 MB multi-frame")
    parser.add_argument("--images", type=int, default=200, help="MR images (CT: a fifth of it)")
    parser.add_argument("--reps", type=int, default=5, help="passes over each set")
    parser.add_argument(
        "--mf-mb", type=int, default=1000, help="size of the multi-frame object in MB"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to create the work dir")
    args = parser.parse_args()
    return run_in_work_dir("parse-bench-", args.work_dir, args.keep, lambda work: run(work, args))


if __name__ == "__main__":
    sys.exit(main())
