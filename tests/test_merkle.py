"""Merkle tree hashing and proofs: published vectors, plans, and property tests against a
straightforward recursive RFC 6962 reference written here."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomledger.ledger import merkle
from dicomledger.ledger.merkle import (
    EMPTY_ROOT,
    ProofError,
    consistency_proof,
    consistency_proof_plan,
    fold_range,
    inclusion_proof,
    inclusion_proof_plan,
    leaf_hash,
    node_hash,
    nodes_added_by_append,
    range_nodes,
    root_of_leaf_hashes,
    root_plan,
    verify_consistency,
    verify_inclusion,
)


def b64(s: str) -> bytes:
    return base64.b64decode(s)


# --- Published vectors ------------------------------------------------------------------


# transparency-dev/merkle rfc6962/rfc6962_test.go
def test_rfc6962_hasher_vectors() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_of_leaf_hashes([]) == EMPTY_ROOT
    assert fold_range([]) == EMPTY_ROOT
    assert (
        leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert leaf_hash(b"L123456").hex() == (
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert node_hash(b"N123", b"N456").hex() == (
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


# transparency-dev/merkle testonly/constants.go: LeafInputs, NodeHashes, RootHashes
LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
NODE_HASHES = [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]
ROOT_HASHES = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
LEAF_HASHES = [leaf_hash(d) for d in LEAF_INPUTS]
NODES = {
    (lvl, i): bytes.fromhex(h) for lvl, row in enumerate(NODE_HASHES) for i, h in enumerate(row)
}


def test_testonly_node_hashes() -> None:
    for (level, index), want in NODES.items():
        lo, hi = index << level, (index + 1) << level
        assert root_of_leaf_hashes(LEAF_HASHES[lo:hi]) == want


@pytest.mark.parametrize("size", range(9))
def test_testonly_root_hashes(size: int) -> None:
    want = bytes.fromhex(ROOT_HASHES[size])
    assert root_of_leaf_hashes(LEAF_HASHES[:size]) == want
    assert fold_range([NODES[n] for n in root_plan(size)]) == want


# transparency-dev/merkle testdata/inclusion/*/happy-path.json and single-entry/
INCLUSION_VECTORS = [
    (
        0,
        1,
        "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
        "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
        [],
    ),
    (
        0,
        8,
        "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
        "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
        [
            "lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ=",
        ],
    ),
    (
        5,
        8,
        "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
        "QnGia+DYqE8L1UyMMC58s6O10fpngKQLzOKHNHfatlg=",
        [
            "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=",
            "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
            "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc=",
        ],
    ),
    (
        2,
        3,
        "rra8/idLcKFPsGel5VeCZNsPqbUa9eC6FZFY8yngbnc=",
        "ApjRIpBtz8EIkstTpzmS/FufST6kybrbJ7eRtBJ6f+c=",
        ["+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU="],
    ),
    (
        1,
        5,
        "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=",
        "lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
        [
            "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=",
        ],
    ),
    (
        0,
        1,
        "DTrtAjFI/9KiWfvQzcf7PPl1ZYdg03dbgq9vkKrMLfw=",
        "DTrtAjFI/9KiWfvQzcf7PPl1ZYdg03dbgq9vkKrMLfw=",
        [],
    ),
]


@pytest.mark.parametrize(("index", "size", "root", "leaf", "proof"), INCLUSION_VECTORS)
def test_published_inclusion_vectors(
    index: int, size: int, root: str, leaf: str, proof: list[str]
) -> None:
    hashes = [b64(p) for p in proof]
    verify_inclusion(b64(leaf), index, size, hashes, b64(root))
    if b64(root) == bytes.fromhex(ROOT_HASHES[size]):  # vectors over the testonly tree
        assert inclusion_proof(index, size, LEAF_HASHES) == hashes


# testdata/inclusion/additional/* and single-entry/*: all must fail ("" is an empty hash).
EMPTY_B64 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
RANDOM_LEAF = "q6yroAAAAAAAAAAAAAAAAAAAAAAAAAAAAGAGHgASNFY="
ONE = "DTrtAjFI/9KiWfvQzcf7PPl1ZYdg03dbgq9vkKrMLfw="


@pytest.mark.parametrize(
    ("index", "size", "root", "leaf"),
    [
        (i, n, root, leaf)
        for i, n in [(0, 0), (0, 1), (1, 0), (2, 1)]
        for root, leaf in [(EMPTY_B64, RANDOM_LEAF), (EMPTY_B64, ""), ("", RANDOM_LEAF)]
    ]
    + [(0, 1, ONE, ""), (0, 1, "", ""), (0, 1, "", ONE)],
)
def test_published_bad_inclusion_vectors(index: int, size: int, root: str, leaf: str) -> None:
    with pytest.raises(ProofError):
        verify_inclusion(b64(leaf), index, size, [], b64(root))


# transparency-dev/merkle testdata/consistency/*/happy-path.json
CONSISTENCY_VECTORS = [
    (
        1,
        1,
        "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
        "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
        [],
    ),
    (
        1,
        8,
        "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
        "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
        [
            "lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ=",
        ],
    ),
    (
        6,
        8,
        "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
        "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
        [
            "DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
            "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
            "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc=",
        ],
    ),
    (
        2,
        5,
        "+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU=",
        "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=",
        [
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=",
        ],
    ),
    (
        6,
        7,
        "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
        "3bib5AOAnjJXUNPSY814kpwpQreUKjS3fhIslZSnTIw=",
        [
            "DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
            "sIaT7C5yFZcTBkHoIR5+7cy0wmQTlj7ubB4u0W/7Gl8=",
            "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc=",
        ],
    ),
]


@pytest.mark.parametrize(("old", "new", "root1", "root2", "proof"), CONSISTENCY_VECTORS)
def test_published_consistency_vectors(
    old: int, new: int, root1: str, root2: str, proof: list[str]
) -> None:
    hashes = [b64(p) for p in proof]
    verify_consistency(old, new, b64(root1), b64(root2), hashes)
    assert consistency_proof(old, new, LEAF_HASHES) == hashes


# testdata/consistency/additional/*.json. Two differ from transparency-dev on purpose:
# it rejects every proof from size 0 as "meaningless"; C2SP tlog-witness says the empty
# tree is consistent with any tree given an empty proof, so we accept that (old root must be
# the empty tree's); and we reject roots that are not 32 bytes even when sizes are equal.
DC1, DC2 = "ZG9uJ3QgY2FyZSAx", "ZG9uJ3QgY2FyZSAy"  # "don't care 1", "don't care 2" (12 bytes)


@pytest.mark.parametrize(
    ("old", "new", "root1", "root2", "proof"),
    [
        (0, 1, EMPTY_B64, EMPTY_B64, [EMPTY_B64]),
        (0, 0, EMPTY_B64, DC2, []),
        (1, 1, EMPTY_B64, DC2, []),
        (2, 1, DC1, DC2, []),
        (1, 0, DC1, DC2, []),
        (0, 1, DC1, DC2, []),
        (0, 1, EMPTY_B64, DC2, []),
        (1, 1, DC1, DC2, []),
        (0, 0, DC1, DC1, []),
        (0, 0, DC1, DC2, []),
        (1, 2, DC1, DC2, []),
        (1, 1, EMPTY_B64, EMPTY_B64, [EMPTY_B64]),
        (0, 0, EMPTY_B64, EMPTY_B64, [EMPTY_B64]),
        (1, 1, DC2, DC2, []),  # transparency-dev accepts this one (equal sizes, equal roots)
    ],
)
def test_published_bad_consistency_vectors(
    old: int, new: int, root1: str, root2: str, proof: list[str]
) -> None:
    with pytest.raises(ProofError):
        verify_consistency(old, new, b64(root1), b64(root2), [b64(p) for p in proof])


def test_consistency_from_empty_tree() -> None:
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, bytes.fromhex(ROOT_HASHES[5]), [])
    assert consistency_proof_plan(0, 5) == []


# A real Certificate Transparency log (Google Argon 2020), as recorded in golang.org/x/mod
# sumdb/tlog/testdata/argon2020: leaf 10000 of a tree of 961984013 leaves, and consistency
# from size 3654490 to it.
ARGON_SIZE = 961984013
ARGON_ROOT = "dwlueapdd7LaOEnX2W2Wp9v2XE+KzejHRQGHwEx0oaM="
ARGON_ENTRY = (
    "AAAAAAFelPhqUwAAAAViMIIFXjCCBEagAwIBAgIRAOodHzZdqWIFzYyl/SovhCMwDQYJKoZIhvcNAQELBQAwgZAxCzAJ"
    "BgNVBAYTAkdCMRswGQYDVQQIExJHcmVhdGVyIE1hbmNoZXN0ZXIxEDAOBgNVBAcTB1NhbGZvcmQxGjAYBgNVBAoTEUNP"
    "TU9ETyBDQSBMaW1pdGVkMTYwNAYDVQQDEy1DT01PRE8gUlNBIERvbWFpbiBWYWxpZGF0aW9uIFNlY3VyZSBTZXJ2ZXIg"
    "Q0EwHhcNMTcwMjE1MDAwMDAwWhcNMjAwNDE2MjM1OTU5WjBfMSEwHwYDVQQLExhEb21haW4gQ29udHJvbCBWYWxpZGF0"
    "ZWQxHTAbBgNVBAsTFFBvc2l0aXZlU1NMIFdpbGRjYXJkMRswGQYDVQQDDBIqLmxhbmRsb3Jkcy5jb20uYXUwggEiMA0G"
    "CSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQCtPBKKHj4zdrGlCjgTHzb5gx9JCs97DwvBz60f14gDufF2haWbOxyJ0a3o"
    "pAMsZnOr8HkARVCwxdqG/PTfACcb0QM7FOlzvxGqxataTYiChwvkkif8F9GlJw69HuHgzhusPf1Ytfk3ps1PRC14Mkyr"
    "S4kwPrk/Le4XdkqRpRw62wG4V6IkbzsNMEOl1H8EgUbfyapdOcVxHjIzvBVy56fBRKG05Fr5wNq3Acak5kYZdNsLhhml"
    "rqAfAjiombW3hb3V5blJdRC0BDdYHv2+zKey6LqJ1FDoXo6IzbzPpC+aifZy47YX+/N1U64Qn5xlDg7mOP8JXfkNJHbU"
    "1TJZHif5AgMBAAGjggHhMIIB3TAfBgNVHSMEGDAWgBSQr2o6lFoL2JDqElZz30O0Oija5zAdBgNVHQ4EFgQUNQSLjkoz"
    "01I+iuuoC5lgEp0anhcwDgYDVR0PAQH/BAQDAgWgMAwGA1UdEwEB/wQCMAAwHQYDVR0lBBYwFAYIKwYBBQUHAwEGCCsG"
    "AQUFBwMCME8GA1UdIARIMEYwOgYLKwYBBAGyMQECAgcwKzApBggrBgEFBQcCARYdaHR0cHM6Ly9zZWN1cmUuY29tb2Rv"
    "LmNvbS9DUFMwCAYGZ4EMAQIBMFQGA1UdHwRNMEswSaBHoEWGQ2h0dHA6Ly9jcmwuY29tb2RvY2EuY29tL0NPTU9ET1JT"
    "QURvbWFpblZhbGlkYXRpb25TZWN1cmVTZXJ2ZXJDQS5jcmwwgYUGCCsGAQUFBwEBBHkwdzBPBggrBgEFBQcwAoZDaHR0"
    "cDovL2NydC5jb21vZG9jYS5jb20vQ09NT0RPUlNBRG9tYWluVmFsaWRhdGlvblNlY3VyZVNlcnZlckNBLmNydDAkBggr"
    "BgEFBQcwAYYYaHR0cDovL29jc3AuY29tb2RvY2EuY29tMC8GA1UdEQQoMCaCEioubGFuZGxvcmRzLmNvbS5hdYIQbGFu"
    "ZGxvcmRzLmNvbS5hdTANBgkqhkiG9w0BAQsFAAOCAQEACyHqxUzrexToY7tOv4+kyGPP2D27P1tQpyzeAl1bPObiMhNK"
    "2b9vvBLDWAaqm8c0YL1h+DBdLoWzf3xFsIkTCVCjWJTNSNlcYtgRk6or1s7jWsfXzWqsnPjPPmTIOCw7EfH7Yme3oxPs"
    "3UUsmShAgPwNohAtL9GqlqMiKM6v1WU3NHt01jEoNP23LRa6KeNK6AH6WHJykzL223IlhgXjHTeuQj6lR+TNrQXJuhwT"
    "XYe+20rrpPQxc1Pn7AqnvfWgmicRQ7gdIcr4V6+ecTvLfNOaJ0ZYe5G5giuAAdTm7F57pk04f4gyZNYKrj88mvbkoriN"
    "8b6jcWExtrYO6bm2TwAA"
)
ARGON_PROOF = """T46AmJsuOM/gFiGlUp+IJJebp+1Z5qratFNW7U0JyOQ= 9Jj1Feodn42uRYEfffkV4HF/EIPFQ5Zo9IwkxbQ2uhk=
D53/1oCNebF4J59HHgioovKZxrmrKcVuCVhy3Izg8Ck= wSFDgGSrsXRPA+1c8WHoAFCsWeUv8NDyP/Q/SgsyVyY=
516/RcwsgdwdzHn18v1dJHqBkgFUbNhmCIWOGjsMJaE= naTFY2ajLFgrgs5XUl+zJYZnnlJksLGsA1VYwpLfqbY=
mKBRJo6qao+0Kdh/rhGkZUbHUAxMhrtrclrTpIbNjIg= Co4ueOFE7lpifLio94irxxsv1wFMMaK3tPu2ZQkHlro=
yRgy800K6JMYCC05sWfqF2kvCg2riT/pVM+nEa6V5+0= n2O38XJZC8/Wpbwi9HhgVizlUyeUHVZvYyQB1607MRc=
go3tAjuNfNSCj87y2Rg1xOroDknGN1eaf3cgvzObf7Q= 8D0Mj3/J7ySSnFb0afIHYXv6rlOhECnsebY6XKi1IR8=
6rcez46ZU8M5vPiWVMAUfJfAOV0pPP/mch/lYzZhj/M= 2rtIeXrPvSdUyHc5maIgSAVB2BzaKaupWxSAiVayDE4=
nniW/IMFQPN5xw8UsHFn7CRStYbm1gLu7NNa6kkRqJQ= mRPPi7sQS22MduIEyvcNzCNFqIt6kLwYPkNKrVtIcu8=
JvTivzESNS9wHI8aph5a7uieVmtS/p9PciMZ5D6GyOo= UTyQd+Ym0wY4zG+qK806bBORwi1CSVvFQ/KknnqoZj8=
hXODrqN+ff+U6zPqRQ+ZQKs6im1fPcxIerDSfNwflhE= II6GE+WY/DrpZzfHztLwkR46o37zVkNLCyPYlf68zA0=
d609kWWcNBllbA8Jb/ad4XAVVGnScLRmtP8FYyr+Dck= rikBsP0G0gioXRpBFED2CzQdSLrGPvRd0bEcbEZw1rI=
GXIElfmnRuWfbA4z7ubV/UwlpSRUbUeec7oL5HDDnh0= pR0SH/NYP6s9+8azWwaeUXA4Ze/3WCIgMfh5YW6wvcE=
f3GuAKYVrF8RBg3s15jvA/YvV9oAliWtzP/imwPhQVA= WHn8zDxlVgkV+lSlmzaOdfSBrTHoRr5nT3d76q0KKWE=
f2uV2ZxVgULzLPKuZcowRY3ZY7fRlX59iDBjV1R8kNQ= NzQVjJsvQwbi7WStMr9oFkh9VbHfK7LB6o7WwAqwNTs=
C0LttBeYHZHgL+032JIcJC3CTBIyza/hsbmJUgJfmDI= nixU5CWTFVDlF4BGdcU6kA7WSYurEpe9jRWc+F/7sOc="""
ARGON_OLD_SIZE = 3654490
ARGON_OLD_ROOT = "AuIZ5V6sDUj1vn3Y1K85oOaQ7y+FJJKtyRTl1edIKBQ="
ARGON_CONSISTENCY = """80Sfbj6UQEdVSZCSIgh9NMPj3vCBzcc1A48B2crJSWg= FZcrgAHUk6nNPviJZq8kEK6jCG1d18pJOFE45ZDc1TQ=
Q67reWXmPBo1UfmwBap4Xi9PMPfFdUSSw3WGlRZdG7k= eJ7CyhR4PxzBxDIsWgrVYW1eFUb9ndgf46tFmiqVrxA=
QrDwp062Grm5WY8KdrhFsBuuNjGzRox2Jb8PmVL5OYw= XM4YMjMEdLH/XJam/ZWyaP14k3cmsOtnPsOWQ54lW1s=
SGiBh+jOTGccXU48ZzgQ88lRcBmtB4wz4oSDndv2QTg= WAS6txqNLYKGL1GdBdpqmV42TTfn6cJsuDsqLXuTCNI=
QFmRS0rirUA7ZN3lxFjDncV+E1OCrn3NUB4RCp+5fzc= Hdbp7It2XBNZmNDBpCN/KPd7vfVqxgzwOosqVIaEA9E=
mxvHL0ZiblBdD7j7pIa1jlfB0gSqfJ6oX0UGo7L0VsU= q5hjyvoW6TL/PThgcitpDcSTrnKX2p1+aqscqH2euRA=
jTOWDqt3IHj2NVFeezyBz2ofpru+ztEywqKUAfFclKI= GIRn0w3HqJdvU9j1WVD//eR6lk2AaTVjyzjsJNP8U88=
x52GJvxG81fnQBrgOTbll1A5tz95/LXK0Ag1NhB0r1I= 6/0OqrcTgc3o5dD5PymmoC96lB9yLPFuTHVvLy8fSGk=
Gf+iKLfcXO5l4JEFmsZvSdG5q1uEeWPfYLrds6pmjz0= DGuaco+McyM3AfRSF6qX7RwSetwe2ieYJmxw5e9rVx0=
2tQJ9V32hnYp+fdpP6TcjmgJmLeNVOMKM0Ml1kk4cNU= 3PapK+IkyJr8I9yAErAmzuZezzLMzsg+PfeRCgNW8NQ=
s6xiYeejb+wtqHA+URJZ2I/SCPyIW8coP6aB00FJbMY= z9lSpmdTcr5M5ZzKlc4EPh3SrSypKFdk6JUF/UccaZU=
GXIElfmnRuWfbA4z7ubV/UwlpSRUbUeec7oL5HDDnh0= pR0SH/NYP6s9+8azWwaeUXA4Ze/3WCIgMfh5YW6wvcE=
f3GuAKYVrF8RBg3s15jvA/YvV9oAliWtzP/imwPhQVA= WHn8zDxlVgkV+lSlmzaOdfSBrTHoRr5nT3d76q0KKWE=
f2uV2ZxVgULzLPKuZcowRY3ZY7fRlX59iDBjV1R8kNQ= NzQVjJsvQwbi7WStMr9oFkh9VbHfK7LB6o7WwAqwNTs=
C0LttBeYHZHgL+032JIcJC3CTBIyza/hsbmJUgJfmDI= nixU5CWTFVDlF4BGdcU6kA7WSYurEpe9jRWc+F/7sOc="""


def test_real_ct_log_inclusion() -> None:
    proof = [b64(p) for p in ARGON_PROOF.split()]
    leaf = leaf_hash(b64(ARGON_ENTRY))
    verify_inclusion(leaf, 10000, ARGON_SIZE, proof, b64(ARGON_ROOT))
    assert len(inclusion_proof_plan(10000, ARGON_SIZE)) == len(proof) == 30
    with pytest.raises(ProofError):
        verify_inclusion(leaf, 10001, ARGON_SIZE, proof, b64(ARGON_ROOT))


def test_real_ct_log_consistency() -> None:
    proof = [b64(p) for p in ARGON_CONSISTENCY.split()]
    verify_consistency(ARGON_OLD_SIZE, ARGON_SIZE, b64(ARGON_OLD_ROOT), b64(ARGON_ROOT), proof)
    assert len(consistency_proof_plan(ARGON_OLD_SIZE, ARGON_SIZE)) == len(proof)
    with pytest.raises(ProofError):
        verify_consistency(
            ARGON_OLD_SIZE + 1, ARGON_SIZE, b64(ARGON_OLD_ROOT), b64(ARGON_ROOT), proof
        )


# draft-ietf-plants-merkle-tree-certs "Subtree Test Vectors", as reproduced in
# transparency-dev/merkle testonly/vectors_test.go: over the tree d[i] = bytes([i]) of 130
# leaves, a rolling SHA-256 of every valid subtree's hash and of every inclusion proof in
# it. A valid subtree [start, end) is exactly an RFC 6962 subtree: start == 0, start == end,
# or start a multiple of the smallest power of two >= end - start.
def _valid_subtree(start: int, end: int) -> bool:
    if start == 0 or start == end:
        return True
    return start % (1 << (end - start - 1).bit_length()) == 0


def _complete_nodes(leaves: Sequence[bytes]) -> dict[tuple[int, int], bytes]:
    table = {(0, i): h for i, h in enumerate(leaves)}
    level, width = 0, len(leaves)
    while width > 1:
        for i in range(width // 2):
            table[(level + 1, i)] = node_hash(table[(level, 2 * i)], table[(level, 2 * i + 1)])
        level, width = level + 1, width // 2
    return table


def test_subtree_hash_and_inclusion_vectors() -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(130)]
    table = _complete_nodes(leaves)
    hashes, proofs = hashlib.sha256(), hashlib.sha256()
    for end in range(131):
        for start in range(end + 1):
            if not _valid_subtree(start, end):
                continue
            sub = fold_range([table[n] for n in range_nodes(start, end)])
            assert sub == root_of_leaf_hashes(leaves[start:end])
            hashes.update(f"[{start}, {end}) {sub.hex()}\n".encode())
            for index in range(start, end):
                proof = inclusion_proof(index - start, end - start, leaves[start:end])
                line = f"{index} [{start}, {end})" + "".join(f" {p.hex()}" for p in proof)
                proofs.update(line.encode() + b"\n")
    assert hashes.hexdigest() == "b82806ad4265bb151c1119c0f4db437bb4d1a1f887b3a7fba1cd4ebf552e3e81"
    assert proofs.hexdigest() == "ac2a8f989e44d99e399db448050ff5f19757df53cfb716aa81015d3955d8163f"


# transparency-dev/merkle proof/proof_test.go lists the node IDs of proofs; a group of nodes
# it rehashes into one element appears there smallest first, here largest first.
@pytest.mark.parametrize(
    ("index", "size", "plan"),
    [
        (0, 1, []),
        (0, 2, [[(0, 1)]]),
        (1, 2, [[(0, 0)]]),
        (1, 3, [[(0, 0)], [(0, 2)]]),
        (0, 7, [[(0, 1)], [(1, 1)], [(1, 2), (0, 6)]]),
        (1, 7, [[(0, 0)], [(1, 1)], [(1, 2), (0, 6)]]),
        (2, 7, [[(0, 3)], [(1, 0)], [(1, 2), (0, 6)]]),
        (3, 7, [[(0, 2)], [(1, 0)], [(1, 2), (0, 6)]]),
        (4, 7, [[(0, 5)], [(0, 6)], [(2, 0)]]),
        (5, 7, [[(0, 4)], [(0, 6)], [(2, 0)]]),
        (6, 7, [[(1, 2)], [(2, 0)]]),
        (2, 4, [[(0, 3)], [(1, 0)]]),
        (3, 5, [[(0, 2)], [(1, 0)], [(0, 4)]]),
        (3, 6, [[(0, 2)], [(1, 0)], [(1, 2)]]),
        (4, 6, [[(0, 5)], [(2, 0)]]),
        (10, 15, [[(0, 11)], [(1, 4)], [(1, 6), (0, 14)], [(3, 0)]]),
        (24, 31, [[(0, 25)], [(1, 13)], [(1, 14), (0, 30)], [(3, 2)], [(4, 0)]]),
        (
            81,
            95,
            [[(0, 80)], [(1, 41)], [(2, 21)], [(2, 22), (1, 46), (0, 94)], [(4, 4)], [(6, 0)]],
        ),
    ],
)
def test_inclusion_plan_vectors(index: int, size: int, plan: list[list[tuple[int, int]]]) -> None:
    assert inclusion_proof_plan(index, size) == plan


@pytest.mark.parametrize(
    ("old", "new", "plan"),
    [
        (1, 2, [[(0, 1)]]),
        (1, 4, [[(0, 1)], [(1, 1)]]),
        (1, 6, [[(0, 1)], [(1, 1)], [(1, 2)]]),
        (2, 3, [[(0, 2)]]),
        (2, 8, [[(1, 1)], [(2, 1)]]),
        (3, 7, [[(0, 2)], [(0, 3)], [(1, 0)], [(1, 2), (0, 6)]]),
        (4, 7, [[(1, 2), (0, 6)]]),
        (5, 7, [[(0, 4)], [(0, 5)], [(0, 6)], [(2, 0)]]),
        (6, 7, [[(1, 2)], [(0, 6)], [(2, 0)]]),
        (7, 8, [[(0, 6)], [(0, 7)], [(1, 2)], [(2, 0)]]),
        (1, 1, []),
        (2, 2, []),
        (3, 3, []),
        (4, 4, []),
        (5, 5, []),
        (7, 7, []),
        (8, 8, []),
        (2, 4, [[(1, 1)]]),
        (3, 5, [[(0, 2)], [(0, 3)], [(1, 0)], [(0, 4)]]),
        (3, 6, [[(0, 2)], [(0, 3)], [(1, 0)], [(1, 2)]]),
        (4, 6, [[(1, 2)]]),
        (1, 7, [[(0, 1)], [(1, 1)], [(1, 2), (0, 6)]]),
        (10, 15, [[(1, 4)], [(1, 5)], [(1, 6), (0, 14)], [(3, 0)]]),
        (24, 31, [[(3, 2)], [(2, 6), (1, 14), (0, 30)], [(4, 0)]]),
        (
            81,
            95,
            [
                [(0, 80)],
                [(0, 81)],
                [(1, 41)],
                [(2, 21)],
                [(2, 22), (1, 46), (0, 94)],
                [(4, 4)],
                [(6, 0)],
            ],
        ),
    ],
)
def test_consistency_plan_vectors(old: int, new: int, plan: list[list[tuple[int, int]]]) -> None:
    assert consistency_proof_plan(old, new) == plan


def test_plan_argument_errors() -> None:
    for index, size in [(0, 0), (1, 0), (3, 1), (7, 7), (-1, 3)]:
        with pytest.raises(ValueError):
            inclusion_proof_plan(index, size)
    for old, new in [(5, 0), (9, 8), (-1, 2)]:
        with pytest.raises(ValueError):
            consistency_proof_plan(old, new)
    with pytest.raises(ValueError):
        range_nodes(5, 3)


def test_range_nodes() -> None:
    assert range_nodes(0, 0) == []
    assert range_nodes(0, 13) == [(3, 0), (2, 2), (0, 12)]
    assert range_nodes(8, 13) == [(2, 2), (0, 12)]
    assert range_nodes(3, 13) == [(0, 3), (2, 1), (2, 2), (0, 12)]  # not an RFC subtree
    assert root_plan(2**40 + 5) == [(40, 0), (2, 2**38), (0, 2**40 + 4)]


def test_nodes_added_by_append() -> None:
    assert [nodes_added_by_append(s) for s in range(8)] == [
        [],
        [(1, 0)],
        [],
        [(1, 1), (2, 0)],
        [],
        [(1, 2)],
        [],
        [(1, 3), (2, 1), (3, 0)],
    ]
    # Appending leaf by leaf and storing exactly these nodes yields every complete node.
    stored: dict[tuple[int, int], bytes] = {}
    for i, h in enumerate(LEAF_HASHES):
        stored[(0, i)] = h
        for level, index in nodes_added_by_append(i):
            stored[(level, index)] = node_hash(
                stored[(level - 1, 2 * index)], stored[(level - 1, 2 * index + 1)]
            )
    assert stored == NODES


# --- Property tests against a recursive reference --------------------------------------


def ref_mth(d: Sequence[bytes]) -> bytes:
    """RFC 6962 section 2.1, literally."""
    n = len(d)
    if n == 0:
        return hashlib.sha256().digest()
    if n == 1:
        return d[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: Sequence[bytes], mth: Callable = ref_mth) -> list[tuple[bytes, str]]:
    """RFC 6962 section 2.1.1 PATH(m, D[n]); each element tagged with the sibling's side."""
    n = len(d)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return ref_path(m, d[:k], mth) + [(mth(d[k:]), "R")]
    return ref_path(m - k, d[k:], mth) + [(mth(d[:k]), "L")]


