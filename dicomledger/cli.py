"""The `dicomledger` command."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomledger.common.errors import ConfigurationError, DicomLedgerError, StorageError
from dicomledger.config import AE_TITLE_RE, Config, load_config
from dicomledger.datadir import set_private_umask
from dicomledger.init_config import render_config
from dicomledger.ledger.identity import Identity, KeyFileError, create_key_file, load_key_file
from dicomledger.ledger.peer_tls import create_tls_identity
from dicomledger.ledger.trust import render_trust_file
from dicomledger.lifecycle_cli import HANDLERS as LIFECYCLE_HANDLERS
from dicomledger.lifecycle_cli import add_parsers as add_lifecycle_parsers

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a Unix tool whose reader went away (`| head`)

TLS_TEMPLATE = """
[tls]
# DICOM TLS (PS3.15 Annex B, BCP 195: TLS 1.2+, AEAD suites). Made by `init --tls` with a
# self-signed test CA (keys/tls/ca.key issues more certificates); a hospital uses its own CA.
# mode = "alongside": TLS on `port` and plain TCP on gateway.port; "only": gateway.port is TLS.
mode = "{mode}"
{port_line}certificate = "keys/tls/server.crt"
key = "keys/tls/server.key"
# CAs that vouch for client certificates; without a valid one the handshake is refused.
ca_file = "keys/tls/ca.crt"
require_client_certificate = true

