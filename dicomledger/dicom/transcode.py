"""The transcoding fallback for sending: a decompressed copy of a stored instance, for a
receiver that accepts none of its stored (compressed) transfer syntax.

Decompression only, never a new compression: the copy goes out in Explicit VR Little Endian
(or Implicit), with the same SOP Instance UID. A lossy stored image may be decompressed; it
keeps (or gets) Lossy Image Compression "01", so the receiver knows the pixels went through a
lossy codec. The caller checks the stored bytes' pixel hash first; decoding those same bytes
gives the pixels whose decoded hash the anchor holds.
"""

from __future__ import annotations

import io

from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicomledger.common.errors import DicomError

# Uncompressed syntaxes a decompressed copy is offered in, in order of preference
FALLBACK_SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
# Compressed syntaxes whose decoding does not give back the original pixels
LOSSY_SYNTAXES = frozenset(
    {
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLSNearLossless,
        uid.JPEG2000,
        uid.JPEG2000MC,
        uid.HTJ2K,
    }
)


class TranscodeError(DicomError, ValueError):
    """The stored instance cannot be decompressed here (no decoder, damaged pixel data)."""


def needs_fallback(transfer_syntax_uid: str) -> bool:
    """Whether a receiver that refuses this syntax may get a decompressed copy instead."""
    return uid.UID(transfer_syntax_uid).is_compressed


def decompressed_data_set(part10: bytes, transfer_syntax_uid: str) -> bytes:
    """The data set of a stored Part 10 file, decompressed and encoded in
    ``transfer_syntax_uid`` (one of ``FALLBACK_SYNTAXES``)."""
    try:
        ds = dcmread(io.BytesIO(part10))
    except Exception as exc:  # pydicom raises many kinds
        raise TranscodeError(f"cannot parse: {type(exc).__name__}: {exc}") from None
    return decompressed(ds, transfer_syntax_uid)


def decompressed(ds: Dataset, transfer_syntax_uid: str) -> bytes:
    """``ds`` (a stored instance as read, with its File Meta; changed in place) decompressed
    and encoded in ``transfer_syntax_uid`` (one of ``FALLBACK_SYNTAXES``)."""
    target = uid.UID(transfer_syntax_uid)
    if target not in FALLBACK_SYNTAXES:
        raise TranscodeError(f"{target.name} is not a fallback syntax")
    try:
        stored = uid.UID(ds.file_meta.TransferSyntaxUID)
        lossy = stored in LOSSY_SYNTAXES or ds.get("LossyImageCompression") == "01"
        ds.decompress(generate_instance_uid=False)  # the same instance, not a derived one
    except Exception as exc:  # pydicom and its plugins raise many kinds
        raise TranscodeError(f"cannot decompress: {type(exc).__name__}: {exc}") from None
    if lossy:
        ds.LossyImageCompression = "01"
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = target.is_implicit_VR, True
    try:
        write_dataset(fp, ds)
    except Exception as exc:
        raise TranscodeError(
            f"cannot encode the decompressed copy: {type(exc).__name__}: {exc}"
        ) from None
    return fp.getvalue()
