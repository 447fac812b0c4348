"""DICOM audit messages (PS3.15 Annex A.5): the XML of the A.5.1 schema, built from plain values.

Pure: no I/O, no clock. ``AuditMessage`` holds one message; ``to_xml`` writes it in the element
order the schema's RELAX NG grammar fixes; the builders below fill in the fields A.5.3 asks of
each event this gateway reports. Codes are (code value, coding scheme, meaning) as in PS3.16:
CID 400 event IDs, CID 401/403 event types, CID 402 participant roles, CID 404 object ID types.

These messages name patients (ID and name) and studies: that is what an audit repository is
for, and it is the hospital's. They go to the audit repository only, never to our logs or ledger.

Where PS3.17's example and some archives nest ``SOPClass`` / ``Accession`` inside
``ParticipantObjectDescription``, we follow the normative A.5.1 schema: they are children of
``ParticipantObjectIdentification`` after its descriptions (DICOMObjectDescriptionContents).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from xml.etree import ElementTree as ET


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str


# CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")

# CID 401 Audit Event Type Code (Application Activity) and CID 403 (Security Alert)
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
AUDIT_RECORDING_STOPPED = Code("110133", "DCM", "Audit Recording Stopped")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = Code("110135", "DCM", "Object Security Attributes Changed")
# CID 403 is extensible; our own events use a private coding scheme (PS3.16: "99" prefix).
PRIVATE_SCHEME = "99DICOMLEDGER"
TAMPER_ALARM = Code("DL-TAMPER", PRIVATE_SCHEME, "Stored Instance Differs From Its Ledger Anchor")
EQUIVOCATION = Code("DL-EQUIVOCATION", PRIVATE_SCHEME, "Peer Gateway Signed Two Histories")
ASSOCIATION_LIMIT = Code("DL-ASSOC-LIMIT", PRIVATE_SCHEME, "Association Refused At Capacity")

# CID 402 Audit Active Participant Role ID Code
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")

# CID 404 Audit Participant Object ID Type Code, and RFC 3881's
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
NODE_ID = Code("110182", "DCM", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
# A patient known to us only by its ledger pseudonym (the stored file is gone or unreadable).
PATIENT_PSEUDONYM = Code("DL-PATIENT-PSEUDONYM", PRIVATE_SCHEME, "Patient Pseudonym")
STUDY_PSEUDONYM = Code("DL-STUDY-PSEUDONYM", PRIVATE_SCHEME, "Study Pseudonym")

# RFC 3881 AuditSourceTypeCode 4: application server process or thread
APPLICATION_SERVER = Code("4", "RFC-3881", "Application Server Process")

# EventOutcomeIndicator
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
# NetworkAccessPointTypeCode
MACHINE_NAME, IP_ADDRESS = "1", "2"
# ParticipantObjectTypeCode and ...TypeCodeRole (RFC 3881)
PERSON, SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE = "1", "3", "13"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process (AE, gateway) or person taking part in the event."""

    user_id: str
    is_requestor: bool
    role: Code | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None
    address: str | None = None  # NetworkAccessPointID
    address_type: str | None = None  # MACHINE_NAME or IP_ADDRESS


@dataclass(frozen=True)
class SopClassCount:
    uid: str
    count: int
    instances: tuple[str, ...] = ()  # SOP Instance UIDs, when a message names them


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: the patient, a study, a query, an alert's subject."""

    object_id: str
    id_type: Code
    type_code: str | None = None
    role: str | None = None
    name: str | None = None  # ParticipantObjectName (e.g. the patient's name)
    query: bytes | None = None  # ParticipantObjectQuery (base64 on the wire)
    details: tuple[tuple[str, bytes], ...] = ()  # ParticipantObjectDetail type/value pairs
    descriptions: tuple[str, ...] = ()
    accessions: tuple[str, ...] = ()
    sop_classes: tuple[SopClassCount, ...] = ()


@dataclass(frozen=True)
class AuditSource:
    source_id: str
    enterprise_site: str | None = None
    type_code: Code = APPLICATION_SERVER


