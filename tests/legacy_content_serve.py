"""``python -m tests.legacy_content_serve serve --config …``: the gateway as it anchored objects
without pixel data before the canonical content hash existed, with method ``content`` (the
dataset bytes as received), so tests can check that such anchors still verify."""

import sys

from dicomledger.cli import main
from dicomledger.dicom import fastread, pixelhash
from dicomledger.dicom.canonical import NotCanonical


def _bytes_as_received(*args: object) -> bytes:
    raise NotCanonical("a gateway from before content-canonical")


# every content object falls back to `content`, on either of the ingest's paths
pixelhash.canonical_dataset = fastread.canonical_dataset = _bytes_as_received

if __name__ == "__main__":
    sys.exit(main())
