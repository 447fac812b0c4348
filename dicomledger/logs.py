"""Structured JSON logs: one JSON object per line on stderr, whoever speaks.

Ours come from structlog. Everything else becomes the same kind of line: the log records of
libraries (pynetdicom, pydicom, aiohttp, asyncio), Python warnings, exceptions that end a
thread or escape a finaliser, and, while the gateway serves (``capture_native_output``),
whatever native code writes straight to the process's stdout or stderr (a Rust decoder's
panic message).

No PHI in logs, ever. A library's text can quote DICOM element values: pydicom's warnings
print the raw bytes of a malformed value, and a UID with a wrong length makes that value the
patient's name and ID that follow it. So third-party text is redacted (``redact``): quoted
literals go, and pydicom's messages are cut where a value could start; a third-party
traceback is never printed, only the exception's type and where it was raised. Our own
reasons built from exceptions go through ``safe_reason``.

pynetdicom narrates associations at info (dropped); its errors about a peer that refuses,
aborts, resets or goes quiet (a destination shutting down) are the peer's business, and our
own lines already say what they mean for a store, a forward or a retrieval: they are logged
at info. Its other warnings and errors keep their level. No third-party record carries a
traceback (``_ThirdParty``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

import structlog

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]

# 'text', "text", b'text', b"text" (with escapes), as repr() and f"'{value}'" print values
_QUOTED = re.compile(r"""[bB]?'(?:[^'\\\n]|\\.)*'|[bB]?"(?:[^"\\\n]|\\.)*\"""")
# where a pydicom message's value part starts: a quote, or a colon (f"...: {value}")
_PYDICOM_VALUE_START = re.compile(r"""['"]|:\s""")
_MAX_TEXT = 300  # third-party text
# pynetdicom's messages about a peer's connection or association ending or failing
_PEER_TROUBLE = re.compile(
    r"connect|closed|abort|reject|reset|timeout|timed out|unable to send|A-ASSOCIATE|A-RELEASE",
    re.I,
)
REDACTED = "<redacted>"

_handler: logging.Handler | None = None


def redact(text: str, limit: int = _MAX_TEXT) -> str:
    """``text`` without its quoted literals (where libraries put values), cut at ``limit``."""
    text = _QUOTED.sub(REDACTED, text)
    return text if len(text) <= limit else text[:limit] + "..."


def redact_pydicom(text: str) -> str:
    """A pydicom message up to where its value part starts (some print values unquoted,
    e.g. the code extensions of a Specific Character Set they ignore)."""
    cut = _PYDICOM_VALUE_START.search(text)
    return redact(text if cut is None else text[: cut.start()].rstrip() + " " + REDACTED)


def safe_reason(exc: BaseException, with_type: bool = False) -> str:
    """An exception's message for a log line or a status reason, values redacted."""
    text = redact(str(exc), limit=2000) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if with_type else text


def _where(tb: TracebackType | None) -> str | None:
    """file:line of the innermost frame: where it was raised, without a traceback."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else None


class _ThirdParty(logging.Filter):
    """Makes other libraries' records PHI-free and traceback-free, at the right level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("dicomledger") or _is_structlog(record):
            return True
        message = record.getMessage()
        if record.name.startswith("pydicom"):
            message = redact_pydicom(message)
        else:
            message = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            exc, tb = record.exc_info[1], record.exc_info[2]
            message += f" ({type(exc).__name__} at {_where(tb)})"
        network = isinstance(record.exc_info[1], OSError) if record.exc_info else False
        record.msg, record.args = message, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.name.startswith("pynetdicom") and (network or _PEER_TROUBLE.search(message)):
            # a peer that refused, aborted, reset or went quiet: its business, and our own
            # store/forward/retrieve lines say what it meant, at the level it deserves
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _is_structlog(record: logging.LogRecord) -> bool:
    return isinstance(record.msg, dict)  # structlog's ProcessorFormatter wrapped event


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # (cut like pydicom's: a warning raised elsewhere can still carry pydicom's text)
    structlog.get_logger("py.warnings").warning(
        "warning",
        category=category.__name__,
        where=f"{os.path.basename(filename)}:{lineno}",
        message=redact_pydicom(str(message)),
    )


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("dicomledger.thread").error(
        "exception ended a thread",
        thread=args.thread.name if args.thread else None,
        error=args.exc_type.__name__,
        where=_where(args.exc_traceback),
        message=redact(str(args.exc_value)) if args.exc_value is not None else None,
    )


def _unraisable(args: Any) -> None:
    structlog.get_logger("dicomledger.thread").warning(
        "exception ignored",
        error=args.exc_type.__name__,
        where=_where(args.exc_traceback),
        message=redact(str(args.exc_value)) if args.exc_value is not None else None,
        context=redact(repr(args.object))[:100] if args.object is not None else None,
    )


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    global _handler
    numeric = getattr(logging, level.upper())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],  # whose record it is
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_ThirdParty())
    _handler = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # pynetdicom narrates every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # pydicom logs each warning and also warns it: the log record is enough
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.showwarning = _show_warning
    threading.excepthook = _thread_exception
    sys.unraisablehook = _unraisable


def capture_native_output() -> Callable[[], None]:
    """Until the returned function is called, whatever is written to file descriptors 1 and
    2 by anyone but our log handler (native libraries, Python's last-resort error printing)
    becomes JSON log lines. Our handler keeps writing to the original stderr."""
    if not isinstance(_handler, logging.StreamHandler):  # logging not configured: leave it
        return lambda: None
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    original = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    previous_stream = _handler.setStream(original)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    # a failing handler prints "--- Logging error ---" to stderr, which would come back here
    logging.raiseExceptions = False
    reader = threading.Thread(target=_relay, args=(read_end,), name="native-output", daemon=True)
    reader.start()

    def restore() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)  # the pipe's last writers are gone: the relay sees its end
        os.close(saved_out)
        os.close(saved_err)
        reader.join(timeout=5)
        assert _handler is not None and isinstance(_handler, logging.StreamHandler)
        _handler.setStream(previous_stream)
        original.close()

    return restore


def _relay(fd: int) -> None:
    """One JSON line per line of native output; a Rust panic (its "thread ... panicked at
    file:line:" line and the message after it) as one error line. Blank lines, backtrace
    frames and the RUST_BACKTRACE hint are dropped: the panic line says where."""
    log = structlog.get_logger("dicomledger.native")
    panic: str | None = None
    with os.fdopen(fd, "rb") as pipe:
        for raw in pipe:
            text = raw.decode("utf-8", "replace").rstrip()
            if (
                not text.strip()
                or text[0].isspace()
                or text == "stack backtrace:"
                or text.startswith("note: ")
            ):
                continue
            if " panicked at " in text:
                if panic is not None:
                    log.error("native panic", where=redact(panic))
                panic = text
            elif panic is not None:
                log.error("native panic", where=redact(panic), message=redact(text))
                panic = None
            else:
                log.warning("native output", text=redact(text))
    if panic is not None:
        log.error("native panic", where=redact(panic))