# Bind a calling AE title to its certificate (and/or source addresses): an association that
# claims it is refused unless it came over TLS with that certificate. The test client
# certificate (keys/tls/client.crt, CN {client_name}) has this fingerprint:
# [[ae_bindings]]
# calling_ae = "{first_ae}"
# certificate_sha256 = "{client_sha256}"
# certificate_name = "{client_name}"     # CN or subject alternative name, under ca_file
# addresses = ["127.0.0.1"]                # source addresses or networks, TLS or not
"""


def _fail(message: str, code: int = EXIT_FAIL) -> int:
    print(f"dicomledger: {message}", file=sys.stderr)
    return code


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    config_path = directory / "config.toml"
    if config_path.exists():
        return _fail(f"{config_path} already exists; choose another --dir or remove it")
    for ae in [args.ae_title, *args.allow]:
        if ae != "*" and not AE_TITLE_RE.match(ae):
            return _fail(
                f"{ae!r} is not a valid AE title (1-16 characters, no backslash)", EXIT_USAGE
            )
    origin = args.origin or f"{args.ae_title.lower()}.{os.uname().nodename}/dicomledger"
    set_private_umask()  # the config, keys and data tree: 0600 files, 0700 folders
    (directory / "data" / "images").mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = directory / "keys" / "gateway.key"
    key = create_key_file(key_path)
    secret_path = directory / "keys" / "consortium.secret"
    if args.secret_file:
        secret = Path(args.secret_file).read_bytes().strip()
    else:
        secret = secrets.token_hex(32).encode()
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    create_tls_identity(
        directory / "keys" / "peer-tls.crt", directory / "keys" / "peer-tls.key", origin
    )
    peer_port = args.peer_port or (
        args.port + 1000 if args.port + 1000 <= 65535 else args.port - 1000
    )
    config_path.write_text(
        render_config(
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            allowed=args.allow,
            origin=origin,
            peer_port=peer_port,
        )
    )
    if args.tls or args.tls_only:
        _init_tls(args, directory, config_path)
    identity = Identity(origin, key)
    (directory / "trust.txt").write_text(render_trust_file(origin, key.public_key()))
    print(f"created {config_path}")
    print(f"origin: {origin}")
    print(f"verifier key: {identity.vkey}")
    print(f"run it: dicomledger serve --config {config_path}")
    return EXIT_OK


def _init_tls(args: argparse.Namespace, directory: Path, config_path: Path) -> None:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from dicomledger.tls_pki import create_test_pki

    names = list(
        dict.fromkeys(
            ["localhost", "127.0.0.1", os.uname().nodename]
            + ([args.host] if args.host not in ("0.0.0.0", "::") else [])
        )
    )
    client_name = f"{args.allow[0] if args.allow[0] != '*' else 'modality'}.test".lower()
    pki = create_test_pki(
        directory / "keys" / "tls", site=args.ae_title, server_names=names, client_name=client_name
    )
    der = x509.load_pem_x509_certificate(pki.client_cert.read_bytes()).public_bytes(Encoding.DER)
    tls_port = args.tls_port or (args.port + 1 if args.port < 65535 else args.port - 1)
    with open(config_path, "a") as f:
        f.write(
            TLS_TEMPLATE.format(
                mode="only" if args.tls_only else "alongside",
                port_line="" if args.tls_only else f"port = {tls_port}\n",
                client_name=client_name,
                first_ae=args.allow[0],
                client_sha256=hashlib.sha256(der).hexdigest(),
            )
        )
    print(
        f"TLS: test CA {pki.ca_cert}, server {pki.server_cert}, client {pki.client_cert} "
        f"on port {args.port if args.tls_only else tls_port}"
    )


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    """Run the gateway until SIGTERM/SIGINT. Start-up failures end in one log line naming the
    problem and exit 1: the data directory in use by another gateway (nothing touched), a
    port in use, a host that does not resolve, a database that cannot be opened."""
    import structlog

    from dicomledger.datadir import DataDirInUse, DataDirLock, data_directories, make_private
    from dicomledger.gateway import StartupError, serve

    log = structlog.get_logger("dicomledger.cli")
    lock = DataDirLock(data_directories(config))
    try:
        lock.acquire()
    except DataDirInUse as exc:
        log.error("gateway cannot start", reason=str(exc))
        return EXIT_FAIL
    try:
        changed = make_private(config)
        if changed:
            outside = [str(p) for p in changed if not p.is_relative_to(config.storage.directory)]
            log.warning(
                "took group and other access off the gateway's files (now 0600 files, 0700 folders)",
                count=len(changed),
                in_image_store=len(changed) - len(outside),
                paths=outside[:10],
            )

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await serve(config, stop, accept_local_tip=args.accept_local_tip)

        asyncio.run(main())
    except Exception as exc:
        if not isinstance(exc, StartupError) and not _is_data_error(exc):
            raise
        log.error("gateway cannot start", reason=_reason(exc))
        return EXIT_FAIL
    finally:
        lock.release()
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    from dicomledger.ledger.verify import verify_and_report

    if args.ledger or args.trust or args.policy:
        return _fail("verify takes either --config, or --ledger and --trust", EXIT_USAGE)
    key = load_key_file(config.ledger.key_file)
    database = config.ledger.database
    try:
        ok = verify_and_report(  # the key file's key is the one in force at the log's tip (it rotates)
            database,
            current_keys={config.ledger.origin: key.public_key()},
            origin=args.origin,
            every_signature=args.every_signature,
            key_policy=config.peering.witness_policy if config.peering is not None else None,
        )
    except sqlite3.Error as exc:
        return _fail(f"cannot read ledger database {database}: {exc}")
    return EXIT_OK if ok else EXIT_FAIL


def cmd_verify_copy(args: argparse.Namespace) -> int:
    """The auditor's verify: a ledger database (or a copy), public keys only, read-only."""
    from dicomledger.ledger.note import NoteError
    from dicomledger.ledger.trust import read_trust
    from dicomledger.ledger.verify import verify_and_report

    if not args.ledger or not args.trust:
        return _fail("verify needs --config, or --ledger LEDGER.db and --trust TRUST", EXIT_USAGE)
    try:
        trust = read_trust(Path(args.trust), Path(args.policy) if args.policy else None)
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}", EXIT_USAGE)
    except NoteError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if not Path(args.ledger).is_file():
        return _fail(f"ledger database {args.ledger} does not exist", EXIT_USAGE)
    try:
        ok = verify_and_report(
            Path(args.ledger), trust=trust, origin=args.origin, every_signature=args.every_signature
        )
    except sqlite3.Error as exc:
        return _fail(f"cannot read ledger database {args.ledger}: {exc}")
    return EXIT_OK if ok else EXIT_FAIL


def cmd_prove(args: argparse.Namespace, config: Config) -> int:
    from dicomledger.ledger.log import LedgerStore
    from dicomledger.ledger.proving import ProofUnavailable, build_proof

    origin = args.origin or config.ledger.origin

    def own_identity() -> Identity:  # signs a checkpoint when none covers the entry yet
        return Identity(origin, load_key_file(config.ledger.key_file))

    async def build() -> bytes:
        store = await LedgerStore.open(config.ledger.database)
        try:
            return await build_proof(
                store, origin, args.entry, own_identity if origin == config.ledger.origin else None
            )
        finally:
            await store.close()

    try:
        data = asyncio.run(build())
    except ProofUnavailable as exc:
        return _fail(str(exc))
    Path(args.output).write_bytes(data)
    print(f"wrote proof of {origin} entry {args.entry} to {args.output}")
    return EXIT_OK


