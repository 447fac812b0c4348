"""ATNA audit trail: DICOM audit messages (PS3.15 Annex A.5) to the hospital's audit repository,
over syslog (RFC 5424) on TLS (RFC 5425) or UDP (RFC 5426), through a durable queue.

``messages`` builds the XML, ``syslog`` frames and sends it, ``trail`` is what the gateway
calls: ``AuditSink`` (off: drops every event) or ``AuditTrail`` (on).
"""

from dicomledger.atna.trail import AuditSink, AuditTrail, PatientDirectory, SentInstance

__all__ = ["AuditSink", "AuditTrail", "PatientDirectory", "SentInstance"]
