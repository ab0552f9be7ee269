"""HTTP throughput of the real `kraken-backend` against a minimal FastAPI app, driven by wrk.

    uv run python bench/http_load.py                         # embedded PostgreSQL, or DATABASE_URL's server
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test uv run python bench/http_load.py --duration 10 --rounds 3

(Named http_load.py, not http.py: running a script puts its directory first on sys.path, and a
bench/http.py would then shadow the standard library's `http` package for everything imported.)

On a scratch database it creates (``kraken_bench_http_<hex>``, dropped at the end) on the server
the service would use, it starts two servers side by side, each with --workers processes:

- the `kraken-backend` command as deployed (KRAKEN_WORKERS, KRAKEN_API_KEY set, the schema
  migrated beforehand and checked at boot, a fixed pool of --pool-size connections per process);
- two yardsticks from bench/minimal_app.py under uvicorn with uvloop and httptools, the same
  statements on a plain asyncpg pool of the same size and nothing else (see its docstring):
  ``minimal`` parses the append's body with a pydantic model, ``plain`` with ``json.loads``.

Both log requests as their defaults do (kraken-backend's access log, uvicorn's), to a file.
Then wrk (Debian package `wrk`) loads each in turn, at each --connections count, for:

- append: ``POST /conversations/{id}/turns`` with 3 tool calls, over 64 conversations created
  first (bench/http_load.lua cycles the ids, so requests in flight hardly ever share a row lock);
- user-append: the same with a user's key (issue 20) on 64 conversations that user created: the
  key checked inside the append's statement. The yardsticks take no key (they serve it as
  append); the summary adds kraken's user-append / append within each round (goal: within 5%);
- view:   ``GET /conversations/{id}``, one conversation of 20 turns x 3 tool calls (~40 KiB);
- health: ``GET /health``.

It prints requests/s and p50/p99 latency per run; each round runs every scenario on every
server, their order reversed every other round, and the ratios kraken/minimal and kraken/plain
are taken within the round (a busy machine drifts; runs seconds apart drift less). The summary
gives the median over rounds of rates, latencies and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from support import bench_server, conversation, turn_payload

from backend.config import PROJECT_ROOT, Settings, load_settings
from backend.conversations.schemas import dumps
from backend.db.admin import scratch_database
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations.runner import run_migrations
from backend.tests.helpers import SERVICE, child_env, free_port

BENCH_DIR = Path(__file__).resolve().parent
LUA = BENCH_DIR / "http_load.lua"
API_KEY = "bench-" + secrets.token_hex(8)
CONVERSATIONS = 64
VIEW_TURNS = 20
SCENARIOS = ("append", "user-append", "view", "health")
APPS = ("kraken", "minimal", "plain")
YARDSTICKS = APPS[1:]
# The goal for appends at 16 connections: kraken's rate at least this share of each yardstick's.
GOALS = {"minimal": 0.9, "plain": 0.75}
# A user's key on the append: at least this share of the operator's key's rate (issue 20).
USER_KEY_GOAL = 0.95
MAX_ERROR_SHARE = 0.01  # of a run's requests; a run with more is left out of the figures


@dataclass(frozen=True)
class Run:
    """One wrk run's figures."""

    rate: float  # requests/s
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and socket errors
    error_share: float  # of the requests

    @property
    def valid(self) -> bool:
        return self.error_share <= MAX_ERROR_SHARE