def cmd_check_proof(args: argparse.Namespace) -> int:
    from dicomledger.ledger.entries import EntryError
    from dicomledger.ledger.note import NoteError
    from dicomledger.ledger.proof import ProofFileError
    from dicomledger.ledger.proving import check_entry_proof
    from dicomledger.ledger.trust import read_trust

    try:
        trusted = read_trust(Path(args.trust), Path(args.policy) if args.policy else None)
        checked = check_entry_proof(Path(args.proof).read_bytes(), trusted)
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}")
    except (ProofFileError, NoteError, EntryError) as exc:
        if args.json:
            print(json.dumps({"valid": False, "problem": str(exc)}, indent=2))
        else:
            print(f"INVALID: {exc}")
            if str(exc).startswith("checkpoint has no signature by "):
                print(
                    "(a log that changed its key signs with its new key: add the key-change lines of its "
                    "trust.txt to the trust file)",
                    file=sys.stderr,
                )
        return EXIT_FAIL
    proof, entry, result = checked.proof, checked.entry, checked.result
    signed = datetime.fromtimestamp(entry.time_ms / 1000, UTC).isoformat(timespec="seconds")
    witnesses = [
        (name, datetime.fromtimestamp(ts, UTC).isoformat()) for name, ts in result.witnesses
    ]
    if args.json:  # one JSON document and nothing else on stdout
        print(
            json.dumps(
                {
                    "valid": True,
                    "origin": entry.origin,
                    "index": entry.index,
                    "kind": entry.kind,
                    "signed": signed,
                    "checkpoint": {"size": result.size, "root": result.root_hash.hex()},
                    "witnesses": [{"name": name, "time": when} for name, when in witnesses],
                    "quorum": result.quorum,  # the witness policy's quorum, met; null without a policy
                    "entry": json.loads(proof.entry),
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"VALID: {entry.kind} entry {entry.index} of {entry.origin}, signed {signed}")
    print(f"included in checkpoint of size {result.size}, root {result.root_hash.hex()}")
    for name, when in witnesses:
        print(f"witnessed by {name} at {when}")
    if result.quorum is not None:
        print(f"witness quorum met: {result.quorum}")
    return EXIT_OK


def cmd_verify_file(args: argparse.Namespace, config: Config) -> int:
    from dicomledger.verify_file import verify_file

    return verify_file(config, Path(args.path))


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from dicomledger.status import status

    return status(config)


def cmd_queue(args: argparse.Namespace, config: Config) -> int:
    """List the forward queue's jobs (from its database), or put failed or parked jobs back
    (through the running gateway, whose workers then send them)."""
    if config.forwarding is None:
        return _fail(
            "no [forwarding] section in the config: this gateway forwards nothing", EXIT_USAGE
        )
    if args.action == "list":
        if args.job:
            return _fail("--job is for `queue retry` and `queue unpark`", EXIT_USAGE)
        if args.limit < 1:
            return _fail("--limit must be at least 1", EXIT_USAGE)
        from dicomledger.status import queue_jobs

        return queue_jobs(config, args.destination, args.state, args.limit, args.json)
    answer = _admin(
        config, f"queue-{args.action}", {"destination": args.destination, "jobs": args.job or []}
    )
    if isinstance(answer, int):
        return answer
    which = "parked" if args.action == "unpark" else "failed or parked"
    if not answer["put_back"]:
        print(
            f"no {which} jobs"
            + (f" of {args.destination}" if args.destination else "")
            + " to put back"
        )
    for title, n in sorted(answer["put_back"].items()):
        print(f"{n} {which} job{'s' if n != 1 else ''} of {title} put back in the queue: due now")
    return EXIT_OK


def _admin(config: Config, action: str, body: dict[str, Any]) -> dict[str, Any] | int:
    """Send one admin request to the running gateway; an int is the exit code of a failure."""
    from dicomledger.admin import AdminError, GatewayNotRunning, call

    assert config.admin_socket is not None
    try:
        return asyncio.run(call(config.admin_socket, action, body, config.path))
    except GatewayNotRunning as exc:
        return _fail(str(exc), EXIT_USAGE)
    except AdminError as exc:
        return _fail(f"refused by the gateway: {exc}")


def _pseudonyms(args: argparse.Namespace, config: Config) -> dict[str, str]:
    """Patient ID and Study UID leave this process only as keyed pseudonyms."""
    from dicomledger.ledger.pseudonym import pseudonym

    secret = config.pseudonym_secret()
    body = {}
    if getattr(args, "patient_id", None) is not None:
        body["patient"] = pseudonym(secret, "patient", args.patient_id)
    if getattr(args, "study", None):
        body["study"] = pseudonym(secret, "study", args.study)
    return body


def cmd_grant(args: argparse.Namespace, config: Config) -> int:
    body = {
        **_pseudonyms(args, config),
        "to": args.to,
        "until": args.until,
        "purpose": args.purpose,
        "consent": args.consent,
        "issuer": args.issuer,
        "force": args.force,
        "dry_run": args.dry_run,
    }
    return _issued("granted", _admin(config, "grant", body))


def _issued(what: str, answer: dict[str, Any] | int) -> int:
    if isinstance(answer, int):
        return answer
    for warning in answer.get("warnings", []):
        print(f"dicomledger: warning: {warning}", file=sys.stderr)
    if answer.get("dry_run"):
        print(
            f"dry run, nothing signed: {answer['origin']} would sign and append this {answer['kind']}:"
        )
        print(json.dumps(answer["payload"], indent=2, sort_keys=True))
        return EXIT_OK
    print(f"{what}: ref {answer['ref']} ({answer['origin']} entry {answer['index']})")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, config: Config) -> int:
    if not args.grant and not args.to:
        return _fail(
            "name what to revoke: --grant REF (from `dicomledger permissions`) or --to AE[@GATEWAY]",
            EXIT_USAGE,
        )
    body = {
        **_pseudonyms(args, config),
        "grants": args.grant or [],
        "to": args.to,
        "reason": args.reason,
        "issuer": args.issuer,
        "force": args.force,
        "dry_run": args.dry_run,
    }
    return _issued("revoked", _admin(config, "revoke", body))


def cmd_permissions(args: argparse.Namespace, config: Config) -> int:
    answer = _admin(config, "permissions", _pseudonyms(args, config))
    if isinstance(answer, int):
        return answer
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK

    def where(r: dict[str, Any]) -> str:
        return f"{r['origin']} entry {r['index']}"

    print("effective grants:" if answer["effective"] else "effective grants: none (default: deny)")
    for g in answer["effective"]:
        scope = f"study {g['study'][:12]}" if g.get("study") else "all studies"
        until = f" until {g['until']}" if g.get("until") else ""
        print(
            f"  {g['ref'][:16]} to {g['grantee']}, {scope}{until}; purpose {g['purpose']!r}; "
            f"consent {g['consent']!r}; issued by {g['issuer']} ({where(g)})"
        )
    for title, key in (("ended", "ended"), ("ignored", "ignored"), ("malformed", "malformed")):
        if answer[key]:
            print(f"{title}:")
            for ref, reason in sorted(answer[key].items()):
                print(f"  {ref[:16]}: {reason}")
    print(f"history ({len(answer['history'])} records, in the order every gateway uses):")
    for r in answer["history"]:
        print(f"  {r['ref'][:16]} {r['kind']} by {r['issuer']} ({where(r)})")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, config: Config) -> int:
    """Everything the ledger database holds about a patient and/or a study, newest first.

    Reads the database directly (WAL: works while the gateway runs, and while it is stopped).
    The Patient ID and Study UID are turned into pseudonyms at once and never printed."""
    from dicomledger.ledger.audit import (
        AuditError,
        AuditEvent,
        audit_events,
        event_json,
        report_lines,
    )
    from dicomledger.ledger.log import LedgerStore, LedgerStoreError

    if args.patient_id is None and args.study is None:
        return _fail("name what to audit: --patient-id ID and/or --study UID", EXIT_USAGE)
    subject = _pseudonyms(args, config)
    patient, study = subject.get("patient"), subject.get("study")
    database = config.ledger.database
    if not database.exists():
        return _fail(f"no ledger database at {database}: this gateway has not run yet")

    async def read() -> tuple[list[AuditEvent], int]:
        store = await LedgerStore.open(database)
        try:
            events = await audit_events(store, patient=patient, study=study)
            return events, len(await store.origins())
        finally:
            await store.close()

    try:
        events, logs_held = asyncio.run(read())
    except (AuditError, LedgerStoreError) as exc:
        return _fail(str(exc))
    if args.json:
        print(
            json.dumps(
                {"patient": patient, "study": study, "events": [event_json(e) for e in events]},
                indent=2,
            )
        )
        return EXIT_OK
    for line in report_lines(events, patient=patient, study=study, logs_held=logs_held):
        print(line)
    return EXIT_OK