def ref_proof(m: int, d: Sequence[bytes], mth: Callable = ref_mth) -> list[tuple[bytes, str]]:
    """RFC 6962 section 2.1.2 PROOF(m, D[n]) = SUBPROOF(m, D[n], true), tagged likewise."""

    def sub(m: int, d: Sequence[bytes], b: bool) -> list[tuple[bytes, str]]:
        n = len(d)
        if m == n:
            return [] if b else [(mth(d), "head")]
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            return sub(m, d[:k], b) + [(mth(d[k:]), "R")]
        return sub(m - k, d[k:], False) + [(mth(d[:k]), "L")]

    return sub(m, d, True)


def path_shape(m: int, n: int) -> tuple[str, ...]:
    return tuple(side for _, side in ref_path(m, range(n), lambda _: b""))


def proof_shape(m: int, n: int) -> tuple[str, ...]:
    return tuple(side for _, side in ref_proof(m, range(n), lambda _: b""))


POOL = [leaf_hash(i.to_bytes(4, "big")) for i in range(400)]


def flips(proof: list[bytes]) -> list[list[bytes]]:
    out = []
    for i, p in enumerate(proof):
        for pos in (0, 31):
            bad = bytearray(p)
            bad[pos] ^= 0x01
            out.append(proof[:i] + [bytes(bad)] + proof[i + 1 :])
    return out


