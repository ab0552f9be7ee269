"""Every deploy phase keeps the serving code working, proven with each release's own API tests.

While ``alembic upgrade head`` (the pre-deploy phase) runs, the previous release serves; from the
restart on, the new one does, also through the post-deploy phase. So:

- the previous release's code, unchanged (the tree of the commit before the newest revision file
  was added, from ``git archive``), runs its own API tests against a database this code migrated
  to the pre-deploy phase;
- this release's API tests run against a database migrated through the post-deploy phase (the
  rest of the suite runs on the pre-deploy schema, which the boot builds).

Both runs use this checkout's virtualenv (nothing is installed), in a child pytest whose
databases are copies of the migrated one: a plugin (``-p``) makes the child's
``backend.db.admin.create_database`` create each from it as a template. The child's fixtures then
run that release's ``run_migrations()`` on the copy, which finds the schema at or ahead of its
head, as a replica of that release would during a deploy.

The previous release running after the post-deploy phase is no requirement: that phase exists
for the steps it cannot read.
"""

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT
from backend.db.url import DatabaseTarget
from backend.tests.helpers import out, run_alembic, url_of

pytestmark = pytest.mark.slow

# One file of API tests, not the whole suite (about a minute on a loaded 2-core machine): creating,
# appending, listing with its cursor, /usage: what a schema change breaks first.
API_TESTS = "backend/tests/api/test_conversations.py"

PLUGIN = '''
    """Every database a test run creates is a copy of KRAKEN_TEST_SCHEMA_TEMPLATE (each noted in
    KRAKEN_TEST_SCHEMA_NOTES)."""
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


    admin.create_database = create_database
'''


def git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def previous_release() -> str:
    """The commit before the newest revision file was added: the code that serves while it is applied."""
    added = git("log", "--diff-filter=A", "--format=%H", "-1", "--", "backend/alembic/versions/")
    assert added, "no commit adds a revision file: this test needs the repository's history (not a shallow clone)"
    return git("rev-parse", f"{added}^")


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
        + [str(root / API_TESTS)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, out(result)[-6000:]
    assert " passed" in result.stdout, result.stdout
    assert notes.read_text().split(), "the child's databases were not made from the template"


def test_the_previous_release_passes_its_api_tests_after_the_pre_deploy_phase(
    empty_db: DatabaseTarget, server: DatabaseTarget, tmp_path: Path
) -> None:
    commit = previous_release()
    root = check_out(commit, tmp_path)
    assert (root / API_TESTS).is_file()
    upgraded = run_alembic("upgrade", "head", target=empty_db)
    assert upgraded.returncode == 0, out(upgraded)
    run_api_tests(root, server, empty_db, tmp_path)


def test_this_release_passes_its_api_tests_after_the_post_deploy_phase(
    empty_db: DatabaseTarget, server: DatabaseTarget, tmp_path: Path
) -> None:
    for phase in ("pre-deploy", "post-deploy"):
        result = run_alembic("-x", f"phase={phase}", "upgrade", "head", target=empty_db)
        assert result.returncode == 0, out(result)
    run_api_tests(PROJECT_ROOT, server, empty_db, tmp_path)
