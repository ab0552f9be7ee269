"""The service's Prometheus series: defined once here, written where things happen, served at GET /metrics.

Every series is documented in docs/operations.md ("Metrics"). KRAKEN_METRICS=off leaves all of it unused:
callers check ``settings.metrics`` before recording, so nothing here runs.

Worker processes: prometheus_client keeps values in memory, or, when PROMETHEUS_MULTIPROC_DIR is
set as it is first imported, in one file per process in that directory. /metrics then merges
every process's files (``MultiProcessCollector``), so any worker answers for all of them:
counters and histograms add up, the pool gauges add up over live workers (``livesum``; the
supervisor calls ``mark_worker_dead`` for a worker that exited), and the migration facts, which
the process that prepared the schema writes once, take the largest value any process wrote
(``max``: workers that find the schema at head write zeros).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, get_args

from fastapi.routing import iter_route_contexts
from starlette.routing import Match
from starlette.types import Scope

from backend.db.errors import Fault

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

    from backend.conversations.schemas import TurnPublic
    from backend.db.pool import PoolLender
    from backend.migrations.revisions import SchemaStatus
    from backend.migrations.runner import MigrationRun

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PATH = "/metrics"

# Request latency, in seconds: /health answers in well under a millisecond, an append in a few, a
# long shared view in tens to hundreds; the top buckets are the pool (5 s) and statement (10 s) timeouts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The route label of a request no route matched: one value, whatever the path, so that scanners
# cannot grow the number of series.
UNMATCHED = "unmatched"
# The method label: any other method a client makes up is "other", for the same reason.
_METHODS = {method: method for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


@dataclass(frozen=True)
class Series:
    requests: Counter
    request_seconds: Histogram
    pool_in_use: Gauge
    pool_idle: Gauge
    pool_overflow: Gauge
    database_errors: Counter
    turns: Counter
    tool_calls: Counter
    truncated_results: Counter
    schema_revision: Gauge
    migration_seconds: Gauge
    migration_lock_wait_seconds: Gauge
    revisions_applied: Gauge


@cache
def series() -> Series:
    """Every series, created on first use, once per process."""
    # Imported here, not at the top: prometheus_client chooses its storage (memory, or the files of
    # PROMETHEUS_MULTIPROC_DIR) when it is first imported, and `kraken-backend` sets that variable
    # after this module was imported with backend.main.
    from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

    # No `_created` sample beside every counter and histogram: they double the series, and worker
    # processes (the files) cannot export them, so both modes answer the same series.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    created = Series(
        requests=Counter("kraken_http_requests", "HTTP requests answered.", ["route", "method", "status"]),
        request_seconds=Histogram(
            "kraken_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
        ),
        pool_in_use=Gauge(
            "kraken_db_pool_connections_in_use",
            "Service pool connections checked out by requests.",
            multiprocess_mode="livesum",
        ),
        pool_idle=Gauge(
            "kraken_db_pool_connections_idle", "Service pool connections open and idle.", multiprocess_mode="livesum"
        ),
        pool_overflow=Gauge(
            "kraken_db_pool_connections_overflow",
            "Service pool connections open beyond KRAKEN_DB_POOL_SIZE (at most KRAKEN_DB_MAX_OVERFLOW).",
            multiprocess_mode="livesum",
        ),
        database_errors=Counter(
            "kraken_database_errors", "Requests answered 503/504 for a database fault, by kind.", ["kind"]
        ),
        turns=Counter("kraken_turns_written", "Turns stored (not counting idempotent replays)."),
        tool_calls=Counter("kraken_tool_calls_written", "Tool calls stored with those turns."),
        truncated_results=Counter(
            "kraken_tool_results_truncated", "Tool results stored truncated (over KRAKEN_TOOL_RESULT_MAX_BYTES)."
        ),
        schema_revision=Gauge(
            "kraken_schema_revision",
            "1 for the schema revision found at boot (several are joined by commas; none: never migrated).",
            ["revision"],
            multiprocess_mode="max",
        ),
        migration_seconds=Gauge(
            "kraken_boot_migration_seconds",
            "How long boot migrations took, waiting for the database and the lock included.",
            multiprocess_mode="max",
        ),
        migration_lock_wait_seconds=Gauge(
            "kraken_boot_migration_lock_wait_seconds",
            "How long boot migrations waited for another runner's migration lock.",
            multiprocess_mode="max",
        ),
        revisions_applied=Gauge(
            "kraken_boot_revisions_applied", "Revisions boot migrations applied.", multiprocess_mode="max"
        ),
    )
    for kind in get_args(Fault):
        created.database_errors.labels(kind)  # present at 0 before the first fault, so rate() sees it start
    return created


# --- requests ----------------------------------------------------------------------------------


class RequestCounts:
    """Counts each request by route template, method and status, and its time (RequestContext,
    the outermost middleware, calls ``record`` once the response went out).

    The route is the template the router matched (``/conversations/{conversation_id}/turns``),
    read from the scope once the app is done with the request, never the raw path.
    """

    def __init__(self) -> None:
        # (route, method, status) -> its counter and histogram children: labels() takes a lock and
        # builds a key each time; a dict lookup does not. Bounded like the labels themselves.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        key = (route_template(scope), _METHODS.get(scope["method"], "other"), status)
        children = self._children.get(key)
        if children is None:
            found = series()
            children = self._children[key] = (
                found.requests.labels(key[0], key[1], str(status)),
                found.request_seconds.labels(key[0], key[1]),
            )
        children[0].inc()
        children[1].observe(seconds)


def route_template(scope: Scope) -> str:
    """The path template of the route that served the request, or UNMATCHED."""
    route = scope.get("route")
    if route is not None:
        return str(route.path)
    # Answered before routing (a declared body over KRAKEN_MAX_BODY_BYTES), or by no route at all:
    # match it here, on this rarer path, so a 413 on a real route is not counted as unmatched.
    for candidate in iter_route_contexts(scope["app"].routes):
        if candidate.matches(scope)[0] is not Match.NONE and candidate.path_format is not None:
            return candidate.path_format
    return UNMATCHED


# --- the service pool --------------------------------------------------------------------------


class PoolWatch:
    """The pool gauges of this process, summed over its service pools (one, but for tests).

    Updated when what a pool holds changes (its lender tells: a connection lent, given back, or
    closed), so that in multi-process mode every worker's share is current in its file, whichever
    worker is scraped. Read on the event loop's next turn, once however many changes it saw; a
    scrape reads them again, at once.
    """

    def __init__(self) -> None:
        self.lenders: weakref.WeakSet[PoolLender] = weakref.WeakSet()
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def watch(self, lender: PoolLender) -> None:
        self.lenders.add(lender)
        lender.on_change = self._changed
        self.refresh()

    def _changed(self) -> None:
        loop = asyncio.get_running_loop()
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self.refresh)

    def refresh(self) -> None:
        self._scheduled_on = None
        in_use = idle = overflow = 0
        for lender in list(self.lenders):
            lent, waiting, beyond = lender.counts()
            in_use += lent
            idle += waiting
            overflow += beyond
        found = series()
        found.pool_in_use.set(in_use)
        found.pool_idle.set(idle)
        found.pool_overflow.set(overflow)


_pools = PoolWatch()


def watch_pool(lender: PoolLender) -> None:
    """Keep the pool gauges current for ``lender``'s pool (the service's) for as long as it lives."""
    _pools.watch(lender)


# --- what the service writes --------------------------------------------------------------------


def record_database_error(kind: Fault) -> None:
    series().database_errors.labels(kind).inc()


def record_append(turn: TurnPublic) -> None:
    """A turn stored, with its tool calls (call it for new turns only, not for replays)."""
    found = series()
    found.turns.inc()
    if turn.tool_calls:
        found.tool_calls.inc(len(turn.tool_calls))
        truncated = sum(call.result_truncated for call in turn.tool_calls)
        if truncated:
            found.truncated_results.inc(truncated)


_recorded_revision: list[str] = []  # the revision label this process set to 1, to set it back to 0


def record_schema(status: SchemaStatus) -> None:
    revision = status.revision or "none"
    gauge = series().schema_revision
    for earlier in _recorded_revision:
        gauge.labels(earlier).set(0)
    _recorded_revision[:] = [revision]
    gauge.labels(revision).set(1)


def record_migration(run: MigrationRun) -> None:
    """The facts of the boot's migration run (the process that ran it writes them)."""
    found = series()
    record_schema(run.status)
    found.migration_seconds.set(run.seconds)
    found.migration_lock_wait_seconds.set(run.lock_wait_seconds)
    found.revisions_applied.set(run.applied)


# --- serving them ----------------------------------------------------------------------------------


def refresh_pools() -> None:
    """This process's pool gauges as they are now (a scrape calls it, on the event loop)."""
    _pools.refresh()


def exposition(accept: str) -> tuple[bytes, str]:
    """Every series in the format ``accept`` asks for (Prometheus text by default), and its content type.

    Reads files in multi-process mode: run it off the event loop.
    """
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector

    series()  # a worker that has served nothing yet still shows every series
    if os.environ.get(MULTIPROC_DIR):
        # A registry of its own: the default one holds this process's values only, and a
        # collector of the files must not be combined with them.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def mark_worker_dead(pid: int, directory: str | None = None) -> None:
    """For the supervisor, when worker ``pid`` has exited: drop its share of the live-summed gauges
    (the pool's). What it counted stays in the counters and histograms, as it should."""
    from prometheus_client import multiprocess

    directory = directory or os.environ.get(MULTIPROC_DIR)
    if directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