@dataclass(frozen=True)
class AuditMessage:
    event_id: Code
    action: str | None  # EventActionCode: C R U D E
    time: datetime
    outcome: int
    source: AuditSource
    participants: tuple[Participant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    type_codes: tuple[Code, ...] = ()
    outcome_description: str | None = None
    severity: int = field(default=5, compare=False)  # syslog severity: 5 notice, 4 warning


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _attrs(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


def _xml_time(t: datetime) -> str:
    """xsd:dateTime in UTC with milliseconds (A.5.2.5: unambiguous as to time zone)."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _token(text: str) -> str:
    """An xsd:token: no control characters (XML 1.0 cannot carry most of them), single spaces."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def to_xml(message: AuditMessage) -> bytes:
    """The message as UTF-8 XML, one line, without an XML declaration (RFC 5424 MSG after a BOM)."""
    root = ET.Element("AuditMessage")
    event = ET.SubElement(
        root,
        "EventIdentification",
        _attrs(
            EventActionCode=message.action,
            EventDateTime=_xml_time(message.time),
            EventOutcomeIndicator=str(message.outcome),
        ),
    )
    _coded(event, "EventID", message.event_id)
    for code in message.type_codes:
        _coded(event, "EventTypeCode", code)
    if message.outcome_description:
        ET.SubElement(event, "EventOutcomeDescription").text = _token(message.outcome_description)
    for p in message.participants:
        element = ET.SubElement(
            root,
            "ActiveParticipant",
            _attrs(
                UserID=p.user_id,
                AlternativeUserID=p.alternative_user_id,
                UserName=p.user_name,
                UserIsRequestor="true" if p.is_requestor else "false",
                NetworkAccessPointID=p.address,
                NetworkAccessPointTypeCode=p.address_type if p.address else None,
            ),
        )
        if p.role is not None:
            _coded(element, "RoleIDCode", p.role)
    source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        _attrs(
            AuditEnterpriseSiteID=message.source.enterprise_site,
            AuditSourceID=message.source.source_id,
        ),
    )
    _coded(source, "AuditSourceTypeCode", message.source.type_code)
    for o in message.objects:
        element = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            _attrs(
                ParticipantObjectID=_token(o.object_id),
                ParticipantObjectTypeCode=o.type_code,
                ParticipantObjectTypeCodeRole=o.role,
            ),
        )
        _coded(element, "ParticipantObjectIDTypeCode", o.id_type)
        if o.name is not None:
            ET.SubElement(element, "ParticipantObjectName").text = _token(o.name)
        elif o.query is not None:
            ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(
                o.query
            ).decode("ascii")
        for kind, value in o.details:
            ET.SubElement(
                element,
                "ParticipantObjectDetail",
                {"type": kind, "value": base64.b64encode(value).decode("ascii")},
            )
        for text in o.descriptions:
            ET.SubElement(element, "ParticipantObjectDescription").text = _token(text)
        for number in o.accessions:
            ET.SubElement(element, "Accession", {"Number": _token(number)})
        for sop in o.sop_classes:
            sop_element = ET.SubElement(
                element, "SOPClass", {"UID": sop.uid, "NumberOfInstances": str(sop.count)}
            )
            for uid in sop.instances:
                ET.SubElement(sop_element, "Instance", {"UID": uid})
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return xml


# -- the participants and objects the events share ---------------------------------------------


@dataclass(frozen=True)
class Node:
    """A DICOM application entity at an address; ``pid`` only for this gateway's own process."""

    ae_title: str
    address: str | None = None
    pid: int | None = None

    def participant(self, role: Code | None, is_requestor: bool) -> Participant:
        address_type = None
        if self.address:
            address_type = IP_ADDRESS if _is_ip(self.address) else MACHINE_NAME
        return Participant(
            # A.5.2.1: a process is named by its process ID where we know it, with its AE titles
            # as the alternative user ID; a remote AE only by its AE title.
            user_id=str(self.pid) if self.pid is not None else self.ae_title,
            alternative_user_id=f"AETITLES={self.ae_title}",
            is_requestor=is_requestor,
            role=role,
            address=self.address or None,
            address_type=address_type,
        )


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str | None = None
    pseudonym_only: bool = False  # patient_id is our ledger pseudonym, not the Patient ID

    def participant_object(self, descriptions: tuple[str, ...] = ()) -> ParticipantObject:
        return ParticipantObject(
            object_id=self.patient_id or "(no Patient ID)",
            id_type=PATIENT_PSEUDONYM if self.pseudonym_only else PATIENT_NUMBER,
            type_code=PERSON,
            role=ROLE_PATIENT,
            name=self.name or None,
            descriptions=descriptions,
        )


@dataclass(frozen=True)
class Study:
    study_uid: str
    sop_classes: tuple[SopClassCount, ...] = ()
    accession: str | None = None
    pseudonym_only: bool = False

    def participant_object(self, descriptions: tuple[str, ...] = ()) -> ParticipantObject:
        return ParticipantObject(
            object_id=self.study_uid,
            id_type=STUDY_PSEUDONYM if self.pseudonym_only else STUDY_INSTANCE_UID,
            type_code=SYSTEM_OBJECT,
            role=ROLE_REPORT,
            descriptions=descriptions,
            accessions=(self.accession,) if self.accession else (),
            sop_classes=self.sop_classes,
        )


# -- the events (A.5.3) -------------------------------------------------------------------------


def application_activity(
    *,
    started: bool,
    application: Node,
    launcher: str | None,
    source: AuditSource,
    time: datetime,
) -> AuditMessage:
    """A.5.3.1 Application Activity: the gateway started or stopped."""
    participants = [application.participant(ROLE_APPLICATION, is_requestor=launcher is None)]
    if launcher is not None:
        participants.append(
            Participant(user_id=launcher, is_requestor=True, role=ROLE_APPLICATION_LAUNCHER)
        )
    return AuditMessage(
        event_id=APPLICATION_ACTIVITY,
        action="E",
        time=time,
        outcome=SUCCESS,
        source=source,
        type_codes=(APPLICATION_START if started else APPLICATION_STOP,),
        participants=tuple(participants),
    )


