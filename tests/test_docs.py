"""The repository's documentation stands on its own: the README's file map names every module,
and nothing cites a file outside the repository or an issue tracker its reader cannot see."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

# What the repository holds besides generated files (a virtualenv, caches, build output).
DOCUMENTED = [
    "README.md",
    "pyproject.toml",
    "LICENSE",
    "bench",
    "config",
    "deploy",
    "docker",
    "docs",
    "dicomledger",
    "scripts",
    "tests",
]
OUTSIDE = re.compile(r"\bissues? #?\d+|\bshared/[A-Za-z-]+\.md", re.I)


def file_map() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## What is where") :]


def test_the_readme_file_map_names_every_module():
    listed = file_map()
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "dicomledger").rglob("*.py"))
        if path.name != "__init__.py"
        and not re.search(rf"`(?:[\w/]*/)?{re.escape(path.name)}`", listed)
    ]
    assert missing == [], f"add these to the README's 'What is where': {missing}"


def texts(root: Path = ROOT) -> list[Path]:
    found: list[Path] = []
    for name in DOCUMENTED:
        path = root / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        found += [p for p in candidates if p.is_file() and "__pycache__" not in p.parts]
    return found


def test_nothing_cites_an_issue_tracker_or_a_file_outside_the_repository():
    here = Path(__file__).resolve()
    found = []
    for path in texts():
        if path.resolve() == here:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # a binary test file
        found += [
            f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
            for m in OUTSIDE.finditer(text)
        ]
    assert found == []


def test_the_pattern_finds_such_citations():
    assert OUTSIDE.search("(issue 12)") and OUTSIDE.search("see shared/DICOM-TOOLS.md")
    assert OUTSIDE.search("Issue #7") and not OUTSIDE.search("tissue 12")
