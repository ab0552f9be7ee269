"""Every deploy phase keeps the serving code working, proven with each release's own API tests.

While ``alembic upgrade head`` (the pre-deploy phase) runs, the previous release serves; from the
restart on, the new one does, also through the post-deploy phase. So for every revision after 004:

- the release before it (the tree of the commit before its file was added, from ``git archive``,
  unchanged) runs its own API tests on the schema the pre-deploy phase leaves: with the revision
  when it is pre-deploy, without it when it is post-deploy (it runs once the new release serves);
- for a post-deploy revision, the release that added it (the tree of that commit) runs its own
  API tests on the schema before it (the restart until the post-deploy phase) and after it;
- for a revision of several type changes, which commits after each, the release serving while it
  runs (the previous one for a pre-deploy revision, the new one for a post-deploy one) also runs
  them on the schema a run stopped after its first change leaves (the phase fails there, and that
  release goes on serving);

and this checkout's API tests run on the schema after the pre-deploy phase (``SERVED``); the rest of
the suite runs at head, after both (conftest's ``head_template``).

Each run uses this checkout's virtualenv (nothing is installed) and its migrations (revisions are
never edited once applied, so every release's files are a prefix of these), in a child pytest
whose databases are all copies of the migrated one: a plugin (``-p``) makes the child's
``backend.db.admin.create_database`` and ``copy_database`` create each from it as a template. The
child's fixtures then run that release's ``run_migrations()`` on the copy, which finds the schema
at, behind only by post-deploy revisions, or ahead of its head, as a replica of that release would
during a deploy.

The previous release running after the post-deploy phase is no requirement: that phase exists
for the steps it cannot read.
"""

import os
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import pytest

from backend.config import PROJECT_ROOT
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.migrations.revisions import POST_DEPLOY, read_revisions
from backend.tests.helpers import SERVED, out, revision_module, run_alembic, run_ops, sql, url_of

pytestmark = pytest.mark.slow

# One file of API tests, not the whole suite (about a minute on a loaded 2-core machine): creating,
# appending, listing with its cursor, /usage: what a schema change breaks first.
API_TESTS = "backend/tests/api/test_conversations.py"

PLUGIN = '''
    """Every database a test run creates or copies is a copy of KRAKEN_TEST_SCHEMA_TEMPLATE (each
    noted in KRAKEN_TEST_SCHEMA_NOTES): a release whose fixtures run the post-deploy phase on a
    template of theirs still tests the schema it was given."""
    import os

    import backend.db.admin as admin
    from backend.db.engine import connect

    TEMPLATE = os.environ["KRAKEN_TEST_SCHEMA_TEMPLATE"]


    async def create_database(server, name):
        conn = await connect(server)
        try:
            quoted, template = (admin._quoted(n) for n in (name, TEMPLATE))
            await conn.execute(f"CREATE DATABASE {quoted} TEMPLATE {template}")
        finally:
            await conn.close()
        with open(os.environ["KRAKEN_TEST_SCHEMA_NOTES"], "a") as notes:
            notes.write(name + "\\n")
        return server.with_database(name)


    async def copy_database(server, template, name):
        return await create_database(server, name)


    admin.create_database = create_database
    admin.copy_database = copy_database
'''


def git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def added(revision: str) -> str:
    """The commit that added ``revision``'s file: the release that ships it."""
    path = f"backend/alembic/versions/{FILES[revision].file}"
    commit = git("log", "--diff-filter=A", "--format=%H", "-1", "--", path)
    assert commit, f"no commit adds {path}: this test needs the repository's history (not a shallow clone)"
    return commit


def check_out(commit: str, directory: Path) -> Path:
    """The tree of ``commit``, unchanged, in ``directory`` (git archive: no worktree to clean up)."""
    archive = directory / "tree.tar"
    with archive.open("wb") as sink:
        subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", commit], stdout=sink, check=True, timeout=60)
    root = directory / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="tar")
    return root


def run_api_tests(root: Path, server: DatabaseTarget, template: DatabaseTarget, plugin_dir: Path) -> None:
    """``root``'s API tests with this virtualenv, every database a copy of ``template``."""
    (plugin_dir / "kraken_schema_template.py").write_text(textwrap.dedent(PLUGIN))
    notes = plugin_dir / "copies.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_") and k != "MIGRATIONS_DATABASE_URL"}
    env.update(
        PYTHONPATH=f"{root}{os.pathsep}{plugin_dir}",  # ahead of the venv's own copy of this checkout
        DATABASE_URL=url_of(server),  # the same server (the embedded one too), where the template is
        KRAKEN_TEST_SCHEMA_TEMPLATE=template.database,
        KRAKEN_TEST_SCHEMA_NOTES=str(notes),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "kraken_schema_template", "-q", "-x", "-p", "no:cacheprovider"]
        + ["-n", "0", str(root / API_TESTS)],  # in this process: one file, no workers
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, out(result)[-6000:]
    assert " passed" in result.stdout, result.stdout
    assert notes.read_text().split(), "the child's databases were not made from the template"


