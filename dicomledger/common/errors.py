"""The root of the errors dicomledger raises on purpose, and their families.

Every such error's message names what went wrong (and, where there is one, the fix), so a
command can print it as one line. Each family says whose problem it is; the classes keep their
older standard bases too (``ValueError``, ``OSError``, ...), so existing handlers still match.

| family | what | the CLI's exit code |
|---|---|---|
| ``ConfigurationError`` | the configuration, a key or trust file, how a command was called | 2 |
| ``StorageError`` | a database, the image store or another file cannot be read or written | 1 |
| ``LedgerFormatError`` | bytes that are not valid ledger data: entries, notes, checkpoints, proofs, policies | 1 |
| ``PeerError`` | another gateway, a witness or an audit repository misbehaved or cannot be reached | 1 |
| ``DicomError`` | a DICOM object, message or query that cannot be accepted | 1 |
"""

from __future__ import annotations


class DicomLedgerError(Exception):
    """Raised on purpose by dicomledger, with a message fit for one log or terminal line."""


class ConfigurationError(DicomLedgerError):
    """The configuration, a key or trust file, or a command's arguments are wrong."""


class StorageError(DicomLedgerError):
    """A database, the image store or another file cannot be read or written."""


class LedgerFormatError(DicomLedgerError):
    """Bytes that are not valid ledger data (entries, notes, checkpoints, proofs, policies)."""


class PeerError(DicomLedgerError):
    """Another gateway, a witness or an audit repository misbehaved or cannot be reached."""


class DicomError(DicomLedgerError):
    """A DICOM object, message or query that cannot be accepted."""