class Server:
    """A server process of ours, its output in a log file; stopped with SIGTERM, as systemd does."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, logs: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = logs / f"{name}.log"
        with self.log_path.open("wb") as log:
            # Its own process group: whatever it forks is ended with it if it will not stop.
            self.process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_tail(self, lines: int = 20) -> str:
        """Its last lines, the access log's left out (it would hide the rest under load)."""
        logged = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in logged if ' HTTP/1.1" ' not in line][-lines:])

    def wait_until_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not answer /health within {timeout:g} s:\n{self.log_tail()}")

    def processes(self) -> int:
        """How many processes serve: the workers it started, or itself alone."""
        workers = 0
        for process in Path("/proc").glob("[0-9]*"):
            try:
                ppid = int((process / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (process / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue  # it ended while we looked
            # multiprocessing's spawn start method adds a resource tracker process: not a worker.
            workers += ppid == self.process.pid and b"resource_tracker" not in command
        return workers or 1

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_kraken(db: DatabaseTarget, args: argparse.Namespace, logs: Path, *, migrate: str = "check") -> Server:
    """`kraken-backend` as deployed, with ``args.workers`` processes of a fixed pool of
    ``args.pool_size``; ``migrate`` is its KRAKEN_MIGRATE_ON_STARTUP."""
    port = free_port()
    env = child_env(
        db,
        KRAKEN_API_KEY=API_KEY,
        KRAKEN_PORT=str(port),
        KRAKEN_WORKERS=str(args.workers),
        KRAKEN_MIGRATE_ON_STARTUP=migrate,
        KRAKEN_DB_POOL_SIZE=str(args.pool_size),
        KRAKEN_DB_MAX_OVERFLOW="0",
    )
    return Server("kraken", [SERVICE], env, port, logs)


def start_yardstick(name: str, db: DatabaseTarget, args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    env = child_env(db, BENCH_POOL_SIZE=str(args.pool_size))
    app = {"minimal": "minimal_app:app", "plain": "minimal_app:plain"}[name]
    command = [sys.executable, "-m", "uvicorn", app, "--app-dir", str(BENCH_DIR)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)]
    command += ["--loop", "uvloop", "--http", "httptools"]
    return Server(name, command, env, port, logs)


def post(server: Server, path: str, body: object, key: str = API_KEY) -> dict[str, object]:
    request = urllib.request.Request(
        server.url(path),
        data=dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            created: dict[str, object] = json.load(answer)
            return created
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"POST {path}: {exc.code} {exc.read()[:300]!r}") from None


def run_wrk(
    server: Server,
    method: str,
    paths: list[str],
    body_file: Path | None,
    connections: int,
    seconds: float,
    threads: int,
    key: str = API_KEY,
) -> Run:
    threads = min(threads, connections)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "10s"]
    command += ["-s", str(LUA), server.url(""), "--", method, str(body_file or "-"), key, str(threads), *paths]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line.split() for line in finished.stdout.splitlines() if line.startswith("wrk-result ")]
    if server.process.poll() is not None:
        raise SystemExit(f"{server.name} exited ({server.process.returncode}) during the run:\n{server.log_tail()}")
    if finished.returncode != 0 or not lines:
        raise SystemExit(f"wrk failed ({finished.returncode}): {finished.stderr.strip() or finished.stdout.strip()}")
    requests, duration_us, p50_us, p99_us, bad_status, socket_errors = (int(field) for field in lines[0][1:])
    errors = bad_status + socket_errors
    # A few errors (a 503 when a stalled machine kept a request from the pool for 5 s) are
    # counted, shown, and left out of the rate; a run with more is left out of the figures
    # (error answers are cheaper than the real work: a rate made of them means nothing).
    return Run(
        (requests - bad_status) / (duration_us / 1e6), p50_us / 1000, p99_us / 1000, errors, errors / max(requests, 1)
    )


@dataclass(frozen=True)
class Targets:
    """What the scenarios load: the operator's conversations, a user's key and that user's, the view's."""

    ids: list[str]
    user_key: str
    user_ids: list[str]
    view_id: str


def scenario_requests(scenario: str, targets: Targets) -> tuple[str, list[str], str]:
    """(method, paths, key) of a scenario."""
    if scenario == "append":
        return "POST", [f"/conversations/{i}/turns" for i in targets.ids], API_KEY
    if scenario == "user-append":
        return "POST", [f"/conversations/{i}/turns" for i in targets.user_ids], targets.user_key
    if scenario == "view":
        return "GET", [f"/conversations/{targets.view_id}"], API_KEY
    return "GET", ["/health"], API_KEY


def valid_rounds(
    results: dict[tuple[str, int, str], list[Run]], scenario: str, connections: int
) -> list[dict[str, Run]]:
    """Each round's runs of a scenario by app, leaving out rounds where any had too many errors."""
    rounds = zip(*(results[(scenario, connections, name)] for name in APPS), strict=True)
    return [dict(zip(APPS, runs, strict=True)) for runs in rounds if all(run.valid for run in runs)]


def report(results: dict[tuple[str, int, str], list[Run]], args: argparse.Namespace) -> None:
    print(
        f"\nmedian of {args.rounds} round(s) of {args.duration:g} s per run; a ratio is the median of the rounds'"
        " own ratios (each round's listed); rounds where a run failed over 1% of its requests are left out"
    )
    header = "".join(f"  {name + ' req/s':>13} {'p50 ms':>7} {'p99 ms':>7}" for name in APPS)
    ratios_header = "".join(f"  {'kraken/' + name:>14}  per round" for name in YARDSTICKS)
    print(f"  {'scenario':11} {'conns':>5}{header}{ratios_header}")
    for scenario in args.scenarios:
        for connections in args.connections:
            rounds = valid_rounds(results, scenario, connections)
            if not rounds:
                print(f"  {scenario:11} {connections:>5}  no round without errors")
                continue

            def medians(runs: list[Run]) -> str:
                rate = statistics.median(r.rate for r in runs)
                p50 = statistics.median(r.p50_ms for r in runs)
                p99 = statistics.median(r.p99_ms for r in runs)
                return f"  {rate:>13.0f} {p50:7.1f} {p99:7.1f}"

            line = "".join(medians([each[name] for each in rounds]) for name in APPS)
            for name in YARDSTICKS:
                ratios = [each["kraken"].rate / each[name].rate for each in rounds]
                line += f"  {statistics.median(ratios):>14.0%}  {' '.join(f'{r:.0%}' for r in ratios)}"
            print(f"  {scenario:11} {connections:>5}{line}")
    errors = {
        name: sum(run.errors for (_, _, app), runs in results.items() if app == name for run in runs) for name in APPS
    }
    if any(errors.values()):
        print(f"  errors (not in the rates): {', '.join(f'{name} {count}' for name, count in errors.items())}")
    rounds = valid_rounds(results, "append", 16) if 16 in args.connections else []
    for name in YARDSTICKS if rounds else ():
        ratio = statistics.median(each["kraken"].rate / each[name].rate for each in rounds)
        print(f"\n  GOAL appends at 16 connections, kraken/{name} >= {GOALS[name]:.0%}: {ratio:.0%}", end="")
    if {"append", "user-append"} <= set(args.scenarios):
        for connections in args.connections:
            pairs = [
                (operator, user)
                for operator, user in zip(
                    results[("append", connections, "kraken")],
                    results[("user-append", connections, "kraken")],
                    strict=True,
                )
                if operator.valid and user.valid
            ]
            if pairs:
                ratios = [user.rate / operator.rate for operator, user in pairs]
                print(
                    f"\n  GOAL kraken's appends at {connections} connections, user key / operator key"
                    f" >= {USER_KEY_GOAL:.0%}: {statistics.median(ratios):.0%}"
                    f" (per round {' '.join(f'{r:.0%}' for r in ratios)})",
                    end="",
                )
    print()


async def prepare(db: DatabaseTarget) -> None:
    await run_migrations(Settings.model_validate({"DATABASE_URL": db.dsn}))


async def analyze(db: DatabaseTarget) -> None:
    """ANALYZE the tables the warm-up filled, as autovacuum does on a live database, before measuring.

    A prepared statement's plan is made on the statistics at hand, and after five runs PostgreSQL
    may keep a generic one. Planned on tables the migrations just vacuumed while empty (006's
    backfill does), a generic plan scans kraken_turns in full on every append, and is kept until
    the next ANALYZE: the server warmed up first (kraken) ran at half speed, the others not (their
    sessions planned later, on bigger tables). ANALYZE invalidates every session's plans; all of
    them plan again on statistics like a live database's."""
    conn = await connect(db)
    try:
        await conn.execute("ANALYZE kraken_conversations, kraken_turns, kraken_tool_calls, kraken_users")
    finally:
        await conn.close()


def main(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        print("wrk is not installed: install it with `sudo apt-get install wrk` (Debian/Ubuntu package wrk)")
        sys.exit(2)
    asyncio.run(run(args))


async def run(args: argparse.Namespace) -> None:
    server = await bench_server()
    where = "DATABASE_URL " + server.safe if load_settings().database_target() else "embedded PostgreSQL"
    async with scratch_database(server, "kraken_bench_http") as db:
        print(f"server: {where}; scratch database {db.database}")
        print(
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.workers} worker process(es) each,"
            f" pool {args.pool_size} connections per process; wrk {args.wrk_threads} thread(s)"
        )
        await prepare(db)
        # The servers are blocking to talk to from here; run the rest off the event loop.
        await asyncio.to_thread(load, db, args)


def load(db: DatabaseTarget, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="kraken_http_load_") as tmp:
        logs = Path(tmp)
        servers = {"kraken": start_kraken(db, args, logs)}
        servers |= {name: start_yardstick(name, db, args, logs) for name in YARDSTICKS}
        try:
            for server in servers.values():
                server.wait_until_up()
                print(f"{server.name} up on port {server.port}, serving from {server.processes()} process(es)")
            if servers["kraken"].processes() != args.workers:
                print(
                    f"  note: kraken-backend serves from {servers['kraken'].processes()} process(es), not"
                    f" {args.workers}: this build does not read KRAKEN_WORKERS"
                )
            measure(db, servers, logs, args)
        finally:
            for server in servers.values():
                server.stop()


def measure(db: DatabaseTarget, servers: dict[str, Server], logs: Path, args: argparse.Namespace) -> None:
    kraken = servers["kraken"]
    ids = [str(post(kraken, "/conversations", conversation().model_dump())["id"]) for _ in range(CONVERSATIONS)]
    user_key = str(post(kraken, "/users", {"name": "bench"})["api_key"])
    user_ids = [
        str(post(kraken, "/conversations", conversation().model_dump(), key=user_key)["id"])
        for _ in range(CONVERSATIONS)
    ]
    view_id = str(post(kraken, "/conversations", conversation().model_dump())["id"])
    for _ in range(VIEW_TURNS):
        post(kraken, f"/conversations/{view_id}/turns", turn_payload(tool_calls=3))
    targets = Targets(ids, user_key, user_ids, view_id)
    body_file = logs / "turn.json"
    body_file.write_text(dumps(turn_payload(tool_calls=3)))
    print(
        f"{CONVERSATIONS} conversations to append to (and {CONVERSATIONS} of a user's),"
        f" one of {VIEW_TURNS} turns to view"
    )

    top = max(args.connections)
    for name in APPS:  # warm-up: every process's pool full, statements prepared, code paths hot
        for scenario in ("append", "user-append"):
            method, paths, key = scenario_requests(scenario, targets)
            run_wrk(servers[name], method, paths, body_file, top, 3, args.wrk_threads, key)
        run_wrk(servers[name], "GET", [f"/conversations/{view_id}"], None, top, 1, args.wrk_threads)
    asyncio.run(analyze(db))
    print("warmed up; tables analyzed\n")

    results: dict[tuple[str, int, str], list[Run]] = {}
    for round_number in range(args.rounds):
        order = APPS if round_number % 2 == 0 else APPS[::-1]
        for scenario in args.scenarios:
            method, paths, key = scenario_requests(scenario, targets)
            for connections in args.connections:
                for name in order:
                    figures = run_wrk(
                        servers[name],
                        method,
                        paths,
                        body_file if method == "POST" else None,
                        connections,
                        args.duration,
                        args.wrk_threads,
                        key,
                    )
                    results.setdefault((scenario, connections, name), []).append(figures)
                    print(
                        f"round {round_number + 1}/{args.rounds}  {scenario:11} c={connections:<3} {name:7}"
                        f" {figures.rate:8.0f} req/s  p50 {figures.p50_ms:6.1f} ms  p99 {figures.p99_ms:6.1f} ms"
                        + (
                            f"  ({figures.errors} errors{'' if figures.valid else ': run left out'})"
                            if figures.errors
                            else ""
                        ),
                        flush=True,
                    )
    report(results, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes per server (default: one per CPU)"
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every run on every server (default 3)")
    parser.add_argument(
        "--connections",
        type=lambda value: sorted({int(n) for n in value.split(",")}),
        default=[16, 64],
        help="keep-alive connections, comma-separated (default 16,64)",
    )
    parser.add_argument(
        "--pool-size", type=int, default=8, help="database connections per server process, both servers (default 8)"
    )
    parser.add_argument(
        "--scenarios",
        type=lambda value: [name for name in SCENARIOS if name in value.split(",")],
        default=list(SCENARIOS),
        help=f"which to run, comma-separated (default {','.join(SCENARIOS)})",
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads (default 1: it shares the CPUs)")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
