"""The revisions form one line (one head, every id once, file names that match their ids) and
stay static (no application code imported).

Two branches that each add the next revision (both `002_....py`, both `revision = "002"`) merge
cleanly in git, and Alembic then only warns and silently keeps one of the two: the other one's
changes would never run. This test fails first, and says how to fix it.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT
from backend.migrations.revisions import ALEMBIC_DIR, read_revisions

VERSIONS = ALEMBIC_DIR / "versions"


def revision_graph_problems(script_location: Path) -> list[str]:
    """What is wrong with the revision files of ``script_location``, each with how to fix it."""
    revisions: dict[str, list[str]] = {}
    problems = []
    read = read_revisions(script_location).files
    for found in read:
        revisions.setdefault(found.revision, []).append(found.file)
        if not found.file.startswith(f"{found.revision}_"):
            problems.append(
                f"{found.file} says revision = {found.revision!r}; name the file {found.revision}_<slug>.py"
            )

    top = max((int(r) for r in revisions if r.isdigit()), default=0)
    for revision, files in sorted(revisions.items()):
        if len(files) > 1:
            problems.append(
                f"{len(files)} files say revision = {revision!r} ({', '.join(files)}): two branches each added it. "
                f"Renumber the one merged last: rename it to {top + 1:03d}_<slug>.py, set its revision to "
                f"'{top + 1:03d}' and its down_revision to the current head, and check it still applies on top"
            )
    for found in sorted(read, key=lambda f: f.revision):
        for missing in sorted(set(found.down_revisions) - set(revisions)):
            problems.append(f"revision {found.revision!r} follows {missing!r}, which no file defines")
    heads = sorted(set(revisions) - {down for f in read for down in f.down_revisions})
    if len(heads) > 1:
        problems.append(
            f"{len(heads)} heads ({', '.join(heads)}): two branches each added revisions after the same one. "
            "Put one after the other (renumber it and set its down_revision to the other head), or join them with "
            f'`uv run alembic merge heads -m "merge" --rev-id {top + 1:03d}`'
        )
    return problems


def test_the_revisions_form_one_line() -> None:
    problems = revision_graph_problems(ALEMBIC_DIR)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def copy_with(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A script directory (its versions/ only) of the real revisions and ``extra`` ones."""
    versions = tmp_path / "versions"
    shutil.copytree(VERSIONS, versions, ignore=shutil.ignore_patterns("__pycache__"))
    for name, (revision, down) in ((n, s.split(":")) for n, s in extra.items()):
        (versions / name).write_text(
            f'"""A branch."""\n\nrevision = "{revision}"\ndown_revision = "{down}"\n'
            "branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
        )
    return tmp_path


def test_two_branches_adding_the_same_number_are_caught(tmp_path: Path) -> None:
    head = max(p.name.split("_")[0] for p in VERSIONS.glob("*.py"))
    down = f"{int(head) - 1:03d}"
    script_location = copy_with(tmp_path, {f"{head}_other_branch.py": f"{head}:{down}"})
    [problem] = revision_graph_problems(script_location)
    assert problem.startswith(f"2 files say revision = '{head}' (")
    assert f"{head}_other_branch.py" in problem
    assert f"rename it to {int(head) + 1:03d}_<slug>.py" in problem


def test_two_heads_are_caught(tmp_path: Path) -> None:
    head = max(p.name.split("_")[0] for p in VERSIONS.glob("*.py"))
    down = f"{int(head) - 1:03d}"
    following = f"{int(head) + 1:03d}"
    script_location = copy_with(tmp_path, {f"{following}_other_branch.py": f"{following}:{down}"})
    [problem] = revision_graph_problems(script_location)
    assert problem.startswith(f"2 heads ({head}, {following}): two branches each added revisions")
    assert f'uv run alembic merge heads -m "merge" --rev-id {int(following) + 1:03d}' in problem


def test_a_file_named_for_another_revision_is_caught(tmp_path: Path) -> None:
    head = max(p.name.split("_")[0] for p in VERSIONS.glob("*.py"))
    following = f"{int(head) + 1:03d}"
    script_location = copy_with(tmp_path, {f"{int(head) + 2:03d}_misnamed.py": f"{following}:{head}"})
    assert revision_graph_problems(script_location) == [
        f"{int(head) + 2:03d}_misnamed.py says revision = '{following}'; name the file {following}_<slug>.py"
    ]


ALLOWED_IMPORTS = {
    "alembic",
    "sqlalchemy",
    "collections",
    "dataclasses",
    "typing",
    "__future__",
    "backend.migrations.ops",
}


def test_revisions_import_no_application_code() -> None:
    # A revision must build the same schema forever, whatever the models say by then.
    for path in sorted(VERSIONS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [f"{base}.{alias.name}" if base.startswith("backend") else base for alias in node.names]
            else:
                continue
            for name in names:
                assert any(name == a or name.startswith(a + ".") for a in ALLOWED_IMPORTS), (
                    f"{path.name} imports {name}"
                )


def test_the_helpers_import_no_application_code() -> None:
    code = "import sys, backend.migrations.ops; print(sorted(m for m in sys.modules if m.startswith('backend')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    # ops.py's own leaf modules (the backfill engine's records, how a moment is written, the WAL's
    # compression) import
    # nothing from backend themselves: the ledger, the database code and the models stay out.
    assert result.stdout.strip() == (
        "['backend', 'backend.migrations', 'backend.migrations.backfills', 'backend.migrations.moments',"
        " 'backend.migrations.ops', 'backend.migrations.wal']"
    )