def cmd_peers(args: argparse.Namespace, config: Config) -> int:
    from dicomledger.status import export_evidence, peers

    if args.evidence and args.clear_flag:
        return _fail("give --evidence or --clear-flag, not both", EXIT_USAGE)
    if args.evidence:
        if not args.output:
            return _fail("--evidence ORIGIN needs -o FILE", EXIT_USAGE)
        return export_evidence(config, args.evidence, Path(args.output))
    if args.clear_flag:
        if not args.reason:
            return _fail(
                "--clear-flag ORIGIN needs --reason TEXT: it goes on the ledger", EXIT_USAGE
            )
        return _clear_flag(args, config)
    return peers(config)


def _clear_flag(args: argparse.Namespace, config: Config) -> int:
    """Through the running gateway: the flag-cleared entry goes through its log writer, after
    its start-up check (an offline append to a restored log could sign a second history)."""
    import getpass

    try:
        by = args.by or getpass.getuser()
    except (KeyError, OSError):
        by = f"uid {os.getuid()}"
    answer = _admin(
        config, "clear-flag", {"origin": args.clear_flag, "reason": args.reason, "by": by}
    )
    if isinstance(answer, int):
        return answer
    print(
        f"flag on {answer['origin']} cleared ({answer['evidence']} evidence file(s) no longer in force): "
        f"{config.ledger.origin} entry {answer['index']}"
    )
    return EXIT_OK


