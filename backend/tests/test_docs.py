"""The docs' commands work as written, and their links lead somewhere.

A fenced block whose info string is ``bash runnable`` is run here: each of its commands (a line,
with ``\\`` continuations joined) in ``bash`` from the repository root, on a fresh database at head
of its own (DATABASE_URL), and must exit 0 and print what ``EXPECTED`` says. Every other ``bash``
block is shown, not run (serving, the whole suite, benchmarks, a deploy host); its commands are
still checked without running them: the programs they start exist, the files they name exist,
and the markers they select are registered. The convention is documented in docs/development.md
("Commands in the docs").
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT
from backend.db.url import DatabaseTarget
from backend.tests.helpers import child_env, fenced_blocks

DOCS = [
    PROJECT_ROOT / "README.md",
    *sorted((PROJECT_ROOT / "docs").glob("*.md")),
    PROJECT_ROOT / "backend" / "alembic" / "README.md",
]
RUNNABLE = "bash runnable"


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    text: str
    runnable: bool
    cwd: Path  # where it runs: the repository's root, or where a `cd` earlier in its block went

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(PROJECT_ROOT)}:{self.line}"


def strip_comment(line: str) -> str:
    """A line without its trailing ``# ...`` comment (a ``#`` starting a word outside quotes, as
    bash reads it)."""
    quote = ""
    for position, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1].isspace()):
            return line[:position].strip()
    return line.strip()


def commands_of(doc: Path) -> list[Command]:
    found: list[Command] = []
    for info, first, body in fenced_blocks(doc):
        if info.split(" ")[0] != "bash":
            continue
        assert info in ("bash", RUNNABLE), f"{doc}:{first}: a bash block is `bash` or `{RUNNABLE}`, not {info!r}"
        pending = ""
        start = first
        cwd = PROJECT_ROOT
        for offset, raw in enumerate(body):
            if not pending:
                start = first + offset
            text = strip_comment(raw) if not raw.rstrip().endswith("\\") else raw.rstrip()[:-1].strip()
            if raw.rstrip().endswith("\\"):
                pending += text + " "
                continue
            text = (pending + text).strip()
            pending = ""
            if text:
                found.append(Command(doc, start, text, info == RUNNABLE, cwd))
                if text.startswith("cd ") and len(text.split()) == 2:
                    cwd = cwd / text.split()[1]
    return found


ALL = [command for doc in DOCS for command in commands_of(doc)]
RUN = [command for command in ALL if command.runnable]
SHOWN = [command for command in ALL if not command.runnable]

# What each runnable command must print (stdout and stderr together), as a regular expression. A
# command marked runnable without an entry here fails test_every_runnable_command_has_an_expectation.
EXPECTED = {
    "uv run alembic upgrade head": r"Context impl PostgresqlImpl",
    "uv run alembic -x phase=post-deploy upgrade head": r"Context impl PostgresqlImpl",
    "uv run alembic current": r"(?m)^\d{3}\b",
    "uv run alembic history": r"<base> -> 001, Baseline schema",
    "uv run alembic downgrade -1": r"Running downgrade \d{3} -> \d{3}",
    "uv run alembic check": r"No new upgrade operations detected",
    "uv run alembic upgrade head --sql": r'(?s)CREATE TABLE IF NOT EXISTS "kraken_conversations".*COMMIT;',
    "uv run alembic -x allow_data_loss=true downgrade base": r"Running downgrade 001 -> , Baseline schema",
    "uv run alembic upgrade head && uv run alembic -x phase=post-deploy upgrade head && uv run alembic check": (
        r"No new upgrade operations detected"
    ),
    "uv run kraken-migrations lint": r"(?m)^001: ok$",
}


def test_the_docs_mark_some_commands_runnable() -> None:
    # The extraction itself: a regression here would quietly run nothing.
    assert len(RUN) >= 9, [command.text for command in RUN]
    assert len(SHOWN) >= 40
    assert {"uv run kraken-backend", "uv run pytest"} <= {
        command.text for command in SHOWN if command.doc.name == "README.md"
    }


def test_every_runnable_command_has_an_expectation() -> None:
    # A command edited in a doc is a new command here: give it what it must print.
    missing = sorted({command.text for command in RUN} - EXPECTED.keys())
    assert missing == [], "runnable commands with no entry in EXPECTED (backend/tests/test_docs.py)"
    assert sorted(EXPECTED.keys() - {command.text for command in RUN}) == [], "expectations of commands no doc has"


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN, ids=[f"{command.where} {command.text}" for command in RUN])
def test_runnable_command_works_as_written(command: Command, head_db: DatabaseTarget) -> None:
    result = subprocess.run(
        ["bash", "-c", command.text],
        cwd=command.cwd,
        env=child_env(head_db),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command.where}: {command.text}\n{output}"
    assert re.search(EXPECTED[command.text], output), f"{command.where}: {command.text}\n{output}"
    assert "Traceback" not in output


# --- commands shown, not run ---------------------------------------------------------------

BIN = Path(sys.executable).parent
MARKERS = {
    entry.split(":")[0]
    for entry in tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "markers"
    ]
}
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def simple_commands(text: str) -> list[list[str]]:
    """A command line split into its simple commands (at &&, ||, ;, |), each as words."""
    words = shlex.split(text)
    parts: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "||", ";", "|"):
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


def check_pytest_arguments(arguments: list[str], cwd: Path, where: str) -> None:
    iterator = iter(arguments)
    for argument in iterator:
        if argument == "-m":
            expression = next(iterator)
            named = set(re.findall(r"[A-Za-z_]\w*", expression)) - {"not", "and", "or"}
            assert named <= MARKERS, f"{where}: unregistered marker in -m {expression!r}"
        elif argument in ("-k", "-p", "-n", "--durations"):
            next(iterator)
        elif not argument.startswith("-"):
            path = cwd / argument.split("::")[0]
            assert path.exists(), f"{where}: pytest is given {argument}, which does not exist from {cwd}"


def check_uv_run(words: list[str], cwd: Path, where: str) -> None:
    program, *arguments = words
    if program == "python":
        if arguments and arguments[0] == "-m":
            return
        assert arguments, where
        assert (cwd / arguments[0]).is_file(), f"{where}: {arguments[0]} does not exist"
        return
    assert (BIN / program).exists(), f"{where}: `uv run {program}`: no such program in the project's environment"
    if program == "pytest":
        check_pytest_arguments(arguments, cwd, where)


@pytest.mark.parametrize("command", SHOWN, ids=[f"{command.where} {command.text}" for command in SHOWN])
def test_shown_command_names_what_exists(command: Command) -> None:
    """What a command shown but not run names exists: its program, its files, its markers. (The seed's
    docs named test files and a module that did not exist; a command here cannot.)"""
    cwd = command.cwd
    for words in simple_commands(command.text):
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]
        if not words:
            continue
        program = words[0]
        if program in ("uv", "~/.local/bin/uv") or program.endswith("/uv"):
            if words[1] == "sync":
                continue
            assert words[1] == "run", f"{command.where}: `uv run` or `uv sync` expected"
            options = words[2:]
            while options and options[0].startswith("-"):
                options = options[2:] if options[0] in ("--python", "--with") else options[1:]
            check_uv_run(options, cwd, command.where)
        elif program in ("bash", "cd"):
            assert (cwd / words[1]).exists(), f"{command.where}: {words[1]} does not exist"
            if program == "cd":
                cwd = cwd / words[1]


# --- links -----------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(doc: Path) -> str:
    """The markdown outside fenced blocks and code spans: where a link is a link."""
    text = re.sub(r"(?ms)^ *```.*?^ *```$", "", doc.read_text())
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated one suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in re.findall(r"(?m)^#{1,6} +(.+?) *#*$", prose(doc)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


LINKS = [(doc, target) for doc in DOCS for target in LINK.findall(prose(doc))]


def test_the_docs_link_to_each_other() -> None:
    relative = [target for _, target in LINKS if "://" not in target]
    assert len(relative) >= 20
    assert any("#" in target for target in relative)


@pytest.mark.parametrize(
    ("doc", "target"), LINKS, ids=[f"{doc.relative_to(PROJECT_ROOT)} -> {target}" for doc, target in LINKS]
)
def test_relative_link_leads_to_a_file_and_heading(doc: Path, target: str) -> None:
    if re.match(r"^[a-z]+:", target):
        return  # https://..., mailto:: not this repository's
    path, _, anchor = target.partition("#")
    destination = (doc.parent / path).resolve() if path else doc
    assert destination.exists(), f"{doc.relative_to(PROJECT_ROOT)}: {target} leads to no file"
    assert destination.is_relative_to(PROJECT_ROOT), f"{doc.relative_to(PROJECT_ROOT)}: {target} leaves the repository"
    if anchor:
        assert destination.suffix == ".md", f"{target}: an anchor into a file that is not markdown"
        assert anchor in anchors(destination), (
            f"{doc.relative_to(PROJECT_ROOT)}: {target}: no heading of {destination.name} has that anchor"
        )
