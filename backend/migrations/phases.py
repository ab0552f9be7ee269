"""A deploy's phases: which of a run's steps it applies, and what every migration session sets first.

``alembic upgrade`` (the deploy's step before the restart) and ``run_migrations()`` at boot run
the pre-deploy phase: pending revisions up to and including the last pre-deploy one (post-deploy
revisions of an earlier release before it run too). The trailing post-deploy revisions run only
once the new release serves, through ``alembic -x phase=post-deploy upgrade head``
(``POST_DEPLOY_COMMAND``): a replica migrating at boot never runs this release's post-deploy steps.

Downgrades and stamps are not phased: they go where they are told.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.util import CommandError

from backend.migrations.revisions import PHASES, POST_DEPLOY, PRE_DEPLOY, RevisionFile, pre_deploy_run

logger = logging.getLogger(__name__)

PHASE_ARGUMENT = "phase"  # -x phase=post-deploy
POST_DEPLOY_COMMAND = f"uv run alembic -x {PHASE_ARGUMENT}={POST_DEPLOY} upgrade head"

# Every migration session's time zone: a conversion between timestamp and timestamptz reads and
# writes wall-clock times in the session's zone, so under another one it shifts every stored
# instant by the offset (and rewrites the table, where under UTC PostgreSQL needs no rewrite).
SET_TIMEZONE = "SET timezone = 'UTC'"
# Revisions whose offline SQL was applied by hand as it stood (without SET_TIMEZONE) and must stay
# byte for byte what production ran; the offline SQL of any later one sets the zone first. None of
# these depends on the session's zone (DDL only; their data steps hold no timestamps).
HISTORIC_SQL = frozenset({"001", "002", "003", "004"})


def requested(x_arguments: Mapping[str, str], attributes: Mapping[str, Any]) -> str:
    """The run's phase: ``-x phase=...``, else ``config.attributes["phase"]`` (in-process), else
    pre-deploy; anything else is refused in one line."""
    value = x_arguments.get(PHASE_ARGUMENT, attributes.get(PHASE_ARGUMENT, PRE_DEPLOY))
    if value not in PHASES:
        raise CommandError(f"-x {PHASE_ARGUMENT}={value}: give one of {', '.join(PHASES)}")
    return str(value)


def _revision_of(info: MigrationInfo) -> str | None:
    """The revision an upgrade step applies (None for a downgrade or a stamp)."""
    return info.up_revision_id if info.is_upgrade and not info.is_stamp else None


def select(steps: Sequence[Any], phase: str, files: Mapping[str, RevisionFile]) -> list[Any]:
    """The steps of ``steps`` (Alembic's plan, in order) that ``phase`` applies.

    Pre-deploy: up to and including the last pre-deploy revision (``pre_deploy_run`` gives the
    rule and why); the post-deploy revisions before it run too, each said in one line, and the
    trailing ones wait for the post-deploy phase.
    """
    if phase == POST_DEPLOY:
        return list(steps)
    revisions = [_revision_of(step.info) for step in steps]
    # A step that applies no revision (not in an upgrade's plan) is kept where it is.
    cut = pre_deploy_run([_phase(files, rev) if rev else PRE_DEPLOY for rev in revisions])
    run = [rev for rev in revisions[:cut] if rev]
    earlier = [rev for rev in run if _phase(files, rev) == POST_DEPLOY]
    if earlier:
        last = next(rev for rev in reversed(run) if _phase(files, rev) == PRE_DEPLOY)
        for rev in earlier:
            logger.info(
                "running post-deploy revision %s of an earlier release before pre-deploy revision %s", rev, last
            )
    held = [rev for rev in revisions[cut:] if rev]
    if held:
        logger.info(
            "stopping before post-deploy revision(s) %s: run '%s' once this release serves",
            ", ".join(held),
            POST_DEPLOY_COMMAND,
        )
    return list(steps[:cut])


def _phase(files: Mapping[str, RevisionFile], revision: str) -> str:
    found = files.get(revision)
    return found.phase if found is not None else PRE_DEPLOY


def limit_to_phase(
    ctx: MigrationContext,
    phase: str,
    files: Mapping[str, RevisionFile],
    *,
    before_step: Callable[[MigrationInfo], None] | None = None,
) -> None:
    """Make ``ctx`` run only the steps of ``phase`` (and call ``before_step`` before each one).

    Alembic has no hook before a step, nor a way to filter its plan: the plan (the command's
    function that gives the steps, which the ledger's Recorder wraps too) is wrapped. The phase
    tests fail if this stops working.
    """
    plan = ctx._migrations_fn
    if plan is None:
        return

    def steps(heads: Any, context: MigrationContext) -> Iterator[Any]:
        for step in select(list(plan(heads, context)), phase, files):
            if before_step is not None:
                before_step(step.info)
            yield step

    ctx._migrations_fn = steps


def offline_timezone(ctx: MigrationContext) -> Callable[[MigrationInfo], None]:
    """For --sql: ``SET timezone`` once, before the first step of a revision after HISTORIC_SQL."""
    done = False

    def before_step(info: MigrationInfo) -> None:
        nonlocal done
        revisions = {*info.up_revision_ids, *info.down_revision_ids} - {None}
        if done or not revisions - HISTORIC_SQL or info.is_stamp:
            return
        done = True
        buffer = ctx.impl.output_buffer
        if buffer is not None:
            buffer.write(SET_TIMEZONE + ";\n\n")

    return before_step
