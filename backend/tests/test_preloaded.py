"""The preloaded command runner (``backend.tests.preloaded``) gives what the real program gives:
the same output, exit status and FAILED lines, an environment and working directory of the
command's own, and a kill on its timeout. The suite's migration tests rely on it."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from backend.config import PROJECT_ROOT
from backend.db.url import DatabaseTarget
from backend.tests import preloaded
from backend.tests.helpers import HEAD, child_env, run_alembic, run_kraken_migrations

# The real program beside each forked run: new interpreters, seconds each.
pytestmark = pytest.mark.slow


def same(forked: subprocess.CompletedProcess[str], fresh: subprocess.CompletedProcess[str]) -> None:
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    # stderr carries log lines with times and pids: compare what is not a log line.
    assert [line for line in forked.stderr.splitlines() if line.startswith("FAILED")] == [
        line for line in fresh.stderr.splitlines() if line.startswith("FAILED")
    ]


def test_a_command_answers_as_the_real_program_does(head_db: DatabaseTarget) -> None:
    forked, fresh = (run_alembic("current", target=head_db, fresh=f) for f in (False, True))
    same(forked, fresh)
    assert forked.stdout.strip() == f"{HEAD} (head)"


def test_a_failing_command_exits_and_says_so_as_the_real_program_does() -> None:
    nowhere = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    runs = [run_alembic("upgrade", "head", target=None, fresh=f, DATABASE_URL=nowhere) for f in (False, True)]
    same(*runs)
    assert runs[0].returncode == 255  # alembic's sys.exit(-1)
    assert "FAILED" in runs[0].stdout


def test_offline_sql_and_kraken_migrations_are_the_real_programs_output() -> None:
    same(*(run_alembic("upgrade", "base:002", "--sql", target=None, fresh=f) for f in (False, True)))
    lint = [run_kraken_migrations("lint", "002", target=None, fresh=f) for f in (False, True)]
    same(*lint)
    assert lint[0].returncode == 0, lint[0].stdout + lint[0].stderr


def script_directory(root: Path, env_py: str) -> Path:
    """A script directory whose env.py is ``env_py``; its ini."""
    (root / "scripts" / "versions").mkdir(parents=True)
    (root / "scripts" / "env.py").write_text(env_py)
    (root / "scripts" / "script.py.mako").write_text("")
    ini = root / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {root / 'scripts'}\n")
    return ini


def test_the_environment_and_directory_are_the_command_s_own(tmp_path: Path) -> None:
    ini = script_directory(tmp_path, "import os\nprint(os.getcwd(), os.environ.get('KRAKEN_PROBE'))\n")
    before, here = dict(os.environ), os.getcwd()
    backend = PROJECT_ROOT / "backend"
    result = preloaded.run("alembic", ["-c", str(ini), "current"], cwd=backend, env=child_env(None, KRAKEN_PROBE="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(backend), "1"]
    assert (dict(os.environ), os.getcwd()) == (before, here)


def test_commands_side_by_side_run_at_once(tmp_path: Path) -> None:
    """Each child waits until all have started: run one after the other, none would end."""
    script = (
        "import sys, time\nfrom pathlib import Path\nhere = Path(sys.argv[1])\n"
        "(here / sys.argv[2]).touch()\n"
        "while len(list(here.iterdir())) < 3:\n    time.sleep(0.01)\nprint(sys.argv[2])\n"
    )
    children = [preloaded.start("python -c", [script, str(tmp_path), str(n)], cwd=tmp_path, env={}) for n in range(3)]
    results = [child.wait(30) for child in children]
    assert [(r.returncode, r.stdout) for r in results] == [(0, "0\n"), (0, "1\n"), (0, "2\n")]
    assert len({child.pid for child in children}) == 3


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    """The server kills the child and goes on serving."""
    ini = script_directory(tmp_path, "import time\ntime.sleep(600)\n")  # hangs as a lock wait would
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        preloaded.run("alembic", ["-c", str(ini), "current"], cwd=tmp_path, env=child_env(None), timeout=1)
    assert time.monotonic() - started < 30
    assert run_alembic("--version", target=None).returncode == 0
