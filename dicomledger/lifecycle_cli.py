"""The commands for data over years: `erase`, `retention` and `scrub` (through the running
gateway's admin socket, like `grant`: one process writes the log, and the erasure or scrub
cannot race the gateway's own work), `backup` (reads the databases directly, while the
gateway serves) and `restore` (the gateway stopped)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicomledger.config import Config
from dicomledger.ledger.erasure import ADMIN_REASONS

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def add_parsers(sub: Any, with_config: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = with_config(
        "erase",
        "erase a patient's (or one study's) images, index rows and pending forwards "
        "(through the running gateway)",
    )
    p.add_argument(
        "--patient-id", required=True, help="the Patient ID; only its pseudonym is sent or written"
    )
    p.add_argument("--study", metavar="UID", help="erase only this study of the patient")
    p.add_argument(
        "--reason",
        required=True,
        choices=ADMIN_REASONS,
        help="reason code written on the ledger (no free text: it could carry PHI)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be erased; change nothing"
    )
    p = with_config("retention", "apply the retention policy now (through the running gateway)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the studies that would be erased; change nothing",
    )
    p = with_config(
        "scrub", "re-hash every stored instance and check its index row against the ledger now"
    )
    p.add_argument("--study", metavar="UID", help="only this study")
    p.add_argument(
        "--max-rate", type=float, metavar="MB/s", help="read at most this fast (default: unlimited)"
    )
    p = with_config(
        "backup", "take an online backup of the ledger, index, forward queue and images"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="a new directory for the backup"
    )
    p.add_argument(
        "--copy", action="store_true", help="copy the images (default: hard links where possible)"
    )
    p = with_config("restore", "put a backup back as this gateway's data (the gateway stopped)")
    p.add_argument(
        "--from", dest="source", required=True, metavar="DIR", help="the backup directory"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="move existing data aside (never deleted) and restore",
    )
    p.add_argument(
        "--link",
        action="store_true",
        help="hard-link the images from the backup instead of copying",
    )


def _admin(config: Config, action: str, body: dict[str, Any]) -> dict[str, Any] | int:
    from dicomledger.cli import _admin as call

    return call(config, action, body)


def _pseudonyms(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from dicomledger.cli import _pseudonyms as pseudonymise

    return pseudonymise(args, config)


def _study_lines(studies: list[dict[str, Any]]) -> list[str]:
    lines = []
    for s in studies:
        date = s.get("study_date") or "no study date"
        modalities = "/".join(s.get("modalities") or []) or "?"
        extra = f", kept {s['keep_years']} years" if "keep_years" in s else ""
        lines.append(
            f"  study {s['study_uid']} of patient {s['patient_id']} ({date}, {modalities}{extra}): "
            f"{s['instances']} instances"
        )
    return lines


def cmd_erase(args: argparse.Namespace, config: Config) -> int:
    body = {**_pseudonyms(args, config), "reason": args.reason, "dry_run": args.dry_run}
    answer = _admin(config, "erase", body)
    if isinstance(answer, int):
        return answer
    what = (
        f"{answer['instances']} instances ({answer['files']} files), {answer['forward_jobs']} pending forwards, "
        f"from {len(answer['studies'])} studies"
    )
    if answer["dry_run"]:
        print(f"would erase {what}:")
        print("\n".join(_study_lines(answer["studies"])))
        print("nothing was changed (dry run)")
        return EXIT_OK
    print(f"erased {what}")
    print("\n".join(_study_lines(answer["studies"])))
    print(f"recorded as {answer['origin']} entry {answer['index']} (reason {args.reason})")
    return EXIT_OK


def cmd_retention(args: argparse.Namespace, config: Config) -> int:
    answer = _admin(config, "retention", {"dry_run": args.dry_run})
    if isinstance(answer, int):
        return answer
    if not answer["rules"]:
        print("no retention rules ([[retention.rules]] in the config): nothing is erased by age")
        return EXIT_OK
    studies = answer["studies"]
    if answer["dry_run"]:
        print(
            f"would erase {len(studies)} studies past their retention period:"
            if studies
            else "no study is past its retention period"
        )
    else:
        print(
            f"erased {len(studies)} studies past their retention period"
            if studies
            else "no study is past its retention period"
        )
    print("\n".join(_study_lines(studies)))
    for s in studies:
        if "index" in s:
            print(f"  study {s['study_uid']}: erased entry {s['index']}")
    for s in answer["skipped"]:
        print(
            f"  skipped study {s['study_uid']} of patient {s['patient_id']}: no valid Study Date "
            f"({s['study_date'] or 'empty'})"
        )
    return EXIT_OK


def cmd_scrub(args: argparse.Namespace, config: Config) -> int:
    body = {**_pseudonyms(args, config), "max_rate_mb_s": args.max_rate}
    answer = _admin(config, "scrub", body)
    if isinstance(answer, int):
        return answer
    pass_id, shown, last_print = answer["pass"], -1, 0.0
    while True:
        if answer["checked"] != shown and (
            time.monotonic() - last_print > 1 or answer["state"] != "running"
        ):
            shown, last_print = answer["checked"], time.monotonic()
            print(
                f"scrub pass {pass_id}: {answer['checked']} of {answer['total']} instances, "
                f"{answer['bytes'] / 1e6:.1f} of {answer['total_bytes'] / 1e6:.1f} MB, "
                f"{len(answer['findings'])} findings",
                flush=True,
            )
        if answer["state"] != "running":
            break
        time.sleep(0.3)
        polled = _admin(config, "scrub-progress", {"pass": pass_id})
        if isinstance(polled, int):
            return polled
        answer = polled
    for f in answer["findings"]:
        entry = (
            f" (tamper-alarm entry {f['alarm_index']})" if f.get("alarm_index") is not None else ""
        )
        print(
            f"{f['severity'].upper()}: {f['sop_instance_uid']} {f['path']}: {f['problem']}{entry}"
        )
    alarms = sum(f["severity"] == "alarm" for f in answer["findings"])
    print(
        f"scrub pass {pass_id} {answer['state']}: {answer['checked']} instances checked, {alarms} alarms, "
        f"{len(answer['findings']) - alarms} warnings"
        + (
            f", {answer['unanchored']} not yet anchored (being stored)"
            if answer["unanchored"]
            else ""
        )
    )
    if answer["state"] != "complete":
        return EXIT_FAIL
    return EXIT_FAIL if alarms else EXIT_OK


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from dicomledger.backup import BackupError, backup
    from dicomledger.cli import _fail

    try:
        backup(config, Path(args.output), copy=args.copy)
    except BackupError as exc:
        return _fail(str(exc))
    print(f"backup complete: {Path(args.output).absolute()}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from dicomledger.backup import BackupError, restore
    from dicomledger.cli import _fail

    try:
        restore(config, Path(args.source), replace=args.replace, link=args.link)
    except BackupError as exc:
        return _fail(str(exc))
    return EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "erase": cmd_erase,
    "retention": cmd_retention,
    "scrub": cmd_scrub,
    "backup": cmd_backup,
    "restore": cmd_restore,
}