def instances_transferred(
    *,
    sender: Node,
    receiver: Node,
    requestor: Node | Literal["sender", "receiver"],
    patient: Patient,
    studies: Sequence[Study],
    outcome: int,
    outcome_description: str | None,
    source: AuditSource,
    time: datetime,
) -> AuditMessage:
    """A.5.3.7 DICOM Instances Transferred: one patient's instances moved between two AEs.

    ``requestor``: who asked for the transfer: the sender (C-STORE, forwarding), the receiver
    (C-GET), or a third AE (the C-MOVE requestor). EventActionCode: C when we are the receiver
    (the instances were created here), R when we read them to send them.
    """
    participants = [
        sender.participant(ROLE_SOURCE, requestor == "sender"),
        receiver.participant(ROLE_DESTINATION, requestor == "receiver"),
    ]
    if isinstance(requestor, Node):
        participants.append(requestor.participant(None, True))
    return AuditMessage(
        event_id=INSTANCES_TRANSFERRED,
        action="C" if receiver.pid is not None else "R",
        time=time,
        outcome=outcome,
        outcome_description=outcome_description,
        source=source,
        participants=tuple(participants),
        objects=tuple(s.participant_object() for s in studies) + (patient.participant_object(),),
        severity=5 if outcome == SUCCESS else 4,
    )


def query(
    *,
    requestor: Node,
    responder: Node,
    sop_class_uid: str,
    identifier: bytes,
    transfer_syntax_uid: str,
    source: AuditSource,
    time: datetime,
) -> AuditMessage:
    """A.5.3.10 Query: a C-FIND, with its identifier as received (ParticipantObjectQuery)."""
    return AuditMessage(
        event_id=QUERY,
        action="E",
        time=time,
        outcome=SUCCESS,
        source=source,
        participants=(
            requestor.participant(ROLE_SOURCE, True),
            responder.participant(ROLE_DESTINATION, False),
        ),
        objects=(
            ParticipantObject(
                object_id=sop_class_uid,
                id_type=SOP_CLASS_UID,
                type_code=SYSTEM_OBJECT,
                role=ROLE_REPORT,
                query=identifier,
                details=(("TransferSyntax", transfer_syntax_uid.encode("ascii")),),
            ),
        ),
    )


def patient_record(
    *,
    action: str,
    changed_by: Node,
    patient: Patient,
    study: str | None,
    description: str,
    source: AuditSource,
    time: datetime,
) -> AuditMessage:
    """A.5.3.9 Patient Record: the patient's record here changed (C create, U update, D delete);
    for this gateway, the patient's access permissions (a grant or a revocation), of one study
    if ``study`` names it."""
    objects: tuple[ParticipantObject, ...] = (patient.participant_object((description,)),)
    if study is not None:
        objects = (Study(study).participant_object((description,)),) + objects
    return AuditMessage(
        event_id=PATIENT_RECORD,
        action=action,
        time=time,
        outcome=SUCCESS,
        source=source,
        participants=(changed_by.participant(ROLE_APPLICATION, True),),
        objects=objects,
    )


def security_alert(
    *,
    alert: Code,
    outcome: int,
    reporter: Node,
    performers: Sequence[Participant] = (),
    subjects: Sequence[ParticipantObject] = (),
    description: str | None,
    source: AuditSource,
    time: datetime,
) -> AuditMessage:
    """A.5.3.11 Security Alert. ``outcome``: SUCCESS informs; MINOR/SERIOUS_FAILURE: an attack or
    fault that was stopped; MAJOR_FAILURE: security may be compromised."""
    return AuditMessage(
        event_id=SECURITY_ALERT,
        action="E",
        time=time,
        outcome=outcome,
        outcome_description=description,
        source=source,
        type_codes=(alert,),
        participants=(reporter.participant(None, True), *performers),
        objects=tuple(subjects),
        severity=5 if outcome == SUCCESS else 4,
    )


def node_subject(node_id: str, description: str) -> ParticipantObject:
    """An alert's subject that is a network node (an address, a peer gateway's origin)."""
    return ParticipantObject(
        object_id=node_id,
        id_type=NODE_ID,
        type_code=SYSTEM_OBJECT,
        role=ROLE_SECURITY_RESOURCE,
        descriptions=(description,),
    )


def remote(address: str, user_id: str | None = None) -> Participant:
    """A performing process known by its address (and AE title, if it told us one)."""
    return Participant(
        user_id=user_id or address,
        is_requestor=False,
        alternative_user_id=f"AETITLES={user_id}" if user_id else None,
        address=address,
        address_type=IP_ADDRESS if _is_ip(address) else MACHINE_NAME,
    )
