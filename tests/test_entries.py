import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dicomledger.ledger import entries as E
from dicomledger.ledger.merkle import leaf_hash

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ORIGIN = "test.example/dicomledger"


def make(kind="image-anchored", index=0, prev=E.ZERO_HASH, payload=None, key=KEY):
    return E.sign_entry(
        origin=ORIGIN,
        index=index,
        prev=prev,
        time_ms=1_700_000_000_000,
        kind=kind,
        payload=payload
        if payload is not None
        else {"sha256": "ab" * 32, "n": 3, "ok": True, "x": None},
        private_key=key,
    )


@pytest.mark.parametrize("kind", sorted(E.KINDS))
def test_round_trip_every_kind(kind):
    entry, data = make(kind, payload={"kind_specific": kind, "list": [1, "two", {"z": 0, "a": 1}]})
    decoded = E.check_entry(
        data, origin=ORIGIN, index=0, prev=E.ZERO_HASH, public_key=KEY.public_key()
    )
    assert decoded == entry
    assert E.encode_entry(decoded) == data


def test_encoding_is_canonical_json():
    _, data = make()
    obj = json.loads(data)
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert list(obj) == sorted(obj)


def test_test_vector_is_stable():
    # Ed25519 is deterministic: the same fields and key always give these bytes.
    _, data = make()
    assert leaf_hash(data).hex() == leaf_hash(make()[1]).hex()
    obj = json.loads(data)
    assert obj["prev"] == "00" * 32 and obj["v"] == 1 and len(obj["sig"]) == 88


def _other_signature(data):
    obj = json.loads(data)
    obj["sig"] = base64.b64encode(bytes(64)).decode()
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _non_canonical_base64_signature(data):
    """The same signature bytes, base64 with non-zero padding bits (still decodes)."""
    obj = json.loads(data)
    sig = obj["sig"]
    assert sig.endswith("==")
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".index(sig[-3])
    obj["sig"] = (
        sig[:-3]
        + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[last | 1]
        + "=="
    )
    assert base64.b64decode(obj["sig"]) == base64.b64decode(sig)
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.replace(b'{"index"', b'{ "index"'), "canonical"),
        (
            lambda d: json.dumps(
                dict(reversed(list(json.loads(d).items()))), separators=(",", ":")
            ).encode(),
            "canonical",
        ),
        (lambda d: d.replace(b'"n":3', b'"n":3.0'), "floats"),
        (lambda d: d.replace(b'"n":3', b'"n":03'), "JSON"),
        (lambda d: d.replace(b'"ok":true', b'"ok":true,"ok":true'), "canonical"),
        (lambda d: d.replace(b'"ok":true', b'"ok":false'), "signature"),
        (lambda d: _other_signature(d), "signature"),
        (lambda d: d.replace(b'"v":1', b'"v":2'), "version"),
        (lambda d: d.replace(b'"kind":"image-anchored"', b'"kind":"bogus"'), "kind"),
        (lambda d: b"[]", "not a JSON object"),
        (lambda d: b"\xff", "UTF-8"),
        (lambda d: d[: len(d) // 2], "JSON"),
        (lambda d: d.replace(b'"v":1', b'"v":true'), "version"),
        (lambda d: d.replace(b'"n":3', b'"n":9007199254740992'), "exact JSON range"),
        (lambda d: d.replace(b'"n":3', b'"n":' + b"9" * 5000), "exact JSON range"),
        (lambda d: d.replace(b'"n":3', b'"n":NaN'), "floats"),
        (lambda d: d.replace(b'"n":3', b'"n":3e0'), "floats"),
        (lambda d: d.replace(b'"n":3', b'"n":' + b"[" * 5000 + b"]" * 5000), "JSON"),
        (lambda d: d.replace(b'"kind":"image-anchored"', b'"kind":["image-anchored"]'), "kind"),
        (lambda d: d.replace(b'"ok":true', b'"\\u00f6k":true'), "canonical"),
        (lambda d: d.replace(b'"ok":true', '"ök":true'.encode()), "ASCII"),
        (lambda d: _non_canonical_base64_signature(d), "canonical"),
    ],
)
def test_decoding_rejects_with_reason(mutate, message):
    _, data = make()
    with pytest.raises(E.EntryError, match=message):
        E.check_entry(
            mutate(data), origin=ORIGIN, index=0, prev=E.ZERO_HASH, public_key=KEY.public_key()
        )


def test_rejects_out_of_sequence_wrong_prev_wrong_key_wrong_origin():
    _, first = make(index=0)
    _, second = make(index=1, prev=leaf_hash(first))
    pub = KEY.public_key()
    assert (
        E.check_entry(second, origin=ORIGIN, index=1, prev=leaf_hash(first), public_key=pub).index
        == 1
    )
    with pytest.raises(E.EntryError, match="out of sequence"):
        E.check_entry(second, origin=ORIGIN, index=2, prev=leaf_hash(first), public_key=pub)
    with pytest.raises(E.EntryError, match="wrong previous hash"):
        E.check_entry(second, origin=ORIGIN, index=1, prev=E.ZERO_HASH, public_key=pub)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(E.EntryError, match="does not verify"):
        E.check_entry(second, origin=ORIGIN, index=1, prev=leaf_hash(first), public_key=other)
    with pytest.raises(E.EntryError, match="names origin"):
        E.check_entry(second, origin="other", index=1, prev=leaf_hash(first), public_key=pub)


def test_payload_rules():
    with pytest.raises(E.EntryError, match="floats"):
        make(payload={"x": 1.5})
    with pytest.raises(E.EntryError, match="ASCII"):
        make(payload={"clé": 1})
    with pytest.raises(E.EntryError, match="unknown entry kind"):
        make(kind="nonsense")
    with pytest.raises(E.EntryError, match="above the limit"):
        make(payload={"big": "x" * E.MAX_ENTRY_BYTES})


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"sig": "x"},
        {"nested": {"sig": "AAAA", "list": [1, {"sig": None}]}},
        {"text": "naïve ✓"},
    ],
)
def test_signing_bytes_cut_from_canonical_equal_reencoded(payload):
    entry, data = make(payload=payload)
    assert E._signing_bytes_of_canonical(data, entry) == E.signing_bytes(entry)
