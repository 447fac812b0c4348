"""The package's layering, read from its imports: the two halves never import each other.

``dicom/`` speaks DICOM, ``ledger/`` is the ledger; neither imports the other, and neither
imports a top-level module (``gateway.py``, ``config.py``, ...), which are the ones that join
them. Both may use ``common/``, which imports nothing else of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dicomledger"

# What each layer may import from the package (a module is in the first layer its name starts with).
ALLOWED = {
    "dicomledger.dicom": ("dicomledger.dicom", "dicomledger.common"),
    "dicomledger.ledger": ("dicomledger.ledger", "dicomledger.common"),
    "dicomledger.common": ("dicomledger.common",),
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module ``source`` imports (anywhere: top level, functions, TYPE_CHECKING blocks),
    as absolute names with their line numbers; ``from x import y`` counts as ``x.y`` (``y`` may
    be a module: ``from dicomledger import config``)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..ledger import y
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str) -> str | None:
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def violations(root: Path = PACKAGE) -> list[str]:
    """One line per import that crosses the layering: ``file:line imports module``."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        layer = layer_of(module)
        if layer is None:
            continue  # a top-level module: it may import anything
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            if target != "dicomledger" and not target.startswith("dicomledger."):
                continue  # the standard library or a third-party package
            if not any(target == ok or target.startswith(ok + ".") for ok in ALLOWED[layer]):
                found.append(f"{path.relative_to(root.parent)}:{line} imports {target}")
    return found


def test_the_halves_import_neither_each_other_nor_the_top_level():
    assert violations() == []


@pytest.mark.parametrize(
    ("where", "source", "crossing"),
    [
        (
            "dicom/x.py",
            "from dicomledger.ledger.log import LedgerStore\n",
            "dicomledger.ledger.log",
        ),
        ("dicom/x.py", "import dicomledger.ledger.merkle\n", "dicomledger.ledger.merkle"),
        ("dicom/x.py", "def f():\n    from dicomledger import config\n", "dicomledger.config"),
        ("dicom/net/x.py", "from ...ledger import log\n", "dicomledger.ledger"),
        ("ledger/x.py", "from dicomledger.dicom.index import Index\n", "dicomledger.dicom.index"),
        ("ledger/x.py", "from dicomledger.config import PeerConfig\n", "dicomledger.config"),
        ("ledger/x.py", "from .. import gateway\n", "dicomledger.gateway"),
        ("ledger/x.py", "import dicomledger\n", "dicomledger"),
        ("common/x.py", "from dicomledger.ledger import log\n", "dicomledger.ledger"),
    ],
)
def test_a_crossing_import_is_reported(tmp_path, where, source, crossing):
    root = tmp_path / "dicomledger"
    path = root / where
    path.parent.mkdir(parents=True)
    path.write_text(source)
    reported = violations(root)
    assert reported and all(crossing in line for line in reported), reported
    assert reported[0].startswith(f"dicomledger/{where}:")


@pytest.mark.parametrize(
    ("where", "source"),
    [
        (
            "dicom/x.py",
            "from dicomledger.dicom.net import pdu\nfrom . import store\nimport pydicom\n",
        ),
        ("dicom/x.py", "from dicomledger.common.sqlite_thread import ThreadedSqlite\n"),
        ("ledger/x.py", "from .merkle import Frontier\nfrom dicomledger.common import errors\n"),
        ("gateway.py", "from dicomledger.dicom import index\nfrom dicomledger.ledger import log\n"),
    ],
)
def test_an_import_within_the_layering_is_not(tmp_path, where, source):
    root = tmp_path / "dicomledger"
    path = root / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert violations(root) == []
