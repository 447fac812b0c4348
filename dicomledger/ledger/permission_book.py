"""A patient's permission history as held in the local ledger database (this gateway's log
and every replica), and decisions on it. The rules are the pure ``permissions`` module; this
file only finds the records and knows who may sign them.

Who may sign a grant or revocation (the *issuer*):

* a consent authority listed in config by verifier key (``[permissions] authorities``);
* the custodian: a gateway whose log anchored images of that patient, signing with its own
  key, when ``custodian_may_sign`` is true.

Records from anyone else are ignored for decisions and reported with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomledger.ledger import merkle
from dicomledger.ledger.entries import GRANT, REVOKE, decode_entry
from dicomledger.ledger.keychain import KeyChain
from dicomledger.ledger.log import LedgerStore, LogWriter
from dicomledger.ledger.permissions import (
    Decision,
    Grant,
    Grantee,
    PermissionFormatError,
    PermissionState,
    Revoke,
    decide,
    evaluate,
    heads_of,
    issuer_signature_ok,
    order_history,
    parse_permission,
    sign_payload,
    unsigned_grant_payload,
    unsigned_revoke_payload,
)

log = structlog.get_logger("dicomledger.permissions")

Record = Grant | Revoke


def today() -> str:
    return datetime.now(UTC).date().isoformat()


@dataclass(frozen=True)
class History:
    records: list[Record]  # in the deterministic order every gateway shows
    state: PermissionState
    malformed: dict[str, str]  # ref -> why the entry is not a valid permission record


class PermissionBook:
    def __init__(
        self,
        store: LedgerStore,
        *,
        custodian_may_sign: bool,
        authorities: Mapping[str, Ed25519PublicKey],
        issuer_keys: Mapping[str, Ed25519PrivateKey],
        own_origin: str,
        own_key: Ed25519PrivateKey,
    ) -> None:
        self.store = store
        self.custodian_may_sign = custodian_may_sign
        self.authorities = dict(authorities)
        # keys this gateway signs with: its own (as custodian) and the configured issuers
        self.issuer_keys = {own_origin: own_key, **issuer_keys}
        self.own_origin = own_origin
        self._reported: set[str] = set()

    async def _records(self, patient: str) -> tuple[list[Record], dict[str, str]]:
        records: list[Record] = []
        malformed: dict[str, str] = {}
        for origin, idx in await self.store.find(f"perm:{patient}"):
            data = await self.store.entry(origin, idx)
            try:
                record = parse_permission(decode_entry(data), data)
            except (PermissionFormatError, ValueError) as exc:
                malformed[merkle.leaf_hash(data).hex()] = f"{origin} entry {idx}: {exc}"
                continue
            records.append(record)
        return records, malformed

    async def history(self, patient: str, on: str | None = None) -> History:
        records, malformed = await self._records(patient)
        custodians = (
            {origin for origin, _ in await self.store.find(f"patient:{patient}")}
            if self.custodian_may_sign
            else set()
        )
        chains: dict[str, KeyChain] = {}
        for name in custodians:
            if await self.store.origin(name) is not None:
                chains[name] = await self.store.key_chain(name)

        def is_authorised(record: Record) -> str | None:
            key = self.authorities.get(record.issuer)
            if key is None and record.issuer == record.origin and record.origin in chains:
                # the custodian signs with the key its log had in force at the record's entry
                key = chains[record.origin].entry_key(record.index)
            if key is None:
                return (
                    f"issuer {record.issuer} may not sign for this patient: not a consent authority "
                    "in [permissions] authorities, nor a custodian gateway that anchored the patient's images"
                )
            if not issuer_signature_ok(record, key):
                return f"the issuer signature of {record.issuer} does not verify"
            return None

        state = evaluate(records, is_authorised=is_authorised, today=on or today())
        for ref, reason in state.ignored.items():
            if ref not in self._reported:  # once per record, not on every decision
                self._reported.add(ref)
                log.warning(
                    "permission record ignored",
                    patient=patient[:12],
                    record=ref[:16],
                    reason=reason,
                )
        return History(order_history(records), state, malformed)

    async def decide(
        self, patient: str, *, study: str | None, ae: str, site: str | None, today: str
    ) -> Decision:
        return decide((await self.history(patient, today)).state, ae=ae, site=site, study=study)

    async def decide_all(
        self, pairs: Iterable[tuple[str, str]], *, ae: str, site: str | None, today: str
    ) -> dict[tuple[str, str], Decision]:
        """``decide`` for many (patient, study) pairs, reading each patient's history once."""
        states: dict[str, PermissionState] = {}
        decisions: dict[tuple[str, str], Decision] = {}
        for patient, study in pairs:
            if (patient, study) not in decisions:
                if patient not in states:
                    states[patient] = (await self.history(patient, today)).state
                decisions[patient, study] = decide(states[patient], ae=ae, site=site, study=study)
        return decisions

    # -- issuing -------------------------------------------------------------------------

    def _issuer(self, name: str | None) -> tuple[str, Ed25519PrivateKey]:
        name = name or self.own_origin
        key = self.issuer_keys.get(name)
        if key is None:
            known = ", ".join(sorted(self.issuer_keys))
            raise PermissionFormatError(
                f"this gateway holds no key for issuer {name!r}; it can sign as: {known}"
            )
        return name, key

    async def anchored_images(self, patient: str, study: str | None = None) -> int:
        """How many image anchors of ``patient`` (in ``study``) the logs we hold have."""
        anchors = set(await self.store.find(f"patient:{patient}"))
        if study is not None:
            anchors &= set(await self.store.find(f"study:{study}"))
        return len(anchors)

    async def grant(
        self,
        writer: LogWriter,
        *,
        patient: str,
        grantee: Grantee,
        study: str | None,
        until: str | None,
        purpose: str,
        consent: str,
        issuer: str | None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Sign and append a grant; with ``dry_run``, only say what would be signed."""
        name, key = self._issuer(issuer)
        records, _ = await self._records(patient)
        unsigned = unsigned_grant_payload(
            patient=patient,
            grantee=grantee,
            study=study,
            until=until,
            purpose=purpose,
            consent=consent,
            heads=heads_of(records),
            issuer_name=name,
        )
        now = today()
        if until is not None and until < now:  # both YYYY-MM-DD, checked above
            raise PermissionFormatError(
                f"grant until: {until} is in the past (today is {now}, UTC); "
                "such a grant would never be in force"
            )
        if dry_run:
            return self._dry_run(GRANT, unsigned)
        payload = sign_payload(GRANT, unsigned, key)
        return await self._append(writer, GRANT, payload)

    async def revoke(
        self,
        writer: LogWriter,
        *,
        patient: str,
        grants: Sequence[str],
        grantee: Grantee | None,
        reason: str,
        issuer: str | None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Sign and append a revocation; with ``dry_run``, only say what would be signed."""
        name, key = self._issuer(issuer)
        records, _ = await self._records(patient)
        refs = [self._resolve(r, records) for r in grants]
        unsigned = unsigned_revoke_payload(
            patient=patient,
            grants=sorted(set(refs)),
            grantee=grantee,
            reason=reason,
            heads=heads_of(records),
            issuer_name=name,
        )
        if dry_run:
            return self._dry_run(REVOKE, unsigned)
        payload = sign_payload(REVOKE, unsigned, key)
        return await self._append(writer, REVOKE, payload)

    def _dry_run(self, kind: str, unsigned: dict[str, Any]) -> dict[str, Any]:
        """The record that would be signed (the issuer signature is left out: nothing is signed)."""
        return {"dry_run": True, "kind": kind, "origin": self.own_origin, "payload": unsigned}

    @staticmethod
    def _resolve(prefix: str, records: Sequence[Record]) -> str:
        """A grant ref from its first hex digits, as `permissions` prints them."""
        prefix = prefix.lower()
        found = [r.ref for r in records if isinstance(r, Grant) and r.ref.startswith(prefix)]
        if len(prefix) < 8 or len(found) != 1:
            raise PermissionFormatError(
                f"grant {prefix!r} {'is ambiguous' if found else 'is not a grant of this patient'}; "
                "give at least 8 hex digits of a ref shown by `dicomledger permissions`"
            )
        return found[0]

    async def _append(
        self, writer: LogWriter, kind: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        appended = await writer.append(kind, payload)
        ref = appended.leaf_hash.hex()
        log.info(
            f"{kind} issued", patient=payload["patient"][:12], ref=ref[:16], entry=appended.index
        )
        return {"ref": ref, "origin": appended.origin, "index": appended.index}