def cmd_rotate_key(args: argparse.Namespace, config: Config) -> int:
    """Through the running gateway: a key-rotation entry, then the new key signs its log."""
    answer = _admin(config, "rotate-key", {})
    if isinstance(answer, int):
        return answer
    print(
        f"rotated: {config.ledger.origin} entry {answer['index']} is the key-rotation entry; "
        f"later entries and checkpoints are signed by {answer['vkey']}"
    )
    print("peers follow the rotation through the log itself; their [[peers]] vkey stays as it is")
    if answer.get("trust_file"):
        print(
            f"for auditors: {answer['trust_file']} now ends with this line (give them the file or the line):"
        )
    else:
        print("for auditors, add this line to their trust files:")
    print(answer["trust_line"])
    print(f"this gateway now cosigns with witness key {answer['witness_vkey']}")
    return EXIT_OK


def cmd_replace_key(args: argparse.Namespace, config: Config) -> int:
    """A lost or stolen key, replaced by a quorum of the consortium (docs/keys.md):
    ``request`` at the gateway whose key it is (stopped), ``sign`` at each other gateway,
    ``submit`` to each running gateway that records it, ``install`` at the first one."""
    from dicomledger.datadir import running_gateway
    from dicomledger.ledger.keychain import (
        KeyChangeError,
        add_statement_signature,
        format_request,
        parse_request,
    )
    from dicomledger.ledger.log import LedgerStore
    from dicomledger.ledger.note import parse_note
    from dicomledger.ledger.rotation import check_for_signing, install_replacement, make_request

    origin = config.ledger.origin
    peers = [p.origin for p in config.peering.peers] if config.peering is not None else []
    policy = config.peering.witness_policy if config.peering is not None else None
    path = Path(args.request)
    if args.action in ("request", "install") and (pid := running_gateway(config)) is not None:
        return _fail(
            f"the gateway runs (process {pid}): stop it first, its log must not grow meanwhile"
        )
    if args.action == "request" and not args.reason:
        return _fail("replace-key request needs --reason TEXT: it goes on the ledger", EXIT_USAGE)
    if args.action == "submit":
        try:
            data = parse_request(path.read_bytes()).statement
        except OSError as exc:
            return _fail(f"cannot read {exc.filename}: {exc.strerror}")
        except KeyChangeError as exc:
            return _fail(str(exc))
        answer = _admin(
            config, "replace-key-submit", {"statement": base64.b64encode(data).decode()}
        )
        if isinstance(answer, int):
            return answer
        print(
            f"accepted: {answer['origin']}'s key is replaced from its entry {answer['size']} on "
            f"(signed by {', '.join(answer['signers'])}); recorded as {origin} entry {answer['index']}"
        )
        return EXIT_OK

    async def run() -> str:
        store = await LedgerStore.open(config.ledger.database)
        try:
            if args.action == "request":
                request = await make_request(store, origin, config.ledger.key_file, args.reason)
                path.write_bytes(format_request(request))
                return (
                    f"wrote the replacement request for {origin} at size {len(request.tail) + request.tail_start} "
                    f"to {path}; the new key is {config.ledger.key_file}.new. Have a quorum of the other "
                    "gateways sign it (`replace-key sign`), then `replace-key install` it here"
                )
            request = parse_request(path.read_bytes())
            if args.action == "sign":
                statement = await check_for_signing(store, request, peers)
                key = load_key_file(config.ledger.key_file)
                if origin in [o.name for o in await store.origins()]:
                    current = (await store.key_chain(origin)).current
                    if current.public_bytes_raw() != key.public_key().public_bytes_raw():
                        raise KeyChangeError(
                            "this gateway's key file is not the key its own log has in force"
                        )
                signed = add_statement_signature(request.statement, origin, key)
                path.write_bytes(
                    format_request(type(request)(request.tail_start, request.tail, signed))
                )
                return (
                    f"signed: {origin} consents that {statement.origin}'s key is replaced from its entry "
                    f"{statement.size} on; {path} carries the signatures of "
                    f"{', '.join(sorted({s.name for s in parse_note(signed).signatures} - {statement.origin}))}"
                )
            signer_keys = {
                o.name: (await store.key_chain(o.name)).trusted_keys()
                for o in await store.origins()
            }
            statement = await install_replacement(
                store,
                origin,
                config.ledger.key_file,
                request,
                policy,
                lambda name: signer_keys.get(name, []),
            )
            return (
                f"installed: the next `serve` appends the replacement at entry {statement.size} of {origin}, "
                f"signed by {', '.join(statement.signers)}, and signs with the new key from then on"
            )
        finally:
            await store.close()

    try:
        print(asyncio.run(run()))
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}" if exc.filename else str(exc))
    except (KeyChangeError, KeyFileError) as exc:
        return _fail(str(exc))
    return EXIT_OK