FILES = read_revisions().by_revision
AFTER_004 = sorted(r for r in FILES if r > "004")


# The schema a revision leaves when its run stopped after its first commit (a lock's retries ran
# out): a revision of several type changes (``CHANGES``) commits after each, and the phase it ran
# in fails with it, so the release that was serving goes on serving on that schema.
PART_WAY = " part-way"


def changes_of(revision: str) -> Sequence[ops.ColumnTypeChange]:
    return list(getattr(revision_module(revision), "CHANGES", ()))


def cases() -> list[tuple[str, str, str]]:
    """(revision, release, schema): the release that serves, relative to the revision ("previous":
    the one before its file; "new": the one that added it), and the revision the schema is at
    (``PART_WAY`` after it: the revision stopped after its first commit)."""
    found = []
    for revision in AFTER_004:
        several = len(changes_of(revision)) > 1
        if FILES[revision].phase == POST_DEPLOY:
            before = FILES[revision].down_revisions[0]
            found += [(revision, "previous", before), (revision, "new", before), (revision, "new", revision)]
            found += [(revision, "new", revision + PART_WAY)] if several else []
        else:
            found.append((revision, "previous", revision))
            found += [(revision, "previous", revision + PART_WAY)] if several else []
    return found


def migrate_to(db: DatabaseTarget, revision: str) -> None:
    """``db`` (empty) at ``revision`` with this checkout's migrations, in the phase it belongs to;
    for ``<revision> part-way``, at the revision before it, then ``revision``'s upgrade run over
    its first change only, as a run that stopped after that change's commit leaves it."""
    if revision.endswith(PART_WAY):
        revision = revision.removesuffix(PART_WAY)
        migrate_to(db, FILES[revision].down_revisions[0])
        module = revision_module(revision)
        with mock.patch.object(module, "CHANGES", changes_of(revision)[:1]):
            run_ops(db, module.upgrade)
        return
    phase = ["-x", f"phase={POST_DEPLOY}"] if FILES[revision].phase == POST_DEPLOY else []
    result = run_alembic(*phase, "upgrade", revision, target=db)
    assert result.returncode == 0, out(result)


def test_every_revision_after_004_is_covered() -> None:
    assert {"005", "006", "007", "008", "009", "010"} <= set(AFTER_004)
    assert ("008", "previous", "008") in cases()  # 008 is pre-deploy: the previous release meets it
    assert ("010", "previous", "010") in cases()  # 010 too
    assert ("007", "previous", "006") in cases()  # 007 is post-deploy: the previous release never meets it
    assert {("007", "new", "006"), ("007", "new", "007")} <= set(cases())
    # 006 and 007 change three columns, committing after each: a run can stop between them.
    assert {("006", "previous", "006 part-way"), ("007", "new", "007 part-way")} <= set(cases())


def test_a_part_way_schema_is_the_revision_before_with_its_first_change_made(empty_db: DatabaseTarget) -> None:
    migrate_to(empty_db, "007 part-way")
    assert str(sql(empty_db, "SELECT version_num FROM alembic_version")[0][0]) == "006"
    swapped = "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attname LIKE '%\\_\\_old'"
    assert [r[0] for r in sql(empty_db, swapped, "kraken_conversations")] == ["started_at__old"]
    assert sql(empty_db, swapped, "kraken_turns") == []


@pytest.mark.parametrize(("revision", "release", "schema"), cases(), ids=lambda v: str(v))
def test_the_release_serving_passes_its_api_tests_on_the_schema_it_meets(
    revision: str, release: str, schema: str, empty_db: DatabaseTarget, server: DatabaseTarget, tmp_path: Path
) -> None:
    commit = added(revision)
    root = check_out(git("rev-parse", f"{commit}^") if release == "previous" else commit, tmp_path)
    assert (root / API_TESTS).is_file()
    migrate_to(empty_db, schema)
    run_api_tests(root, server, empty_db, tmp_path)


def test_this_release_passes_its_api_tests_after_the_pre_deploy_phase(
    empty_db: DatabaseTarget, server: DatabaseTarget, tmp_path: Path
) -> None:
    upgraded = run_alembic("upgrade", "head", target=empty_db)  # the deploy's step before the restart
    assert upgraded.returncode == 0, out(upgraded)
    versions = run_alembic("current", target=empty_db)
    assert versions.stdout.split()[0] == SERVED, out(versions)
    run_api_tests(PROJECT_ROOT, server, empty_db, tmp_path)
