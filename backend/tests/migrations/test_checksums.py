"""Revision checksums track what a revision does, not how it is written (no database needed)."""

import shutil
import textwrap
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT
from backend.migrations.checksums import checksum
from backend.migrations.revisions import read_revisions
from backend.tests.helpers import HEAD, NEXT

# Checksums, URLs and revision files must read the same on every Python we support (.ci/run).
pytestmark = pytest.mark.every_python

VERSIONS = PROJECT_ROOT / "backend" / "alembic" / "versions"

REVISION = '''
"""Add a note column.

Revision ID: 003
"""

from alembic import op

revision: str = "003"
down_revision: str | None = "002"


def upgrade() -> None:
    """Add it."""
    op.execute("ALTER TABLE kraken_turns ADD COLUMN note text")


def downgrade() -> None:
    op.execute("ALTER TABLE kraken_turns DROP COLUMN note")
'''

# The same revision, written differently: other docstrings, comments, quotes, line breaks,
# parentheses, a trailing comma, blank lines.
RESTYLED = """
'''Add a note column: a longer docstring, reworded.'''
from alembic import op  # the only import
revision: str = '003'
down_revision: str | None = ('002')
def upgrade() -> None:
    # a comment instead of the docstring
    op.execute(
        'ALTER TABLE kraken_turns ADD COLUMN note text',
    )
def downgrade() -> None:
    '''Now with a docstring.'''
    op.execute("ALTER TABLE kraken_turns "
               "DROP COLUMN note")
"""


def test_comments_docstrings_and_formatting_do_not_change_the_checksum() -> None:
    assert checksum(RESTYLED) == checksum(REVISION)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("ADD COLUMN note text", "ADD COLUMN note varchar"),  # a statement
        ('down_revision: str | None = "002"', 'down_revision: str | None = "001"'),  # the graph
        ('    op.execute("ALTER TABLE kraken_turns DROP', '    pass\n    op.execute("ALTER TABLE kraken_turns DROP'),
        ('    """Add it."""\n', '    """Add it."""\n    op.execute("SELECT 1")\n'),  # code after a docstring
        ("-> None:\n    op.execute", "-> None:\n    op.get_bind()\n    op.execute"),
        ('"""Add it."""', '"""Add it."""\n    if False:\n        return'),
    ],
)
def test_any_change_to_the_code_changes_the_checksum(old: str, new: str) -> None:
    assert old in REVISION
    assert checksum(REVISION.replace(old, new, 1)) != checksum(REVISION)


def test_literals_of_other_types_are_told_apart() -> None:
    assert checksum("x = 1") != checksum("x = '1'") != checksum("x = 1.0") != checksum("x = True")


def test_the_applied_revisions_checksums_never_change() -> None:
    # 001 to 006 are applied in production, and 007 ships (pinned as it landed): an edit that
    # changes what one does would make a fresh database differ from production, and every
    # production database's next run refuse to start. A development database lets an edit of a
    # revision it alone ran pass (the edit loop of the revision being written), so this test is
    # what stops an edit of a shipped one in CI. The same figures on Python 3.10 to 3.13 (the
    # tree is serialised without ast.dump).
    files = read_revisions().by_revision
    assert files["001"].checksum == "d4549d188f9c9878496047a43c1a43c1bf7a3bd9f16d9c9ec2dea1a506c3c07b"
    assert files["002"].checksum == "dac368ce0683774bac17954f80eebe88076dd5a50037e05d15f1e864e02b9d46"
    assert files["003"].checksum == "a5d0a74332d751762d3b2371a0a5392568690581a5a88b540657e2842a99720c"
    assert files["004"].checksum == "77d3eecd7dc441fad57a4b1edd23f37b9f63b67eb7aa9f1c15740ba0f550ff04"
    assert files["005"].checksum == "e96221d4f3e6f5fe2573c11edb87d3bfcaa6ec2c14a8e213a438da608be3386f"
    assert files["006"].checksum == "9cc154dabd4c7eb65a0eaca5c949e2a7f8aedd08809d40f449801e3a124ce94d"
    assert files["007"].checksum == "31a79837da4330f1a5a260e1e6f692b4cc4926d56bb4f9a0ed70223325be62b9"
    assert files["008"].checksum == "a0f087b64c0a255017829084f341cd60c61ebd07f06338dbc9264749023246b0"
    assert files["009"].checksum == "4ad0ac695a51ac8cd97570f924a55614e2a306c4064c252a49ce03361b2cfe36"
    assert files["010"].checksum == "33982e008d1e46ce01a20930f1802270fe156ebaf3173fd21c56e6eb9c063617"
    assert [files[rev].phase for rev in ("006", "007", "008", "009", "010")] == [
        "pre-deploy",
        "post-deploy",
        "pre-deploy",
        "post-deploy",
        "pre-deploy",
    ]  # the phase is in the checksum too
    assert files["002"].file == "002_integrity_and_lookups.py"


def test_every_revision_has_a_checksum(tmp_path: Path) -> None:
    assert set(read_revisions().by_revision) == set(read_revisions().graph)
    # An id that is not a plain literal is found through Alembic.
    shutil.copytree(VERSIONS.parent, tmp_path / "alembic", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "alembic" / "versions" / f"{NEXT}_computed.py").write_text(
        textwrap.dedent(
            f"""
            revision = "{NEXT[:2]}" + "{NEXT[2:]}"
            down_revision = "{HEAD}"
            branch_labels = None
            depends_on = None


            def upgrade():
                pass


            def downgrade():
                pass
            """
        )
    )
    found = read_revisions(tmp_path / "alembic").by_revision
    assert found[NEXT].file == f"{NEXT}_computed.py"
    assert found["001"] == read_revisions().by_revision["001"]
