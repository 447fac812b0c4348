"""The command line documents itself: `--version`, and help text for every option and
argument of every command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from dicomledger.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every action of ``parser`` and of its subcommands, depth first, named by command path."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            for name, sub in action.choices.items():
                if name not in helped:
                    yield f"{path} {name}", action  # a command without its own line in the list
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_of_every_command_has_help() -> None:
    missing = []
    commands = set()
    for path, action in _walk(build_parser(), "dicomledger"):
        commands.add(path)
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    assert len(commands) > 20  # the walk reached the subcommands
    assert missing == [], "options without help text:\n" + "\n".join(missing)


def test_help_walk_finds_an_option_without_help() -> None:
    """The walk above sees an undocumented option deep in a subcommand (it would pass vacuously otherwise)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["serve"].add_argument("--undocumented")
    found = [
        f"{p} {'/'.join(a.option_strings)}" for p, a in _walk(parser, "dicomledger") if not a.help
    ]
    assert found == ["dicomledger serve --undocumented"]


@pytest.mark.e2e  # runs the command
def test_version_prints_the_installed_version() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dicomledger.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"dicomledger {version('dicomledger')}"
    assert version("dicomledger") != ""