def cmd_check_evidence(args: argparse.Namespace) -> int:
    """Offline: does an evidence file prove that its origin signed two histories?"""
    from dicomledger.ledger.checkpoint import parse_checkpoint
    from dicomledger.ledger.note import NoteError, parse_note
    from dicomledger.ledger.trust import read_trust
    from dicomledger.ledger.witness import WitnessError, check_equivocation, parse_evidence

    try:
        trusted = read_trust(Path(args.trust))
        evidence = parse_evidence(Path(args.evidence).read_bytes())
        chain = trusted.log_chain(
            evidence.origin
        )  # each note checked with the key in force at its size
        if chain is None:
            raise WitnessError(f"the trust file has no key for {evidence.origin}")
        found = check_equivocation(
            evidence.note_a, evidence.note_b, evidence.consistency_proof or None, chain
        )
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}")
    except (WitnessError, NoteError) as exc:
        print(f"INVALID: {exc}")
        return EXIT_FAIL
    if found is None:
        print(
            f"INVALID: the two checkpoints of {evidence.origin} are consistent (or not shown otherwise)"
        )
        return EXIT_FAIL
    print(
        f"VALID: {evidence.origin} signed two checkpoints that cannot both be true: {found.reason}"
    )
    for label, note in (("a", evidence.note_a), ("b", evidence.note_b)):
        cp = parse_checkpoint(parse_note(note).text)
        print(f"{label}: size {cp.size}, root {cp.root_hash.hex()}")
    return EXIT_OK


