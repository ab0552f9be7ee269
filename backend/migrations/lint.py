"""Each revision's offline SQL, linted with squawk: the one definition that ``kraken-migrations
lint`` and CI (``.ci/run``, which runs that command) share.

A revision's SQL is what ``alembic -x phase=post-deploy upgrade <previous>:<revision> --sql``
prints (rendered here in-process: no database, no DATABASE_URL), so a finding names its revision,
without Alembic's own version-table statements: squawk 2.70 stops following BEGIN/COMMIT in a
file that UPDATEs alembic_version, and then reports every statement of a revision that commits
part-way as outside a transaction. Alembic separates statements with a blank line, so those
paragraphs are left out.

What squawk is told (the project's configuration): ``--pg-version 15``, the oldest server we run
on (CI's postgres:15, this machine's 15); every rule on, except for the baseline:
prefer-bigint-over-int, prefer-timestamp-tz and prefer-text-field are off for 001, which records
the tables as production created them before migrations existed (integer counters, timestamp
without time zone, varchar(16)); changing a type is a table rewrite, a revision of its own, not a
lint fix. New revisions are held to these rules. A statement may waive a rule with
``ops.waive(rule, reason=...)``, which writes squawk's ignore comment and the reason above it;
the lint lists every waiver it finds, with its reason.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic import command

from backend.migrations import ops
from backend.migrations.phases import PHASE_ARGUMENT
from backend.migrations.revisions import ALEMBIC_DIR, POST_DEPLOY, Revisions, alembic_config, read_revisions

PG_VERSION = "15"
BASELINE_EXCLUDED = {"001": ("prefer-bigint-over-int", "prefer-timestamp-tz", "prefer-text-field")}
_WAIVER = re.compile(re.escape(ops.SQUAWK_IGNORE) + r"(?P<rules>.*?)(?: -- (?P<reason>.*))?$")


class LintError(Exception):
    """The lint could not run (no squawk, an unknown revision, a revision that fails offline); one line."""


@dataclass(frozen=True)
class Waiver:
    """A rule a revision's SQL waives for one statement, and why."""

    line: int  # in the linted SQL
    rules: str
    reason: str | None  # None: the comment gives none (helpers older than ops.waive())
    statement: str  # its first line


@dataclass(frozen=True)
class Linted:
    revision: str
    ok: bool
    report: str  # squawk's output ("" when it found nothing)
    waivers: tuple[Waiver, ...]


def steps(revisions: Revisions, only: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(previous, revision) for each revision, or those of ``only`` ('head' for the head(s)), in order."""
    wanted: set[str] = set()
    for name in only:
        if name in ("head", "heads"):
            wanted |= revisions.heads
        elif name in revisions.graph:
            wanted.add(name)
        else:
            known = ", ".join(sorted(revisions.graph))
            raise LintError(f"no revision {name} in the script directory (there are {known})")
    return [
        (downs[0] if downs else "base", revision)
        for revision, downs in sorted(revisions.graph.items())
        if not wanted or revision in wanted
    ]


def offline_sql(script_location: Path, previous: str, revision: str) -> str:
    """What ``alembic -x phase=post-deploy upgrade previous:revision --sql`` prints, as squawk reads it."""
    buffer = io.StringIO()
    cfg = alembic_config(script_location)
    cfg.output_buffer = buffer
    cfg.attributes[PHASE_ARGUMENT] = POST_DEPLOY  # a post-deploy revision's SQL too
    try:
        command.upgrade(cfg, f"{previous}:{revision}", sql=True)
    except Exception as exc:
        lines = str(exc).splitlines()
        raise LintError(f"revision {revision}'s offline SQL: {lines[0] if lines else type(exc).__name__}") from None
    kept = [part for part in re.split(r"\n{2,}", buffer.getvalue().strip("\n")) if "alembic_version" not in part]
    return "".join(part + "\n\n" for part in kept)


def waivers(sql: str) -> tuple[Waiver, ...]:
    lines = sql.splitlines()
    found = []
    for number, line in enumerate(lines, start=1):
        match = _WAIVER.match(line)
        # ops.waive() comments each line of a statement: the one above its first line speaks for it.
        if match is not None and (number == 1 or not lines[number - 2].strip()):
            statement = next((ln for ln in lines[number:] if not ln.startswith("--")), "")
            found.append(Waiver(number, match["rules"].strip(), match["reason"], statement))
    return tuple(found)


def squawk_program() -> str:
    """squawk (the squawk-cli package: a development dependency) beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "squawk"
    found = str(beside) if beside.exists() else shutil.which("squawk")
    if found is None:
        raise LintError("squawk is not installed (squawk-cli is a development dependency: run 'uv sync')")
    return found


def squawk_command(revision: str) -> list[str]:
    excluded = BASELINE_EXCLUDED.get(revision, ())
    return [
        squawk_program(),
        "--pg-version",
        PG_VERSION,
        *(["--exclude", ",".join(excluded)] if excluded else []),
        "--stdin-filepath",
        f"{revision}.sql",
    ]


def lint(script_location: Path = ALEMBIC_DIR, only: Sequence[str] = ()) -> list[Linted]:
    """Each revision's (or those of ``only``) offline SQL through squawk."""
    results = []
    for previous, revision in steps(read_revisions(script_location), only):
        sql = offline_sql(script_location, previous, revision)
        ran = subprocess.run(squawk_command(revision), input=sql, capture_output=True, text=True, check=False)
        if ran.returncode not in (0, 1):
            raise LintError(f"squawk failed on revision {revision}: {(ran.stderr or ran.stdout).strip()}")
        results.append(Linted(revision, ran.returncode == 0, ran.stdout + ran.stderr, waivers(sql)))
    return results
