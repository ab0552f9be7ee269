"""A primary and a hot standby with synchronous streaming replication, and failover helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from backend.tests.rigs.cluster import PLAIN_HBA, Cluster, RigError, StopMode, format_url, rig_dir, wait_until

PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "wal_keep_size": "64MB",
    "hot_standby": "on",
}


@dataclass
class ReplicationPair:
    """``primary`` streams to ``standby``, which is its one synchronous standby."""

    primary: Cluster
    standby: Cluster
    application_name: str

    def wait_streaming(self, timeout: float = 30) -> None:
        """Wait until the primary sees the standby streaming with ``sync_state = 'sync'``."""

        def synchronous() -> bool:
            state = self.primary.fetchval_sync(
                "SELECT state || '/' || sync_state FROM pg_stat_replication WHERE application_name = $1",
                self.application_name,
            )
            return bool(state == "streaming/sync")

        wait_until(synchronous, timeout, f"{self.application_name} to stream synchronously from {self.primary}")

    def wait_replayed(self, timeout: float = 30) -> None:
        """Wait until the standby has replayed all WAL the primary has written so far.

        ``synchronous_commit = on`` waits for the standby's flush, not its replay: a committed row
        can be invisible there for a moment.
        """
        lsn = self.primary.fetchval_sync("SELECT pg_current_wal_lsn()::text")
        wait_until(
            lambda: bool(self.standby.fetchval_sync("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn)),
            timeout,
            f"{self.standby} to replay up to {lsn}",
        )

    def stop_primary(self, mode: StopMode = "immediate") -> None:
        """Stop the primary; ``immediate`` is a crash, as a failover would see it."""
        self.primary.stop(mode)

    def promote_standby(self, timeout: float = 30) -> Cluster:
        """Promote the standby, wait until it takes writes; it is returned."""
        self.standby.promote(timeout)
        # It must not wait for a standby of its own, or every commit on it would hang.
        names = self.standby.fetchval_sync("SHOW synchronous_standby_names")
        if names:
            raise RigError(f"promoted {self.standby} has synchronous_standby_names = {names!r}")
        return self.standby

    def failover(self, timeout: float = 30) -> Cluster:
        """Crash the primary and promote the standby; the new primary is returned."""
        self.stop_primary("immediate")
        return self.promote_standby(timeout)

    def multi_host_url(
        self,
        target_session_attrs: str = "read-write",
        *,
        user: str = "postgres",
        database: str = "postgres",
        standby_first: bool = True,
        **query: str | Path,
    ) -> str:
        """libpq multi-host URL listing both servers (standby first by default)."""
        servers = [self.standby, self.primary] if standby_first else [self.primary, self.standby]
        return format_url(
            [("127.0.0.1", s.port) for s in servers],
            user=user,
            database=database,
            query={"target_session_attrs": target_session_attrs, **query},
        )


@contextmanager
def replication_pair(
    *,
    application_name: str = "standby1",
    synchronous_commit: str = "on",
    directory: Path | None = None,
    timeout: float = 30,
) -> Iterator[ReplicationPair]:
    """A started primary and a hot standby made by ``pg_basebackup -R``, replicating synchronously;
    both stopped (temporary directory removed) on exit."""
    with rig_dir("kraken-repl-") if directory is None else nullcontext(directory) as base:
        primary = Cluster(base / "primary")
        standby = Cluster(base / "standby")
        try:
            primary.init({**PRIMARY_SETTINGS, "synchronous_commit": synchronous_commit}, PLAIN_HBA)
            primary.start(timeout)
            conninfo = f"host=127.0.0.1 port={primary.port} user=postgres application_name={application_name}"
            primary.run(
                "pg_basebackup", "-D", str(standby.datadir), "-d", conninfo, "-R", "-X", "stream", "-c", "fast", "-N"
            )
            auto_conf = standby.datadir / "postgresql.auto.conf"
            if f"application_name={application_name}" not in auto_conf.read_text():
                with auto_conf.open("a") as f:
                    f.write(f"primary_conninfo = '{conninfo}'\n")
            # The backup copied the primary's log and its port and socket settings; the standby gets
            # its own, and no synchronous standby of its own (it may be promoted).
            standby.log_path.unlink(missing_ok=True)
            standby.configure({"hot_standby": "on", "synchronous_standby_names": ""})
            standby.start(timeout)
            # Only now: commits made before the standby attached would have waited for it.
            primary.execute_sync(f"ALTER SYSTEM SET synchronous_standby_names = '\"{application_name}\"'")
            primary.execute_sync("SELECT pg_reload_conf()")
            pair = ReplicationPair(primary=primary, standby=standby, application_name=application_name)
            pair.wait_streaming(timeout)
            yield pair
        finally:
            standby.ensure_stopped()
            primary.ensure_stopped()
