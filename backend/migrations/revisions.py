"""The script directory's revisions: the graph read cheaply, the schema's status against it, numbering.

Pure and synchronous (files, no database), so the boot path, env.py, CI and the tests share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import to_tuple

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


@dataclass(frozen=True)
class Revisions:
    """A script directory's revision graph: revision -> the revisions it follows."""

    graph: dict[str, tuple[str, ...]]
    # applied() per database state: a boot at head asks the same question on every call.
    _applied: dict[tuple[str, ...], frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def heads(self) -> frozenset[str]:
        parents = {down for downs in self.graph.values() for down in downs}
        return frozenset(rev for rev in self.graph if rev not in parents)

    def applied(self, current: tuple[str, ...]) -> frozenset[str]:
        """What a database at ``current`` has applied: those revisions and every one they follow.

        Revisions this code does not know are left out (the "ahead of the code" rule handles them).
        """
        found = self._applied.get(current)
        if found is None:
            seen: set[str] = set()
            pending = [rev for rev in current if rev in self.graph]
            while pending:
                rev = pending.pop()
                if rev not in seen:
                    seen.add(rev)
                    pending.extend(down for down in self.graph[rev] if down in self.graph)
            found = self._applied[current] = frozenset(seen)
        return found


@dataclass(frozen=True)
class SchemaStatus:
    """What a database records in ``alembic_version``, against the code's revisions."""

    current: tuple[str, ...]
    revisions: Revisions

    @property
    def heads(self) -> frozenset[str]:
        return self.revisions.heads

    @property
    def at_head(self) -> bool:
        return frozenset(self.current) == self.heads

    @property
    def ahead(self) -> bool:
        """The database records a revision this code does not know (e.g. after a rollback)."""
        return bool(self.unknown)

    @property
    def unknown(self) -> tuple[str, ...]:
        return tuple(sorted(rev for rev in self.current if rev not in self.revisions.graph))

    @property
    def revision(self) -> str | None:
        return ",".join(sorted(self.current)) or None


def alembic_config(script_location: Path = ALEMBIC_DIR) -> Config:
    """An Alembic config for in-process use: no alembic.ini, so no logging set-up."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    return cfg


_REVISION = re.compile(r"^revision(?:\s*:\s*[^=]+)?\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN = re.compile(r"^down_revision(?:\s*:\s*[^=]+)?\s*=\s*(.+)$", re.MULTILINE)
_QUOTED = re.compile(r"['\"]([^'\"]+)['\"]")


@cache
def read_revisions(script_location: Path = ALEMBIC_DIR) -> Revisions:
    """The revision graph, read from the files' text without importing them.

    Importing every revision module costs about a millisecond per file, and a boot at head needs
    only the ids. Falls back to Alembic when a file does not declare them as plain literals.
    ``depends_on`` is not an edge of this graph: as for Alembic, heads follow ``down_revision`` only.
    """
    graph: dict[str, tuple[str, ...]] = {}
    for path in sorted((script_location / "versions").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        rev, down = _REVISION.search(source), _DOWN.search(source)
        # A value spread over lines ("down_revision = (\n") is beyond this reader: ask Alembic.
        if rev is None or down is None or down.group(1).count("(") != down.group(1).count(")"):
            script = ScriptDirectory.from_config(alembic_config(script_location))
            return Revisions({s.revision: to_tuple(s.down_revision, default=()) for s in script.walk_revisions()})
        graph[rev.group(1)] = tuple(_QUOTED.findall(down.group(1)))
    return Revisions(graph)


def next_revision_id(script: ScriptDirectory) -> str:
    """Revisions are numbered 001, 002, ... like the baseline: the next one after the highest."""
    # All revisions, not only the heads: after `alembic merge` the head may have another id.
    numbers = [int(s.revision) for s in script.walk_revisions() if s.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:03d}"
