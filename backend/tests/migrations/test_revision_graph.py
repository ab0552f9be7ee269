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
from alembic.script import ScriptDirectory

from backend.config import PROJECT_ROOT
from backend.migrations.revisions import alembic_config, read_revisions

VERSIONS = PROJECT_ROOT / "backend" / "alembic" / "versions"


def _literal(tree: ast.Module, name: str) -> object:
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(value)
    raise AssertionError(f"no literal {name} = ... at the top level")


def revision_graph_problems(versions: Path) -> list[str]:
    """What is wrong with the revision files in ``versions``, each with how to fix it."""
    revisions: dict[str, list[str]] = {}
    parents: dict[str, set[str]] = {}
    problems = []
    for path in sorted(versions.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        revision = str(_literal(tree, "revision"))
        down = _literal(tree, "down_revision")
        downs = {str(d) for d in (down if isinstance(down, (tuple, list)) else [down]) if d is not None}
        revisions.setdefault(revision, []).append(path.name)
        parents.setdefault(revision, set()).update(downs)
        if not path.name.startswith(f"{revision}_"):
            problems.append(f"{path.name} says revision = {revision!r}; name the file {revision}_<slug>.py")

    top = max((int(r) for r in revisions if r.isdigit()), default=0)
    for revision, files in sorted(revisions.items()):
        if len(files) > 1:
            problems.append(
                f"{len(files)} files say revision = {revision!r} ({', '.join(files)}): two branches each added it. "
                f"Renumber the one merged last: rename it to {top + 1:03d}_<slug>.py, set its revision to "
                f"'{top + 1:03d}' and its down_revision to the current head, and check it still applies on top"
            )
    known = set(revisions)
    for revision, downs in sorted(parents.items()):
        for missing in sorted(downs - known):
            problems.append(f"revision {revision!r} follows {missing!r}, which no file defines")
    heads = sorted(known - {d for downs in parents.values() for d in downs})
    if len(heads) > 1:
        problems.append(
            f"{len(heads)} heads ({', '.join(heads)}): two branches each added revisions after the same one. "
            "Put one after the other (renumber it and set its down_revision to the other head), or join them with "
            f'`uv run alembic merge heads -m "merge" --rev-id {top + 1:03d}`'
        )
    return problems


def test_the_revisions_form_one_line() -> None:
    problems = revision_graph_problems(VERSIONS)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def copy_with(tmp_path: Path, extra: dict[str, str]) -> Path:
    versions = tmp_path / "versions"
    shutil.copytree(VERSIONS, versions, ignore=shutil.ignore_patterns("__pycache__"))
    for name, (revision, down) in ((n, s.split(":")) for n, s in extra.items()):
        (versions / name).write_text(
            f'"""A branch."""\n\nrevision = "{revision}"\ndown_revision = "{down}"\n'
            "branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
        )
    return versions


def test_two_branches_adding_the_same_number_are_caught(tmp_path: Path) -> None:
    head = max(p.name.split("_")[0] for p in VERSIONS.glob("*.py"))
    down = f"{int(head) - 1:03d}"
    versions = copy_with(tmp_path, {f"{head}_other_branch.py": f"{head}:{down}"})
    [problem] = revision_graph_problems(versions)
    assert problem.startswith(f"2 files say revision = '{head}' (")
    assert f"{head}_other_branch.py" in problem
    assert f"rename it to {int(head) + 1:03d}_<slug>.py" in problem


def test_two_heads_are_caught(tmp_path: Path) -> None:
    head = max(p.name.split("_")[0] for p in VERSIONS.glob("*.py"))
    down = f"{int(head) - 1:03d}"
    following = f"{int(head) + 1:03d}"
    versions = copy_with(tmp_path, {f"{following}_other_branch.py": f"{following}:{down}"})
    [problem] = revision_graph_problems(versions)
    assert problem.startswith(f"2 heads ({head}, {following}): two branches each added revisions")
    assert f'uv run alembic merge heads -m "merge" --rev-id {int(following) + 1:03d}' in problem


def test_a_file_named_for_another_revision_is_caught(tmp_path: Path) -> None:
    head = max(p.name.split("_")[0] for p in VERSIONS.glob("*.py"))
    following = f"{int(head) + 1:03d}"
    versions = copy_with(tmp_path, {f"{int(head) + 2:03d}_misnamed.py": f"{following}:{head}"})
    assert revision_graph_problems(versions) == [
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
    assert result.stdout.strip() == "['backend', 'backend.migrations', 'backend.migrations.ops']"


def test_a_merge_revision_written_over_several_lines_is_read_right(tmp_path: Path) -> None:
    # The boot-time reader parses ids from the files' text; a tuple spread over lines must not
    # turn a merge into a third head (which would keep /ready at 503 forever).
    versions = tmp_path / "versions"
    versions.mkdir()
    for rev, down in (("001", "None"), ("002", '"001"'), ("003", '"001"')):
        (versions / f"{rev}_r.py").write_text(f'revision = "{rev}"\ndown_revision = {down}\n')
    (versions / "004_merge.py").write_text('revision = "004"\ndown_revision = (\n    "002",\n    "003",\n)\n')
    for path in versions.iterdir():
        path.write_text(path.read_text() + "branch_labels = None\ndepends_on = None\n")
    (tmp_path / "script.py.mako").write_text("")
    revisions = read_revisions(tmp_path)
    assert revisions.heads == frozenset({"004"})
    assert revisions.graph["004"] == ("002", "003")


def test_depends_on_is_not_an_edge_of_the_graph(tmp_path: Path) -> None:
    # 003 depends on 002 without following it: Alembic's heads are 002 and 003 (depends_on only
    # orders them). The multi-line down_revision sends the reader to its fallback through Alembic.
    versions = tmp_path / "versions"
    versions.mkdir()
    for rev, down, depends in (("001", "None", "None"), ("002", '"001"', "None"), ("003", '(\n    "001",\n)', '"002"')):
        (versions / f"{rev}_r.py").write_text(
            f'revision = "{rev}"\ndown_revision = {down}\nbranch_labels = None\ndepends_on = {depends}\n'
        )
    (tmp_path / "script.py.mako").write_text("")
    alembic_heads = ScriptDirectory.from_config(alembic_config(tmp_path)).get_heads()

    revisions = read_revisions(tmp_path)

    assert revisions.heads == frozenset(alembic_heads) == frozenset({"002", "003"})
    assert revisions.graph["003"] == ("001",)
