"""A checker for DICOM audit messages, written for the tests from the standard, not from our code:
the element and attribute grammar of PS3.15 A.5.1 (the DICOM Audit Message Schema, RELAX NG)
and the per-event rules of A.5.3 for the events the gateway sends.

``problems(xml)`` returns what is wrong (empty: valid); ``check(xml)`` raises with the list.
It is a hand translation of the grammar (element order and cardinality, required and allowed
attributes, enumerations, datatypes), so a message we send that an audit repository's
validator would refuse fails the tests.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from xml.etree import ElementTree as ET

# -- A.5.1: the grammar ---------------------------------------------------------------------

CODED = {"csd-code": True, "codeSystemName": True, "displayName": False, "originalText": True}
UNBOUNDED = 10**9

# element -> (children in order: (name, min, max)), attributes: name -> required
GRAMMAR: dict[str, tuple[list[tuple[str, int, int]], dict[str, bool]]] = {
    "AuditMessage": (
        [
            ("EventIdentification", 1, 1),
            ("ActiveParticipant", 1, UNBOUNDED),
            ("AuditSourceIdentification", 1, 1),
            ("ParticipantObjectIdentification", 0, UNBOUNDED),
        ],
        {},
    ),
    "EventIdentification": (
        [
            ("EventID", 1, 1),
            ("EventTypeCode", 0, UNBOUNDED),
            ("EventOutcomeDescription", 0, 1),
            ("PurposeOfUse", 0, UNBOUNDED),
        ],
        {"EventActionCode": False, "EventDateTime": True, "EventOutcomeIndicator": True},
    ),
    "EventID": ([], CODED),
    "EventTypeCode": ([], CODED),
    "PurposeOfUse": ([], CODED),
    "EventOutcomeDescription": ([], {}),
    "ActiveParticipant": (
        [("RoleIDCode", 0, UNBOUNDED), ("MediaIdentifier", 0, 1)],
        {
            "UserID": True,
            "AlternativeUserID": False,
            "UserName": False,
            "UserIsRequestor": True,
            "NetworkAccessPointID": False,
            "NetworkAccessPointTypeCode": False,
        },
    ),
    "RoleIDCode": ([], CODED),
    "MediaIdentifier": ([("MediaType", 1, 1)], {}),
    "MediaType": ([], CODED),
    "AuditSourceIdentification": (
        [("AuditSourceTypeCode", 0, UNBOUNDED)],
        {"AuditEnterpriseSiteID": False, "AuditSourceID": True},
    ),
    "AuditSourceTypeCode": ([], CODED),
    "ParticipantObjectIdentification": (
        [
            ("ParticipantObjectIDTypeCode", 1, 1),
            ("ParticipantObjectName|ParticipantObjectQuery", 0, 1),
            ("ParticipantObjectDetail", 0, UNBOUNDED),
            ("ParticipantObjectDescription", 0, UNBOUNDED),
            ("MPPS", 0, UNBOUNDED),
            ("Accession", 0, UNBOUNDED),
            ("SOPClass", 0, UNBOUNDED),
            ("ParticipantObjectContainsStudy", 0, 1),
            ("Encrypted", 0, 1),
            ("Anonymized", 0, 1),
        ],
        {
            "ParticipantObjectID": True,
            "ParticipantObjectTypeCode": False,
            "ParticipantObjectTypeCodeRole": False,
            "ParticipantObjectDataLifeCycle": False,
            "ParticipantObjectSensitivity": False,
        },
    ),
    "ParticipantObjectIDTypeCode": ([], CODED),
    "ParticipantObjectName": ([], {}),
    "ParticipantObjectQuery": ([], {}),
    "ParticipantObjectDescription": ([], {}),
    "ParticipantObjectDetail": ([], {"type": True, "value": True}),
    "MPPS": ([], {"UID": True}),
    "Accession": ([], {"Number": True}),
    "SOPClass": ([("Instance", 0, UNBOUNDED)], {"UID": False, "NumberOfInstances": True}),
    "Instance": ([], {"UID": True}),
    "ParticipantObjectContainsStudy": ([("StudyIDs", 0, UNBOUNDED)], {}),
    "StudyIDs": ([], {"UID": True}),
    "Encrypted": ([], {}),
    "Anonymized": ([], {}),
}

ENUMERATIONS = {
    "EventActionCode": {"C", "R", "U", "D", "E"},
    "EventOutcomeIndicator": {"0", "4", "8", "12"},
    "UserIsRequestor": {"true", "false", "1", "0"},
    "NetworkAccessPointTypeCode": {"1", "2", "3", "4", "5"},
    "ParticipantObjectTypeCode": {"1", "2", "3", "4"},
    "ParticipantObjectTypeCodeRole": {str(n) for n in range(1, 25)},
    "ParticipantObjectDataLifeCycle": {str(n) for n in range(1, 16)},
}
XSD_DATETIME = re.compile(r"^-?\d{4,}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")
TEXT_ONLY = {
    "EventOutcomeDescription",
    "ParticipantObjectName",
    "ParticipantObjectQuery",
    "ParticipantObjectDescription",
    "Encrypted",
    "Anonymized",
}


def _base64_ok(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _token_ok(text: str) -> bool:
    return text == " ".join(text.split())


def _element(e: ET.Element, path: str, out: list[str]) -> None:
    if e.tag not in GRAMMAR:
        out.append(f"{path}: element {e.tag} is not in the schema")
        return
    children_spec, attributes = GRAMMAR[e.tag]
    for name, required in attributes.items():
        if required and name not in e.attrib:
            out.append(f"{path}: required attribute {name} missing")
    for name, value in e.attrib.items():
        if name not in attributes:
            out.append(f"{path}: attribute {name} is not allowed on {e.tag}")
        if name in ENUMERATIONS and value not in ENUMERATIONS[name]:
            out.append(f"{path}/@{name}: {value!r} not one of {sorted(ENUMERATIONS[name])}")
        if name == "EventDateTime":
            if not XSD_DATETIME.match(value):
                out.append(f"{path}/@EventDateTime: {value!r} is not an xsd:dateTime")
            else:
                try:
                    datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    out.append(f"{path}/@EventDateTime: {value!r} is not a real date and time")
        if name == "NumberOfInstances" and not value.isdigit():
            out.append(f"{path}/@NumberOfInstances: {value!r} is not an integer")
        if name == "value" and e.tag == "ParticipantObjectDetail" and not _base64_ok(value):
            out.append(f"{path}/@value: not base64")
        if name in (
            "csd-code",
            "codeSystemName",
            "originalText",
            "ParticipantObjectID",
            "AuditSourceID",
            "NetworkAccessPointID",
            "UID",
            "Number",
        ) and (not value or not _token_ok(value)):
            out.append(f"{path}/@{name}: {value!r} is not a non-empty xsd:token")
    if e.tag == "ParticipantObjectQuery" and not _base64_ok(e.text or ""):
        out.append(f"{path}: ParticipantObjectQuery is not base64")
    if e.tag in ("Encrypted", "Anonymized") and (e.text or "") not in ("true", "false", "1", "0"):
        out.append(f"{path}: {e.tag} is not xsd:boolean")
    if e.tag not in TEXT_ONLY and (e.text or "").strip():
        out.append(f"{path}: {e.tag} must not hold text")
    # children: in the grammar's order, each within its cardinality
    kids = list(e)
    i = 0
    for names, low, high in children_spec:
        allowed = names.split("|")
        n = 0
        while i < len(kids) and kids[i].tag in allowed:
            _element(kids[i], f"{path}/{kids[i].tag}", out)
            i += 1
            n += 1
        if n < low:
            out.append(f"{path}: needs at least {low} {names}, has {n}")
        if n > high:
            out.append(f"{path}: allows at most {high} {names}, has {n}")
    for extra in kids[i:]:
        out.append(f"{path}: {extra.tag} is not allowed here (wrong element or order)")


# -- A.5.3: the events ---------------------------------------------------------------------

DCM_MEANINGS = {  # PS3.16 CID 400-404 (the codes these messages use)
    "110100": "Application Activity",
    "110104": "DICOM Instances Transferred",
    "110110": "Patient Record",
    "110112": "Query",
    "110113": "Security Alert",
    "110120": "Application Start",
    "110121": "Application Stop",
    "110126": "Node Authentication",
    "110133": "Audit Recording Stopped",
    "110150": "Application",
    "110151": "Application Launcher",
    "110152": "Destination Role ID",
    "110153": "Source Role ID",
    "110180": "Study Instance UID",
    "110181": "SOP Class UID",
    "110182": "Node ID",
}


def _code(e: ET.Element | None) -> str | None:
    return None if e is None else e.get("csd-code")


def _roles(root: ET.Element) -> list[tuple[str | None, str]]:
    return [
        (_code(p.find("RoleIDCode")), p.get("UserIsRequestor", ""))
        for p in root.findall("ActiveParticipant")
    ]


def _objects(root: ET.Element, type_code: str, role: str, id_type: str) -> list[ET.Element]:
    return [
        o
        for o in root.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCode") == type_code
        and o.get("ParticipantObjectTypeCodeRole") == role
        and _code(o.find("ParticipantObjectIDTypeCode")) == id_type
    ]


def _event_rules(root: ET.Element, out: list[str]) -> None:
    for coded in root.iter():
        if coded.get("codeSystemName") == "DCM":
            want = DCM_MEANINGS.get(coded.get("csd-code", ""))
            if want is not None and coded.get("originalText") != want:
                out.append(
                    f"{coded.tag} {coded.get('csd-code')}: meaning {coded.get('originalText')!r}, PS3.16 says {want!r}"
                )
    event = root.find("EventIdentification")
    if event is None:
        return
    event_id = _code(event.find("EventID"))
    action = event.get("EventActionCode")
    types = [_code(t) for t in event.findall("EventTypeCode")]
    roles = _roles(root)
    requestors = [r for r in roles if r[1] in ("true", "1")]
    if event_id == "110100":  # A.5.3.1 Application Activity
        if action != "E" or types not in (["110120"], ["110121"]):
            out.append(
                "Application Activity: EventActionCode E and one EventTypeCode 110120/110121"
            )
        if not any(r[0] == "110150" for r in roles):
            out.append("Application Activity: an ActiveParticipant with role 110150 (Application)")
    elif event_id == "110104":  # A.5.3.7 DICOM Instances Transferred
        if action not in ("C", "R", "U"):
            out.append(f"Instances Transferred: EventActionCode C, R or U, not {action}")
        if not any(r[0] == "110153" for r in roles) or not any(r[0] == "110152" for r in roles):
            out.append(
                "Instances Transferred: a Source (110153) and a Destination (110152) participant"
            )
        if not requestors:
            out.append("Instances Transferred: one participant is the requestor")
        studies = _objects(root, "2", "3", "110180")
        if not studies or any(not s.findall("SOPClass") for s in studies):
            out.append("Instances Transferred: >= 1 study object (110180) with its SOP classes")
        if len(_objects(root, "1", "1", "2")) != 1:
            out.append("Instances Transferred: exactly one patient (ID type 2, RFC-3881)")
    elif event_id == "110110":  # A.5.3.9 Patient Record
        if action not in ("C", "R", "U", "D"):
            out.append(f"Patient Record: EventActionCode C, R, U or D, not {action}")
        if not requestors:
            out.append("Patient Record: the process or person that changed it is the requestor")
        if len(_objects(root, "1", "1", "2")) != 1:
            out.append("Patient Record: exactly one patient (ID type 2, RFC-3881)")
    elif event_id == "110112":  # A.5.3.10 Query
        if action != "E":
            out.append("Query: EventActionCode E")
        if not any(r[0] == "110153" and r[1] in ("true", "1") for r in roles):
            out.append("Query: the requestor is the Source (110153)")
        queried = _objects(root, "2", "3", "110181")
        if len(queried) != 1 or queried[0].find("ParticipantObjectQuery") is None:
            out.append("Query: one SOP Queried object (110181) with ParticipantObjectQuery")
        elif not any(
            d.get("type") == "TransferSyntax" for d in queried[0].findall("ParticipantObjectDetail")
        ):
            out.append("Query: a TransferSyntax ParticipantObjectDetail")
    elif event_id == "110113":  # A.5.3.11 Security Alert
        if action != "E" or not types:
            out.append("Security Alert: EventActionCode E and an EventTypeCode (CID 403)")
        for p in root.findall("ActiveParticipant")[1:]:
            if p.get("UserIsRequestor") not in ("false", "0"):
                out.append("Security Alert: performing participants have UserIsRequestor false")
    else:
        out.append(f"EventID {event_id} is not an event this checker knows")


def problems(xml: bytes) -> list[str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return [f"not well-formed XML: {exc}"]
    out: list[str] = []
    if root.tag != "AuditMessage":
        return [f"root element is {root.tag}, not AuditMessage"]
    _element(root, "AuditMessage", out)
    _event_rules(root, out)
    return out


def check(xml: bytes) -> ET.Element:
    found = problems(xml)
    if found:
        raise AssertionError(
            "invalid DICOM audit message:\n  "
            + "\n  ".join(found)
            + f"\n{xml.decode(errors='replace')}"
        )
    return ET.fromstring(xml)


# -- RFC 5424 -------------------------------------------------------------------------------

RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<hostname>[!-~]{1,255}) (?P<app>[!-~]{1,48}) "
    rb"(?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) (?P<sd>-|\[.*?\]) ?(?P<msg>.*)$",
    re.S,
)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")


def parse_syslog(line: bytes) -> dict[str, object]:
    """The fields of one RFC 5424 message (the MSG without its BOM); AssertionError if invalid."""
    match = RFC5424.match(line)
    assert match, f"not an RFC 5424 message: {line[:200]!r}"
    pri = int(match["pri"])
    assert pri <= 191, pri
    stamp = match["timestamp"].decode()
    assert RFC3339.match(stamp), f"TIMESTAMP {stamp!r} is not RFC 3339 as RFC 5424 asks"
    msg = match["msg"]
    assert msg.startswith(b"\xef\xbb\xbf"), "MSG of a UTF-8 message starts with the BOM"
    body = msg[3:]
    body.decode("utf-8")  # valid UTF-8
    return {
        "facility": pri // 8,
        "severity": pri % 8,
        "timestamp": stamp,
        "hostname": match["hostname"].decode(),
        "app": match["app"].decode(),
        "procid": match["procid"].decode(),
        "msgid": match["msgid"].decode(),
        "body": body,
    }
