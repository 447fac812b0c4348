"""Pieces both halves use (``dicom/`` and ``ledger/``); this package imports nothing else of dicomledger."""