def _signing_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help=f"sign even a {what} that names no configured destination, allowed "
        "calling AE or consortium gateway",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check and print the record that would be signed; sign nothing",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomledger", description=__doc__)
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_version()}",
        help="print the installed version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a gateway directory: config, keys, data folder")
    p.add_argument(
        "--dir", required=True, help="the new gateway directory (created; must not hold a config)"
    )
    p.add_argument(
        "--ae-title", default="DICOMLEDGER", help="this gateway's AE title (default DICOMLEDGER)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="DICOM listening address (default 127.0.0.1; 0.0.0.0 for the network)",
    )
    p.add_argument("--port", type=int, default=11112, help="DICOM listening port (default 11112)")
    p.add_argument(
        "--origin", help="log origin name (default: derived from AE title and host name)"
    )
    p.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="AE",
        help="calling AE allowed to connect (repeat; default: STORESCU and ECHOSCU)",
    )
    p.add_argument("--secret-file", help="copy the consortium pseudonym secret from this file")
    p.add_argument(
        "--peer-port", type=int, help="port of the peer API (default: DICOM port + 1000)"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="also listen with DICOM TLS: make a self-signed test CA, a server and a client "
        "certificate under keys/tls/ and fill the [tls] section",
    )
    p.add_argument(
        "--tls-port", type=int, help="port of the TLS listener (default: DICOM port + 1)"
    )
    p.add_argument(
        "--tls-only",
        action="store_true",
        help="as --tls, but the DICOM port speaks TLS only (no plain TCP listener)",
    )

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_)
        q.add_argument("--config", required=True, help="the gateway's config.toml")
        return q

    p = with_config("serve", "run the gateway")
    p.add_argument(
        "--accept-local-tip",
        action="store_true",
        help="start even if no peer confirms this gateway's own log (none reachable, or "
        "entries it signed that no peer can give back); recorded on the ledger",
    )
    p = sub.add_parser(
        "verify",
        help="re-check a ledger database: this gateway's (--config), or any "
        "copy with public keys only (--ledger, --trust); read-only",
    )
    p.add_argument(
        "--config", help="the gateway's config.toml: check its database with its own key"
    )
    p.add_argument("--ledger", metavar="LEDGER.db", help="a ledger database, or a copy of one")
    p.add_argument(
        "--trust",
        metavar="TRUST",
        help="trust file: the logs' verifier keys, witnesses, "
        "and optionally a witness policy (C2SP tlog-policy lines)",
    )
    p.add_argument(
        "--policy",
        metavar="POLICY",
        help="a C2SP tlog-policy file (witness keys and quorum), when the trust file has none",
    )
    p.add_argument("--origin", help="check only this origin's log")
    p.add_argument(
        "--every-signature",
        action="store_true",
        help="also check the own signature of "
        "entries a signed checkpoint already authenticates (slower)",
    )
    with_config("status", "show the ledger and store state")
    p = with_config(
        "peers", "show each peer: reachable, last contact, how much of its log we hold, flagged"
    )
    p.add_argument(
        "--evidence",
        metavar="ORIGIN",
        help="write the equivocation evidence held against ORIGIN to -o FILE",
    )
    p.add_argument(
        "-o", "--output", metavar="FILE", help="where --evidence writes the evidence file"
    )
    p.add_argument(
        "--clear-flag",
        metavar="ORIGIN",
        help="clear the equivocation flag on ORIGIN (through the running gateway; a ledger entry)",
    )
    p.add_argument("--reason", help="why the flag is cleared (goes on the ledger; no PHI)")
    p.add_argument(
        "--by", help="who clears it (default: the operating-system account running this)"
    )
    p = with_config(
        "queue",
        "list the forward queue's jobs; `queue retry` / `queue unpark` put failed or "
        "parked jobs back (through the running gateway)",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=("list", "retry", "unpark"),
        default="list",
        help="list (default); retry: failed jobs waiting for their next attempt and parked ones, "
        "due now; unpark: parked ones only",
    )
    p.add_argument("--destination", metavar="AE", help="only the jobs of this destination")
    p.add_argument(
        "--job",
        type=int,
        action="append",
        metavar="N",
        help="retry or unpark this job only (repeat)",
    )
    p.add_argument(
        "--state",
        choices=("pending", "queued", "failed", "parked", "refused", "done", "all"),
        default="pending",
        help="which jobs to list (pending: queued, failed and parked)",
    )
    p.add_argument(
        "--limit", type=int, default=100, help="list at most this many jobs (default 100)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = with_config(
        "grant", "record a patient's permission on the ledger (through the running gateway)"
    )
    p.add_argument(
        "--patient-id", required=True, help="the Patient ID; only its pseudonym is sent or written"
    )
    p.add_argument(
        "--to",
        required=True,
        metavar="AE[@GATEWAY]",
        help="grantee: an AE title, AE@origin, or @origin",
    )
    p.add_argument(
        "--study", metavar="UID", help="limit to one study (default: all the patient's studies)"
    )
    p.add_argument("--until", metavar="YYYY-MM-DD", help="last day the grant is valid")
    p.add_argument("--purpose", default="", help="why (free text, no PHI)")
    p.add_argument("--consent", default="", help="reference to the consent evidence (no PHI)")
    p.add_argument("--issuer", help="issuer key name (default: this gateway, as custodian)")
    _signing_options(p, "grantee")
    p = with_config("revoke", "end grants of a patient (through the running gateway)")
    p.add_argument(
        "--patient-id", required=True, help="the Patient ID; only its pseudonym is sent or written"
    )
    p.add_argument(
        "--grant", action="append", metavar="REF", help="a grant ref (8+ hex digits); repeat"
    )
    p.add_argument("--to", metavar="AE[@GATEWAY]", help="end every grant to this grantee")
    p.add_argument("--reason", default="", help="why (free text, no PHI)")
    p.add_argument("--issuer", help="issuer key name (default: this gateway, as custodian)")
    _signing_options(p, "grantee (when no grant of the patient names it)")
    p = with_config("permissions", "show a patient's effective grants and permission history")
    p.add_argument("--patient-id", required=True, help="the Patient ID; only its pseudonym is used")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p = with_config("audit", "list every ledger entry about a patient and/or a study, newest first")
    p.add_argument("--patient-id", help="the Patient ID; only its pseudonym is used or printed")
    p.add_argument(
        "--study", metavar="UID", help="a Study Instance UID; only its pseudonym is used or printed"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p = with_config("prove", "write a self-contained inclusion proof of one entry")
    p.add_argument("--entry", type=int, required=True, help="the entry's index in its log")
    p.add_argument("--origin", help="the log holding the entry (default: this gateway's)")
    p.add_argument("-o", "--output", required=True, help="the proof file to write")
    p = with_config("verify-file", "is this DICOM file's pixel data anchored?")
    p.add_argument("path", help="the DICOM file to check")
    add_lifecycle_parsers(sub, with_config)
    with_config(
        "rotate-key",
        "sign this gateway's log with a new key from a key-rotation entry on "
        "(through the running gateway)",
    )
    p = with_config(
        "replace-key",
        "replace a lost or stolen key with a quorum of the consortium: "
        "request (here, stopped), sign (each other gateway), submit (each running gateway), "
        "install (here, stopped)",
    )
    p.add_argument(
        "action",
        choices=("request", "sign", "submit", "install"),
        help="the step: request, sign, submit or install",
    )
    p.add_argument(
        "request", metavar="REQUEST", help="the request file (written by request, signed in place)"
    )
    p.add_argument("--reason", help="why the key is replaced (request; goes on the ledger; no PHI)")
    p = sub.add_parser(
        "check-evidence", help="verify an equivocation evidence file offline with a trust file"
    )
    p.add_argument("evidence", help="the evidence file (`peers --evidence` writes one)")
    p.add_argument("--trust", required=True, help="file of verifier keys, one per line")
    p = sub.add_parser("check-proof", help="verify a proof file offline with a trust file")
    p.add_argument("proof", help="the proof file (`prove` writes one)")
    p.add_argument(
        "--trust",
        required=True,
        help="trust file: verifier keys, one per line, and "
        "optionally a witness policy (C2SP tlog-policy lines)",
    )
    p.add_argument(
        "--policy",
        help="a C2SP tlog-policy file (witness keys and quorum) the checkpoint "
        "must meet, when the trust file has none",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (verdict, checkpoint, witnesses, entry) instead of text",
    )
    return parser


def _version() -> str:
    """The installed distribution's version (the package's own metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dicomledger")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _is_data_error(exc: BaseException) -> bool:
    """What reading or writing a database or file can raise: reported as one line, never a
    traceback."""
    return isinstance(exc, OSError | sqlite3.Error | StorageError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader gone shows here, not as a message at interpreter exit
        return code
    except DicomLedgerError as exc:  # raised on purpose anywhere: its message is the line
        return _fail(_reason(exc), EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAIL)
    except BrokenPipeError:
        # The reader went away (`dicomledger audit | head`): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        args.allow = args.allow or ["STORESCU", "ECHOSCU"]
        return cmd_init(args)
    if args.command == "check-proof":
        return cmd_check_proof(args)
    if args.command == "verify" and args.config is None:
        return cmd_verify_copy(args)
    if args.command == "check-evidence":
        return cmd_check_evidence(args)
    try:
        config = load_config(args.config)
        from dicomledger import logs

        logs.configure(config.log_level)
        set_private_umask()  # whatever a command creates (a database, a proof file) is private
        handler = {
            "serve": cmd_serve,
            "verify": cmd_verify,
            "prove": cmd_prove,
            "verify-file": cmd_verify_file,
            "status": cmd_status,
            "peers": cmd_peers,
            "grant": cmd_grant,
            "revoke": cmd_revoke,
            "permissions": cmd_permissions,
            "audit": cmd_audit,
            "queue": cmd_queue,
            **LIFECYCLE_HANDLERS,
            "rotate-key": cmd_rotate_key,
            "replace-key": cmd_replace_key,
        }[args.command]
        return handler(args, config)
    except ConfigurationError as exc:  # the config, a key file
        return _fail(str(exc), EXIT_USAGE)
    except BrokenPipeError:
        raise
    except Exception as exc:
        if not _is_data_error(exc):
            raise
        # a database that is corrupt, locked or unreadable, a file that vanished: one line
        return _fail(_reason(exc))


if __name__ == "__main__":
    sys.exit(main())
