"""The script directory's revisions: each file read once (ids, parents, checksum), the schema's
status against them, numbering.

Pure and synchronous (files, no database), so the boot path, env.py, the CLI, CI and the tests
share it: the one reader of the revision files. A test compares it with Alembic's on every
revision in the tree and on awkward files.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError, to_tuple

from backend.migrations.checksums import tree_checksum

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"

# A deploy's phases (see backend/alembic/README.md, "Deployment"). A pre-deploy revision runs
# before the restart, while the previous release serves, so that release must work on what it
# builds; a post-deploy revision (a file's ``phase = "post-deploy"``) runs only once the new
# release serves: steps the previous release cannot read (a type swap, dropping an old column).
PRE_DEPLOY = "pre-deploy"
POST_DEPLOY = "post-deploy"
PHASES = (PRE_DEPLOY, POST_DEPLOY)


def pre_deploy_run(phases: Sequence[str]) -> int:
    """How many of the pending revisions (their phases, in order) the pre-deploy phase runs: up to
    and including the last pre-deploy one. The post-deploy revisions before it belong to an earlier
    release, which serves now or is older than the one serving (releases are deployed in order,
    none skipped), so they run too, in order; only the trailing post-deploy revisions wait for the
    post-deploy phase. (Refusing a pre-deploy revision after a pending post-deploy one instead made
    every fresh database refuse once any pre-deploy revision followed a post-deploy one.)"""
    return max((i + 1 for i, phase in enumerate(phases) if phase == PRE_DEPLOY), default=0)


@dataclass(frozen=True)
class RevisionFile:
    """One revision file: its name in ``versions/``, what it declares, and its checksum."""

    file: str
    revision: str
    down_revisions: tuple[str, ...]
    # Kept apart from down_revisions: as for Alembic, depends_on orders revisions but heads
    # follow down_revision only.
    depends_on: tuple[str, ...]
    checksum: str
    # When a deploy applies it (PRE_DEPLOY unless the file says ``phase = "post-deploy"``).
    phase: str = PRE_DEPLOY


@dataclass(frozen=True)
class Revisions:
    """A script directory's revision graph (revision -> the revisions it follows) and its files."""

    graph: dict[str, tuple[str, ...]]
    # Every file, in Alembic's order; two files may declare the same id (test_revision_graph
    # names them), and then the later one is in the graph, as in Alembic's.
    files: tuple[RevisionFile, ...] = ()
    # applied() per database state: a boot at head asks the same question on every call.
    _applied: dict[tuple[str, ...], frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def by_revision(self) -> Mapping[str, RevisionFile]:
        """Each revision's file (and so its checksum), by id."""
        return {f.revision: f for f in self.files}

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

    @property
    def pending(self) -> tuple[str, ...]:
        """This code's revisions the database has not applied."""
        applied = self.revisions.applied(self.current)
        return tuple(sorted(rev for rev in self.revisions.graph if rev not in applied))

    @property
    def post_deploy_pending(self) -> tuple[str, ...]:
        """Pending revisions that wait for the post-deploy phase (this code serves without them): the
        trailing post-deploy ones, after the last pending pre-deploy revision (``pre_deploy_run``).
        Pending revisions in id order, which is the graph's (``next_revision_id`` numbers them)."""
        files = self.revisions.by_revision
        pending = self.pending
        cut = pre_deploy_run([files[rev].phase if rev in files else PRE_DEPLOY for rev in pending])
        return pending[cut:]

    @property
    def behind(self) -> bool:
        """A revision this code needs before it serves is not applied: a pre-deploy one, or a
        post-deploy one before it (the pre-deploy phase runs both)."""
        return len(self.post_deploy_pending) < len(self.pending)

    @property
    def serves_code(self) -> bool:
        """This code can serve on the schema: nothing it needs is missing, and nothing unknown is there
        (pending post-deploy revisions are fine: the post-deploy phase runs once this code serves)."""
        return not self.behind and not self.ahead


def alembic_config(script_location: Path = ALEMBIC_DIR) -> Config:
    """An Alembic config for in-process use: no alembic.ini, so no logging set-up."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    return cfg


# The files Alembic loads from versions/ (alembic.script.base, `_only_source_rev_file`): every
# .py file but __init__.py and an editor's lock file (.#name.py).
_REVISION_FILE = re.compile(r"(?!\.#|__init__).*\.py$")
# What Alembic reads from a revision module (Script.__init__), and a module __getattr__, which
# would answer for a depends_on the file leaves out. branch_labels is not part of the graph.
_DECLARED = frozenset({"revision", "down_revision", "depends_on"})
# And the project's own declaration: the revision's deploy phase.
_READ = _DECLARED | {"phase"}
_WATCHED = _READ | {"__getattr__", "*"}


def _ids(value: ast.expr) -> tuple[str, ...] | None:
    """A literal id or ids (a string, None, a tuple or list of strings) as Alembic's ``to_tuple``
    gives them; None when the value is anything else."""
    if isinstance(value, ast.Constant) and (value.value is None or isinstance(value.value, str)):
        return to_tuple(value.value, default=())
    if isinstance(value, ast.Tuple | ast.List):
        items = [item.value for item in value.elts if isinstance(item, ast.Constant) and isinstance(item.value, str)]
        if len(items) == len(value.elts):
            return tuple(items)
    return None


# The statements and clauses that bind a name other than by assignment.
_BINDERS = (
    ast.Global,
    ast.Nonlocal,
    ast.alias,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.ExceptHandler,
    ast.MatchAs,
    ast.MatchStar,
    ast.MatchMapping,
)


def _binds_watched(node: ast.AST) -> bool:
    """Whether ``node`` binds one of the watched names, in whatever scope."""
    if type(node) is ast.Name:  # the commonest node by far: checked first, cheaply
        return node.id in _WATCHED and not isinstance(node.ctx, ast.Load)
    if not isinstance(node, _BINDERS):
        return False
    names: list[str | None]
    if isinstance(node, ast.Global | ast.Nonlocal):
        names = list(node.names)
    elif isinstance(node, ast.alias):  # "*" for a star import
        names = [node.asname or node.name.partition(".")[0]]
    elif isinstance(node, ast.MatchMapping):
        names = [node.rest]
    else:
        names = [node.name]
    return any(name in _WATCHED for name in names)


def _declared(tree: ast.Module) -> tuple[str, tuple[str, ...], tuple[str, ...], object] | None:
    """The module's revision, down_revision, depends_on and phase (PRE_DEPLOY when it has none) as
    importing it would give them, or None when reading the tree might give another answer than importing.

    Read here: top-level assignments of literals, annotated or not (the last one wins, as on
    import), whatever the comments and line breaks. Left to Alembic: any other binding of these
    names anywhere in the file (conditional, computed, imported, unpacked, deleted, even a
    function's local variable: the tree does not say which scope it is in, and such files are
    rare), a module ``__getattr__``, a star import, a missing revision or down_revision.
    """
    values: dict[str, ast.expr] = {}
    read: set[ast.AST] = set()
    value: ast.expr | None
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            targets, value = statement.targets, statement.value
        elif isinstance(statement, ast.AnnAssign):
            targets, value = [statement.target], statement.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in _READ:
                read.add(target)
                if value is not None:  # `revision: str` alone binds nothing
                    values[target.id] = value
    if any(_binds_watched(node) and node not in read for node in ast.walk(tree)):
        return None
    revision = values.get("revision")
    if not (isinstance(revision, ast.Constant) and isinstance(revision.value, str)) or "down_revision" not in values:
        return None
    down = _ids(values["down_revision"])
    depends = _ids(values["depends_on"]) if "depends_on" in values else ()
    if down is None or depends is None:
        return None
    phase = values.get("phase")
    if phase is not None and not isinstance(phase, ast.Constant):
        return None
    return revision.value, down, depends, PRE_DEPLOY if phase is None else phase.value


def _phase(file: str, value: object) -> str:
    """A file's declared phase, refused in one line unless it is one of PHASES."""
    if value not in PHASES:
        raise CommandError(f"revision file {file}: phase = {value!r} is not one of {', '.join(map(repr, PHASES))}")
    return str(value)


@cache
def read_revisions(script_location: Path = ALEMBIC_DIR) -> Revisions:
    """Every revision file of the script directory, read in one pass each (one parse gives the
    ids and the checksum), without importing it.

    Importing every revision module costs about a millisecond per file, and a boot at head needs
    only the ids and checksums. A file whose ids are not plain literals is asked of Alembic, which
    imports it.
    """
    versions = script_location / "versions"
    paths = (
        sorted(p for p in versions.iterdir() if p.is_file() and _REVISION_FILE.match(p.name))
        if versions.is_dir()
        else []
    )
    parsed = []
    for path in paths:
        tree = ast.parse(path.read_bytes(), filename=str(path))  # bytes, as on import: a coding line counts
        parsed.append((path, _declared(tree), tree_checksum(tree)))
    imported: dict[Path, Script] = {}
    if any(declared is None for _, declared, _ in parsed):
        script = ScriptDirectory.from_config(alembic_config(script_location))
        imported = {Path(s.path).resolve(): s for s in script.walk_revisions()}
    files = []
    for path, declared, digest in parsed:
        if declared is None:
            found = imported.get(path.resolve())
            if found is None:  # the earlier of two files with one id: not in Alembic's graph either
                continue
            declared = (
                found.revision,
                to_tuple(found.down_revision, default=()),
                to_tuple(found.dependencies, default=()),
                getattr(found.module, "phase", PRE_DEPLOY),
            )
        revision, down, depends, phase = declared
        files.append(RevisionFile(path.name, revision, down, depends, digest, _phase(path.name, phase)))
    return Revisions({f.revision: f.down_revisions for f in files}, tuple(files))


def next_revision_id(script: ScriptDirectory) -> str:
    """Revisions are numbered 001, 002, ... like the baseline: the next one after the highest."""
    # All revisions, not only the heads: after `alembic merge` the head may have another id.
    numbers = [int(s.revision) for s in script.walk_revisions() if s.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:03d}"
