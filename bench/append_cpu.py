"""CPU per append, in-process: the whole ASGI app of kraken-backend against the yardsticks of bench/minimal_app.py.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test uv run python bench/append_cpu.py
    ... bench/append_cpu.py --profile 30     # and cProfile's 30 costliest functions of kraken's appends
    ... bench/append_cpu.py --profile 30 --profile-app plain   # of a yardstick's

On a scratch database (``kraken_bench_cpu_<hex>``, dropped at the end), each app's lifespan runs
in this process, on uvloop, and ``POST /conversations/{id}/turns`` (3 tool calls, the body of
bench/http_load.py) is called through its ASGI interface 16 at a time, cycling over 64
conversations. No HTTP parsing and no socket: the server's share is the same for all three apps,
so it is left out. Prints this process's CPU time (``time.process_time``: the database's work is
another process's) per append, median of interleaved rounds, and the ratios: on a machine other
work loads, CPU per request moves far less than requests per second do, so the ratios say what
a change of the request path saves when bench/http_load.py's are too noisy to.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import uvloop
from support import bench_server, conversation, turn_payload

from backend.config import Settings
from backend.conversations.schemas import dumps
from backend.db.admin import scratch_database
from backend.main import create_app
from backend.migrations.runner import run_migrations

API_KEY = "bench-cpu"
CONVERSATIONS = 64
CONCURRENCY = 16
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {API_KEY}".encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: ASGIApp, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One request through ``app``: its status and body."""
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect while the request runs
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope(method, path, body), receive, send)
    return status, b"".join(chunks)


async def appends(app: ASGIApp, paths: list[str], body: bytes, count: int) -> float:
    """CPU seconds of this process per append, ``count`` appends CONCURRENCY at a time."""
    queue = iter(range(count))

    async def client(offset: int) -> None:
        for n in queue:
            status, answer = await call(app, "POST", paths[(n + offset) % len(paths)], body)
            if status != 201:
                raise SystemExit(f"append answered {status}: {answer[:300]!r}")

    started = time.process_time()
    await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))
    return (time.process_time() - started) / count


async def run(args: argparse.Namespace) -> None:
    server = await bench_server()
    async with scratch_database(server, "kraken_bench_cpu") as db, AsyncExitStack() as stack:
        await run_migrations(Settings.model_validate({"DATABASE_URL": db.dsn}))
        os.environ["DATABASE_URL"] = db.dsn
        os.environ["BENCH_POOL_SIZE"] = str(CONCURRENCY)
        import minimal_app  # reads its pool size and DATABASE_URL in its lifespan

        settings = Settings.model_validate(
            {"DATABASE_URL": db.dsn, "api_key": API_KEY, "db_pool_size": CONCURRENCY, "migrate_on_startup": "check"}
        )
        apps: dict[str, Any] = {"kraken": create_app(settings), "minimal": minimal_app.app, "plain": minimal_app.plain}
        # The two yardsticks share one pool (minimal_app keeps it in a module global).
        for app in (apps["kraken"], apps["minimal"]):
            await stack.enter_async_context(app.router.lifespan_context(app))
        kraken = apps["kraken"]
        ids = []
        for _ in range(CONVERSATIONS):
            status, answer = await call(kraken, "POST", "/conversations", dumps(conversation().model_dump()).encode())
            assert status == 201, answer
            ids.append(answer.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode())
        paths = [f"/conversations/{i}/turns" for i in ids]
        body = dumps(turn_payload(tool_calls=3)).encode()
        for app in apps.values():
            await appends(app, paths, body, 500)  # warm-up: pools full, statements prepared

        cpu: dict[str, list[float]] = {name: [] for name in apps}
        for round_number in range(args.rounds):
            for name in apps if round_number % 2 == 0 else reversed(apps):
                cpu[name].append(await appends(apps[name], paths, body, args.requests))
        load = os.getloadavg()[0]
        print(f"CPU per append, this process (median of {args.rounds} rounds of {args.requests}; load {load:.1f})")
        median = {name: statistics.median(times) for name, times in cpu.items()}
        for name, seconds in median.items():
            print(f"  {name:8} {seconds * 1e6:7.0f} µs")
        for name in ("minimal", "plain"):
            ratios = " ".join(f"{y / k:.0%}" for k, y in zip(cpu["kraken"], cpu[name], strict=True))
            print(f"  {name}/kraken (kraken's speed as a share of {name}'s): {median[name] / median['kraken']:.0%}"
                  f"  per round {ratios}")  # fmt: skip
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await appends(apps[args.profile_app], paths, body, args.requests)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
            if args.profile_out:
                profiler.dump_stats(args.profile_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per app, interleaved (default 5)")
    parser.add_argument("--requests", type=int, default=2000, help="appends per round (default 2000)")
    parser.add_argument("--profile", type=int, default=0, help="then print cProfile's N costliest functions")
    parser.add_argument("--profile-app", choices=("kraken", "minimal", "plain"), default="kraken")
    parser.add_argument("--profile-out", help="and write the profile to this file (pstats)")
    args = parser.parse_args()
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
