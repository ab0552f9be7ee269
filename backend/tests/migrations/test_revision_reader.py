"""The one reader of the revision files (``read_revisions``) against Alembic's own reading.

The service reads the revision graph at boot without importing the files; Alembic imports them.
Where the two disagree, a database Alembic brought to head is not at head for the service (the
reported case: a comment with quoted ids on the down_revision line left no head at all, and a
service in KRAKEN_MIGRATE_ON_STARTUP=check refused to start).
"""

import asyncio
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from alembic.util import to_tuple

from backend.config import Settings
from backend.db.url import DatabaseTarget
from backend.migrations.revisions import ALEMBIC_DIR, alembic_config, read_revisions
from backend.migrations.runner import check_schema, run_migrations
from backend.tests.helpers import HEAD, NEXT, out, run_alembic, scratch_alembic

# Checksums, URLs and revision files must read the same on every Python we support (.ci/run).
pytestmark = pytest.mark.every_python

# A line a test adds to a revision file: importing the file leaves a trace beside it.
IMPORTED = 'open(__file__ + ".imported", "w").close()\n'
TAIL = "\n\ndef upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n\n\n" + IMPORTED

Read = tuple[dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]], frozenset[str]]


def alembic_reads(script_location: Path) -> Read:
    """Each revision's file, down_revision, depends_on and deploy phase (the module's ``phase``), and
    the heads, as Alembic has them."""
    script = ScriptDirectory.from_config(alembic_config(script_location))
    return (
        {
            s.revision: (
                Path(s.path).name,
                to_tuple(s.down_revision, default=()),
                to_tuple(s.dependencies, default=()),
                getattr(s.module, "phase", "pre-deploy"),
            )
            for s in script.walk_revisions()
        },
        frozenset(script.get_heads()),
    )


def reader_reads(script_location: Path) -> Read:
    revisions = read_revisions(script_location)
    files = revisions.by_revision
    assert revisions.graph == {rev: f.down_revisions for rev, f in files.items()}
    return {rev: (f.file, f.down_revisions, f.depends_on, f.phase) for rev, f in files.items()}, revisions.heads


def write_versions(script_location: Path, files: dict[str, bytes]) -> Path:
    """A script directory of these files; returns its versions/."""
    versions = script_location / "versions"
    versions.mkdir(parents=True)
    (script_location / "script.py.mako").write_text("")
    for name, data in files.items():
        (versions / name).write_bytes(data)
    return versions


def with_tail(name: str, source: str | bytes) -> bytes:
    """A revision file's source with functions and the import trace; other files as they are."""
    data = source if isinstance(source, bytes) else textwrap.dedent(source).encode()
    return data + TAIL.encode() if name[0].isdigit() else data


def imported(versions: Path) -> set[str]:
    return {p.name.removesuffix(".imported") for p in versions.glob("*.imported")}


def test_the_reader_agrees_with_alembic_on_every_revision_in_the_tree(tmp_path: Path) -> None:
    assert reader_reads(ALEMBIC_DIR) == alembic_reads(ALEMBIC_DIR)
    # ... and reads them itself: a boot at head imports no revision (a copy that reports imports).
    copy = write_versions(
        tmp_path, {p.name: p.read_bytes() + IMPORTED.encode() for p in ALEMBIC_DIR.glob("versions/*.py")}
    )
    assert reader_reads(tmp_path)[0].keys() == read_revisions().graph.keys()
    assert imported(copy) == set()


# Plain literals, written every way Alembic accepts them. 002 and 003 branch from 001, 004 merges
# them; 006 also follows 004; 007 depends on 006 without following it, so 006 stays a head.
AWKWARD: dict[str, str | bytes] = {
    "001_annotated.py": """
        '''Annotated, as the project's template writes them.'''
        from collections.abc import Sequence
        from typing import Union

        revision: str = "001"
        down_revision: Union[str, Sequence[str], None] = None
        branch_labels: Union[str, Sequence[str], None] = None
        depends_on: Union[str, Sequence[str], None] = None
        """,
    "002_comments.py": """
        revision = "002"  # "009" was taken
        down_revision = "001"  # "002" follows "001" (an earlier draft said "000")
        # down_revision = "003"
        """,
    "003_multiline_tuple.py": """
        revision = '003'
        down_revision = (
            "001",  # "002" is the other branch
        )
        depends_on = None
        """,
    "004_merge.py": """
        from collections.abc import Sequence
        from typing import Union

        revision: str = "004"
        down_revision: Union[str, Sequence[str], None] = (
            "002",
            "003",
        )
        """,
    "005_list_and_docstring.py": '''
        """A docstring that quotes another file:

        revision = "999"
        down_revision = "998"
        """

        revision = "005"
        down_revision = [
            "004",
        ]
        depends_on = "003"
        ''',
    "006_other_branch.py": """
        revision = "006"
        down_revision = "004"
        phase: str = (
            "post-deploy"  # "pre-deploy" in an earlier draft
        )
        """,
    "007_depends_on.py": """
        revision = "007"
        down_revision: str | None = "005"
        depends_on: tuple[str, ...] = ("006",)
        """,
    "008_assigned_twice.py": """
        revision = "draft"
        revision = "008"  # the last assignment is the one an import sees
        down_revision = "007"
        """,
    # A coding declaration, and a byte that is not UTF-8.
    "009_latin1.py": b'# -*- coding: latin-1 -*-\n# r\xe9vision\nrevision = "0" "09"\ndown_revision = "008"\n',
    # Not revisions, for Alembic: the package marker, an editor's lock file, other files.
    "__init__.py": 'revision = "init"\ndown_revision = "009"\n',
    ".#010_lock.py": 'revision = "lock"\ndown_revision = "009"\n',
    "notes.txt": 'revision = "notes"\n',
}


