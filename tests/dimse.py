"""A storage SCU for hostile tests, on pynetdicom: it sends a file's dataset bytes exactly as
they are (nothing parsed or re-encoded, so malformed and fuzzed datasets go out as made),
whole or only in part.

    python -m tests.dimse partial PORT CALLED_AE FILE   # send half a dataset, say "sent", wait
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

_chunked = threading.Lock()


def associate(
    port: int,
    called_ae: str,
    sop_classes: str | list[str],
    syntaxes: list[str],
    calling_ae: str = "STORESCU",
) -> Association:
    """An association proposing each SOP class with each transfer syntax in its own context
    (so every one of them can be accepted)."""
    ae = AE(ae_title=calling_ae)
    for sop_class in [sop_classes] if isinstance(sop_classes, str) else sop_classes:
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association not established"
    return assoc


def send_as_is(assoc: Association, path: Path) -> int | None:
    """C-STORE the file's dataset bytes unchanged; the response's status, None without one."""
    with _chunked:  # pynetdicom reads this switch when it sends
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            response: Dataset = assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
    return response.get("Status")


def send_part(
    assoc: Association,
    path: Path,
    fraction: float = 0.5,
    command: C_STORE | None = None,
    max_pdu: int = 16382,
) -> None:
    """Send a C-STORE request and the first ``fraction`` of its dataset's fragments, never the
    last one: the receiver is left in the middle of the dataset. ``command`` replaces the
    request (e.g. one missing a required element)."""
    meta, offset = split_dataset(path)
    req = command or store_request(meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID)
    req._dataset_path = (path, offset)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    context = next(
        cx
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == meta.MediaStorageSOPClassUID
        and cx.transfer_syntax[0] == meta.TransferSyntaxUID
    )
    fragments = list(msg.encode_msg(context.context_id, max_pdu))
    # fragments[0] is the command set; the dataset follows, its last fragment at the end
    dataset = fragments[1:-1]
    assert len(dataset) >= 2, "the dataset is too small to be sent in part"
    for p_data in fragments[:1] + dataset[: max(1, int(len(dataset) * fraction))]:
        assoc.dul.send_pdu(p_data)


def store_request(sop_class: str, sop_instance: str | None) -> C_STORE:
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    return req


if __name__ == "__main__":
    _, mode, port, called, file = sys.argv
    assert mode == "partial"
    path = Path(file)
    meta, _ = split_dataset(path)
    assoc = associate(int(port), called, meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    send_part(assoc, path)
    time.sleep(0.5)  # let the DUL thread put the fragments on the wire
    print("sent", flush=True)
    time.sleep(600)  # until killed
