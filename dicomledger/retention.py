"""Retention: studies older than their keep period (by Study Date) are erased by the same path
as `dicomledger erase` (``erasure.py``), one ``erased`` entry per study, reason ``retention``.

Which period applies (``[[retention.rules]]``, ``due``): a rule with modalities applies to a
study that has a series of one of them; a rule without modalities applies to every study. A
study keeps the *longest* period among the rules that apply to it (one long-kept series keeps
its study), and is kept forever if none applies. A study without a valid Study Date is never
erased by age; it is listed as skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import structlog

from dicomledger.config import RetentionConfig, RetentionRule
from dicomledger.dicom.index import StudySummary
from dicomledger.erasure import Eraser, NothingToErase
from dicomledger.ledger.erasure import RETENTION
from dicomledger.ledger.pseudonym import pseudonym

log = structlog.get_logger("dicomledger.retention")


@dataclass(frozen=True)
class Due:
    study: StudySummary
    keep_years: int
    study_date: date


def keep_years(modalities: Sequence[str], rules: Sequence[RetentionRule]) -> int | None:
    """The keep period of a study with these modalities, or None (no rule: kept)."""
    periods = [
        r.keep_years for r in rules if not r.modalities or set(r.modalities) & set(modalities)
    ]
    return max(periods) if periods else None


def study_date(value: str) -> date | None:
    """A DICOM DA value (YYYYMMDD), or None if it is not one."""
    try:
        return (
            datetime.strptime(value.strip(), "%Y%m%d").date() if len(value.strip()) == 8 else None
        )
    except ValueError:
        return None


def years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


def due(
    studies: Sequence[StudySummary], rules: Sequence[RetentionRule], today: date
) -> tuple[list[Due], list[StudySummary]]:
    """(studies past their keep period, studies skipped for lack of a valid Study Date)."""
    found, skipped = [], []
    for s in studies:
        years = keep_years(s.modalities, rules)
        if years is None:
            continue
        when = study_date(s.study_date)
        if when is None:
            skipped.append(s)
        elif when < years_before(today, years):
            found.append(Due(s, years, when))
    return found, skipped


class Retention:
    def __init__(self, config: RetentionConfig, eraser: Eraser, secret: bytes) -> None:
        self.config = config
        self.eraser = eraser
        self.secret = secret
        self._lock = asyncio.Lock()  # one run at a time

    async def run(self, *, dry_run: bool) -> dict[str, Any]:
        """Apply the policy now (or list what it would erase)."""
        async with self._lock:
            today = datetime.now(UTC).date()
            studies, skipped = due(await self.eraser.index.studies(), self.config.rules, today)
            listed, erased = [], 0
            for d in studies:
                s = d.study
                line = {
                    "study_uid": s.study_uid,
                    "patient_id": s.patient_id,
                    "study_date": d.study_date.isoformat(),
                    "modalities": list(s.modalities),
                    "instances": s.instances,
                    "keep_years": d.keep_years,
                    "description": s.description,
                }
                if not dry_run:
                    try:
                        done = await self.eraser.erase(
                            pseudonym(self.secret, "patient", s.patient_id),
                            pseudonym(self.secret, "study", s.study_uid),
                            RETENTION,
                            patient_ids=[s.patient_id],
                        )
                    except NothingToErase:  # erased meanwhile, or only copies anchored elsewhere
                        continue
                    line["index"] = done["index"]
                    line["instances"] = done["instances"]
                    erased += 1
                listed.append(line)
            if not dry_run and (erased or skipped):
                log.info(
                    "retention applied",
                    studies_erased=erased,
                    skipped_without_study_date=len(skipped),
                )
            return {
                "dry_run": dry_run,
                "studies": listed,
                "rules": len(self.config.rules),
                "skipped": [
                    {
                        "study_uid": s.study_uid,
                        "patient_id": s.patient_id,
                        "study_date": s.study_date,
                    }
                    for s in skipped
                ],
            }

    async def loop(self) -> None:
        """Apply the policy every ``check_interval_hours`` (first a minute after start)."""
        interval = self.config.check_interval_hours * 3600
        if not self.config.rules or interval <= 0:
            return
        await asyncio.sleep(min(60.0, interval))
        while True:
            try:
                await self.run(dry_run=False)
            except Exception as exc:  # a failed run must not end the policy; the next one retries
                log.exception("retention run failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval)