def test_the_reader_agrees_with_alembic_on_awkward_files(tmp_path: Path) -> None:
    versions = write_versions(tmp_path, {name: with_tail(name, source) for name, source in AWKWARD.items()})

    graph, heads = reader_reads(tmp_path)
    assert imported(versions) == set()  # read, not imported: the boot path
    assert (graph, heads) == alembic_reads(tmp_path)
    assert imported(versions) == {name for name in AWKWARD if name[0].isdigit()}  # Alembic did import them
    assert heads == {"006", "009"}
    assert graph["002"][1] == ("001",)
    assert graph["003"][1] == ("001",)
    assert graph["004"][1] == ("002", "003")
    assert graph["005"][1:3] == (("004",), ("003",))
    assert graph["007"][1:3] == (("005",), ("006",))
    assert graph["006"][3] == "post-deploy"
    assert {graph[rev][3] for rev in graph if rev != "006"} == {"pre-deploy"}
    assert graph["008"][0] == "008_assigned_twice.py"
    assert set(graph) == {f"{n:03d}" for n in range(1, 10)}


# Values that only running the file gives: the reader asks Alembic for them.
COMPUTED = {
    "001_plain.py": 'revision = "001"\ndown_revision = None\n',
    "002_computed.py": 'revision = "00" + "2"\ndown_revision = "001"\n',
    "003_conditional.py": 'revision = "003"\nif True:\n    down_revision = "002"\nelse:\n    down_revision = "001"\n',
    "004_named.py": 'PREVIOUS = "003"\nrevision = "004"\ndown_revision = PREVIOUS\n',
    "005_unpacked.py": 'revision, down_revision = "005", "004"\ndepends_on = None\n',
    "006_rebound.py": 'revision = "006"\ndown_revision = "005"\nfor depends_on in ["002"]:\n    pass\n',
    "007_branch.py": 'revision = "007"\ndown_revision = "001"\n',
    "008_computed_phase.py": 'revision = "008"\ndown_revision = "006"\nphase = "-".join(["post", "deploy"])\n',
}


def test_values_that_are_not_literals_are_asked_of_alembic(tmp_path: Path) -> None:
    write_versions(tmp_path, {name: with_tail(name, source) for name, source in COMPUTED.items()})
    graph, heads = reader_reads(tmp_path)
    assert (graph, heads) == alembic_reads(tmp_path)
    assert heads == {"007", "008"}
    assert graph["008"][3] == "post-deploy"
    assert graph["003"][1] == ("002",)
    assert graph["006"][2] == ("002",)
    assert read_revisions(tmp_path).by_revision["002"].file == "002_computed.py"


def test_a_comment_with_quoted_ids_on_the_down_revision_line_leaves_the_database_at_head(
    tmp_path: Path, empty_db: DatabaseTarget, settings_for: Callable[..., Settings]
) -> None:
    # The reported case: Alembic applied the revision, and the service then found no head at all.
    earlier = f"{int(HEAD) - 1:03d}"
    ini = scratch_alembic(
        tmp_path,
        {
            f"{NEXT}_commented.py": f'''
                """A revision whose down_revision line carries quoted ids in a comment."""

                revision: str = "{NEXT}"
                down_revision = "{HEAD}"  # "{NEXT}" follows "{HEAD}" (an earlier draft said "{earlier}")
                branch_labels = None
                depends_on = None


                def upgrade() -> None:
                    pass


                def downgrade() -> None:
                    pass
                '''
        },
    )
    result = run_alembic("-c", str(ini), "upgrade", "head", target=empty_db)
    assert result.returncode == 0, out(result)
    settings = settings_for(empty_db, KRAKEN_MIGRATE_ON_STARTUP="check")

    booted = asyncio.run(run_migrations(settings, script_location=tmp_path / "alembic"))
    checked = asyncio.run(check_schema(settings, script_location=tmp_path / "alembic"))

    for status in booted, checked:
        assert status.at_head
        assert status.heads == {NEXT}
        assert status.current == (NEXT,)
