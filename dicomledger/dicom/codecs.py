"""Which pixel data decoders this installation has, for the lossless syntaxes the pixel hash
decodes (``pixelhash.LOSSLESS_TRANSFER_SYNTAXES``). JPEG Lossless (Process 14) needs
pylibjpeg-libjpeg (GPLv3, the optional ``jpeg-gpl`` extra) or python-gdcm; without either,
such instances are stored, anchored and served by their bytes as received, with no decoded-
pixel hash (README, "Licences")."""

from __future__ import annotations

from pydicom import uid
from pydicom.pixels import get_decoder

from dicomledger.dicom.pixelhash import LOSSLESS_TRANSFER_SYNTAXES


def missing_lossless_decoders() -> list[str]:
    """Names of the compressed lossless transfer syntaxes no installed plugin can decode."""
    missing = []
    for syntax in sorted(LOSSLESS_TRANSFER_SYNTAXES):
        ts = uid.UID(syntax)
        if not ts.is_compressed:
            continue
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:  # pydicom has no decoder class for it at all
            available = False
        if not available:
            missing.append(ts.name)
    return missing
