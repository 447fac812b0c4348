"""The asyncio DICOM network layer: acceptor, association state machine, DIMSE services.

    server = DicomServer(ae_title=..., host=..., port=..., allowed_calling_aes=[...],
                         on_store=async_handler, temp_dir=...)
    await server.start(); ...; await server.stop()

Layout: pdu.py (framing, fixed PDUs), negotiation.py (A-ASSOCIATE with pynetdicom's codecs),
dimse.py (command sets), filemeta.py (Part 10 header), operation.py (a request being
served, sinks, the Service interface), services.py (C-ECHO, C-STORE, C-FIND),
association.py (the per-connection state machine), server.py (the listener).
"""

from dicomledger.dicom.net.server import DicomServer

__all__ = ["DicomServer"]