def drops_and_adds(proof: list[bytes], extra: bytes) -> list[list[bytes]]:
    out = [proof[:i] + proof[i + 1 :] for i in range(len(proof))]
    out += [[extra] + proof, proof + [extra], proof + proof[-1:]] if proof else [[extra]]
    return out


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, 300))
    return size, draw(st.integers(0, size - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(st.integers(1, 300))
    return draw(st.integers(1, new)), new


@settings(max_examples=300, deadline=None)
@given(tree_and_index())
def test_inclusion_matches_reference_and_resists_mutation(case: tuple[int, int]) -> None:
    size, index = case
    leaves = POOL[:size]
    root = ref_mth(leaves)
    tagged = ref_path(index, leaves)
    proof = inclusion_proof(index, size, leaves)
    assert proof == [h for h, _ in tagged]
    assert root_of_leaf_hashes(leaves) == root
    assert (
        fold_range(
            [root_of_leaf_hashes(leaves[i << lv : (i + 1) << lv]) for lv, i in root_plan(size)]
        )
        == root
    )
    verify_inclusion(leaves[index], index, size, proof, root)

    extra = POOL[-1]
    for bad in flips(proof) + drops_and_adds(proof, extra):
        with pytest.raises(ProofError):
            verify_inclusion(leaves[index], index, size, bad, root)
    with pytest.raises(ProofError):
        verify_inclusion(extra, index, size, proof, root)
    for bad_root in (node_hash(root, root), bytes(32), root[:31]):
        with pytest.raises(ProofError):
            verify_inclusion(leaves[index], index, size, proof, bad_root)
    for other in {index - 1, index + 1, index ^ 1, size, -1} - {index}:
        with pytest.raises(ProofError):
            verify_inclusion(leaves[index], other, size, proof, root)
    # A proof is a hash chain: it commits to the size only through its shape. So a wrong
    # size must fail, except where the path has the very same shape (then the chain is the
    # same and "passes" -- against the true size's root, which a checkpoint pins).
    for other in {size - 1, size + 1, size * 2, size // 2, 0} - {size}:
        if index < other and path_shape(index, other) == path_shape(index, size):
            verify_inclusion(leaves[index], index, other, proof, root)
        else:
            with pytest.raises(ProofError):
                verify_inclusion(leaves[index], index, other, proof, root)


@settings(max_examples=300, deadline=None)
@given(two_sizes())
def test_consistency_matches_reference_and_resists_mutation(case: tuple[int, int]) -> None:
    old, new = case
    leaves = POOL[:new]
    old_root, new_root = ref_mth(leaves[:old]), ref_mth(leaves)
    tagged = ref_proof(old, leaves)
    proof = consistency_proof(old, new, leaves)
    assert proof == [h for h, _ in tagged]
    verify_consistency(old, new, old_root, new_root, proof)

    extra = POOL[-1]
    for bad in flips(proof) + drops_and_adds(proof, extra):
        with pytest.raises(ProofError):
            verify_consistency(old, new, old_root, new_root, bad)
    for bad_root in (node_hash(old_root, old_root), bytes(32)):
        with pytest.raises(ProofError):
            verify_consistency(old, new, bad_root, new_root, proof)
        with pytest.raises(ProofError):
            verify_consistency(old, new, old_root, bad_root, proof)
    if old != new:
        with pytest.raises(ProofError):
            verify_consistency(old, new, new_root, old_root, proof)
        with pytest.raises(ProofError):
            verify_consistency(new, old, new_root, old_root, proof)
    # As for inclusion: wrong sizes fail unless the proof has exactly the same shape.
    for o, n in {(old - 1, new), (old + 1, new), (old, new + 1), (old, new - 1)} - {(old, new)}:
        if 0 < o <= n and proof_shape(o, n) == proof_shape(old, new):
            verify_consistency(o, n, old_root, new_root, proof)
        else:
            with pytest.raises(ProofError):
                verify_consistency(o, n, old_root, new_root, proof)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**63 - 2))
def test_nodes_added_by_append_property(size: int) -> None:
    added = nodes_added_by_append(size)
    trailing_ones = (~size & (size + 1)).bit_length() - 1
    assert len(added) == trailing_ones
    for level, index in added:
        assert (index + 1) << level == size + 1  # the node ends exactly at the new leaf


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(0, 2**20))
def test_range_nodes_cover_exactly(start: int, length: int) -> None:
    end = min(start + length, 2**63 - 1)
    nodes = range_nodes(start, end)
    pos = start
    for level, index in nodes:
        assert index << level == pos
        pos += 1 << level
    assert pos == end
    if _valid_subtree(start, end):
        levels = [lv for lv, _ in nodes]
        assert levels == sorted(levels, reverse=True)


def test_error_messages_are_specific() -> None:
    proof = inclusion_proof(5, 9, POOL)
    root = ref_mth(POOL[:9])
    with pytest.raises(
        ProofError, match="has 3 hashes, a proof for leaf 5 of a tree of size 9 has 4"
    ):
        verify_inclusion(POOL[5], 5, 9, proof[:3], root)
    with pytest.raises(ProofError, match="leads to root"):
        verify_inclusion(POOL[6], 5, 9, proof, root)
    with pytest.raises(ProofError, match="proof hash 1 is 31 bytes"):
        verify_inclusion(POOL[5], 5, 9, [proof[0], proof[1][:31]] + proof[2:], root)
    with pytest.raises(ProofError, match="not in a tree of size 9"):
        verify_inclusion(POOL[5], 9, 9, proof, root)
    assert merkle.HASH_SIZE == 32
