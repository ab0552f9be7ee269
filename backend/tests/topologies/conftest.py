"""Fixtures that start real PostgreSQL topologies (TLS-only server, synchronous replication pair,
PgBouncer) from the rigs in ``backend.tests.rigs``; all stopped and deleted at teardown."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from backend.tests.rigs.cluster import Cluster, postgres_bindir, postgres_has_ssl, postgres_version, running_cluster
from backend.tests.rigs.pgbouncer import PgBouncer, pgbouncer, pgbouncer_bin, pgbouncer_version
from backend.tests.rigs.replication import ReplicationPair, replication_pair
from backend.tests.rigs.tls import TlsServer, tls_cluster

# The rig each test module proves the service on, for the one line per rig the run ends with.
RIGS = {
    "test_tls.py": "TLS-only server",
    "test_failover.py": "primary + standby",
    "test_backfill_replay_lag.py": "primary + standby",
    "test_pgbouncer.py": "PgBouncer",
}
_outcomes: dict[str, Counter[str]] = {}
_skips: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    rig = RIGS.get(report.nodeid.split("::")[0].rsplit("/", 1)[-1])
    if rig is None or not (report.when == "call" or report.outcome != "passed"):
        return
    _outcomes.setdefault(rig, Counter())[report.outcome] += 1
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips[rig] = str(report.longrepr[2])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for rig, counts in _outcomes.items():
        outcome = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        reason = f" ({_skips[rig]})" if rig in _skips else ""
        terminalreporter.write_line(f"rig {rig}: {outcome}{reason}")


# The session-scoped rigs, by the fixture that starts each: the tests using one share an xdist
# group (addopts' --dist loadgroup), so one worker starts it, once, rather than each worker.
SHARED_RIGS = {"tls_server": "tls", "pg_cluster": "pg_cluster", "bouncer": "pg_cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        groups = {SHARED_RIGS[f] for f in getattr(item, "fixturenames", ()) if f in SHARED_RIGS}
        if groups:
            assert len(groups) == 1, f"{item.nodeid} uses two shared rigs: give them one group"
            item.add_marker(pytest.mark.xdist_group(groups.pop()))


def pytest_report_header() -> list[str]:
    bouncer = pgbouncer_bin()
    bouncer_text = ".".join(map(str, pgbouncer_version(bouncer))) if bouncer else "not installed"
    ssl = "with SSL" if postgres_has_ssl() else "without SSL"
    return [f"rigs: PostgreSQL {postgres_version()} ({ssl}) from {postgres_bindir()}; pgbouncer {bouncer_text}"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A plain server: trust over the Unix socket and 127.0.0.1, no TLS."""
    with running_cluster("plain") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tls_server() -> Iterator[TlsServer]:
    """A server that takes TCP clients over TLS only, with generated certificates."""
    if not postgres_has_ssl():
        pytest.skip(f"the PostgreSQL server in {postgres_bindir()} was built without SSL support")
    with tls_cluster() as server:
        yield server


@pytest.fixture(scope="session")
def bouncer(pg_cluster: Cluster) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of ``pg_cluster``."""
    if pgbouncer_bin() is None:
        pytest.skip("pgbouncer is not installed (Debian/Ubuntu: apt-get install -y pgbouncer)")
    with pgbouncer(pg_cluster) as running:
        yield running


@pytest.fixture
def replication() -> Iterator[ReplicationPair]:
    """A fresh primary + synchronous hot standby for each test (tests crash and promote them)."""
    with replication_pair() as pair:
        yield pair
