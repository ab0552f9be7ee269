"""Baseline schema: conversations, turns and tool calls.

Revision ID: 001
Revises:
Create Date: 2025-01-01

Idempotent, because production databases predate migrations. On a live connection it
introspects each table and either creates it, adopts it as it is, or brings it to the baseline
by adding what is missing (columns with their defaults, keys, indexes). Anything it cannot fix
without risking rows (a column of another type, NULLs in a NOT NULL column, orphaned rows, ...)
stops the upgrade with one message listing every difference, before any statement runs.

In offline (--sql) mode there is nothing to introspect: it emits CREATE ... IF NOT EXISTS only.

This revision is static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from alembic import context, op
from alembic.util import CommandError

from backend.migrations.ops import refuse_data_loss

revision: str = "001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


@dataclass(frozen=True)
class Col:
    name: str
    type: str  # as PostgreSQL's format_type() spells it
    default: str | None = None  # SQL expression
    nullable: bool = False

    def ddl(self) -> str:
        parts = [f'"{self.name}"', self.type]
        if self.default is not None:
            parts.append(f"DEFAULT {self.default}")
        if not self.nullable:
            parts.append("NOT NULL")
        return " ".join(parts)


@dataclass(frozen=True)
class Fk:
    column: str
    table: str

    def name(self, table: str) -> str:
        return f"{table}_{self.column}_fkey"


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Col, ...]
    fk: Fk | None
    index_column: str

    @property
    def index_name(self) -> str:
        return f"ix_{self.name}_{self.index_column}"

    def create_sql(self) -> str:
        lines = [c.ddl() for c in self.columns]
        lines.append(f'CONSTRAINT "{self.name}_pkey" PRIMARY KEY (id)')
        if self.fk:
            lines.append(
                f'CONSTRAINT "{self.fk.name(self.name)}" FOREIGN KEY ("{self.fk.column}") '
                f'REFERENCES "{self.fk.table}" (id)'
            )
        body = ",\n    ".join(lines)
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" (\n    {body}\n)'

    def index_sql(self) -> str:
        return f'CREATE INDEX IF NOT EXISTS "{self.index_name}" ON "{self.name}" ("{self.index_column}")'


def _id() -> Col:
    return Col("id", "uuid", "gen_random_uuid()")


def _zero(name: str, type_: str = "integer") -> Col:
    return Col(name, type_, "0")


VARCHAR = "character varying"
MONEY = "numeric(10,6)"
TIMESTAMP = "timestamp without time zone"

TABLES = (
    Table(
        "kraken_conversations",
        (
            _id(),
            Col("session_id", VARCHAR),
            Col("model", VARCHAR),
            Col("system_prompt_hash", f"{VARCHAR}(16)"),
            Col("agent_version", VARCHAR),
            Col("status", VARCHAR, "'active'"),
            Col("started_at", TIMESTAMP, "now()"),
            Col("ended_at", TIMESTAMP, nullable=True),
            _zero("total_turns"),
            _zero("total_tokens"),
            _zero("total_cost_usd", MONEY),
        ),
        None,
        "session_id",
    ),
    Table(
        "kraken_turns",
        (
            _id(),
            Col("conversation_id", "uuid"),
            Col("turn_number", "integer"),
            Col("user_query", "text"),
            Col("assistant_response", "text"),
            _zero("input_tokens"),
            _zero("output_tokens"),
            _zero("cost_usd", MONEY),
            _zero("duration_ms"),
            _zero("tool_calls_count"),
            _zero("cache_creation_tokens"),
            _zero("cache_read_tokens"),
            Col("model", VARCHAR),
            Col("created_at", TIMESTAMP, "now()"),
        ),
        Fk("conversation_id", "kraken_conversations"),
        "conversation_id",
    ),
    Table(
        "kraken_tool_calls",
        (
            _id(),
            Col("turn_id", "uuid"),
            Col("tool_name", VARCHAR),
            Col("tool_args", "jsonb"),
            Col("tool_result", "jsonb"),
            Col("result_truncated", "boolean", "false"),
            Col("sequence_order", "integer"),
        ),
        Fk("turn_id", "kraken_turns"),
        "turn_id",
    ),
)


class BaselineMismatch(CommandError):
    """Existing tables that cannot be brought to the baseline without risking data.

    A CommandError, so the alembic CLI reports it as one line instead of a traceback.
    """


@dataclass(frozen=True)
class Existing:
    columns: dict[str, tuple[str, bool, str | None]]  # name -> (type, nullable, default)
    has_pk: bool
    fks: set[str]  # names of columns that carry a foreign key
    rows: int


def upgrade() -> None:
    if context.is_offline_mode():
        for table in TABLES:
            op.execute(table.create_sql())
            op.execute(table.index_sql())
        return

    conn = op.get_bind()
    statements: list[str] = []
    problems: list[str] = []
    for table in TABLES:
        existing = _introspect(conn, table.name)
        if existing is None:
            statements.append(table.create_sql())
        else:
            _plan_adoption(conn, table, existing, statements, problems)
        statements.append(table.index_sql())
    if problems:
        raise BaselineMismatch(
            "existing tables differ from the baseline and were left unchanged: " + "; ".join(problems)
        )
    for statement in statements:
        op.execute(statement)


def _introspect(conn: sa.Connection, table: str) -> Existing | None:
    oid = conn.execute(sa.text("SELECT to_regclass(:t)::oid"), {"t": f"public.{table}"}).scalar()
    if oid is None:
        return None
    columns = {
        name: (type_, not notnull, default)
        for name, type_, notnull, default in conn.execute(
            sa.text(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
                " pg_get_expr(d.adbin, d.adrelid)"
                " FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
                " WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            {"oid": oid},
        )
    }
    constraints = conn.execute(
        sa.text(
            "SELECT c.contype::text, a.attname FROM pg_constraint c"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
            " WHERE c.conrelid = :oid AND c.contype IN ('p', 'f')"
        ),
        {"oid": oid},
    ).all()
    rows = conn.execute(sa.text(f'SELECT count(*) FROM "{table}"')).scalar_one()
    return Existing(
        columns=columns,
        has_pk=any(kind == "p" for kind, _ in constraints),
        fks={column for kind, column in constraints if kind == "f"},
        rows=rows,
    )


def _widening(have: str, want: str) -> bool:
    """varchar(n) -> varchar (or a longer varchar) changes only the catalogue, never a row."""
    if not have.startswith(f"{VARCHAR}(") or not want.startswith(VARCHAR):
        return False
    if want == VARCHAR:
        return True
    return int(have[len(VARCHAR) + 1 : -1]) <= int(want[len(VARCHAR) + 1 : -1])


def _count(conn: sa.Connection, sql: str) -> int:
    return int(conn.execute(sa.text(sql)).scalar_one())


def _plan_adoption(
    conn: sa.Connection, table: Table, existing: Existing, statements: list[str], problems: list[str]
) -> None:
    name = table.name
    alter = f'ALTER TABLE "{name}"'
    for col in table.columns:
        found = existing.columns.get(col.name)
        if found is None:
            if not col.nullable and col.default is None and existing.rows:
                problems.append(
                    f"{name}.{col.name} is missing, has no default and {existing.rows} existing row(s) "
                    "would have no value for it"
                )
            else:
                statements.append(f"{alter} ADD COLUMN {col.ddl()}")
            continue
        have_type, have_nullable, have_default = found
        if have_type != col.type:
            if _widening(have_type, col.type):
                statements.append(f'{alter} ALTER COLUMN "{col.name}" TYPE {col.type}')
            else:
                problems.append(f"{name}.{col.name} is {have_type}, the baseline has {col.type}")
                continue
        if col.default is not None and have_default is None:
            statements.append(f'{alter} ALTER COLUMN "{col.name}" SET DEFAULT {col.default}')
        if have_nullable and not col.nullable:
            nulls = _count(conn, f'SELECT count(*) FROM "{name}" WHERE "{col.name}" IS NULL')
            if nulls:
                problems.append(f"{name}.{col.name} is NOT NULL in the baseline but {nulls} row(s) hold NULL")
            else:
                statements.append(f'{alter} ALTER COLUMN "{col.name}" SET NOT NULL')
        elif col.nullable and not have_nullable:
            statements.append(f'{alter} ALTER COLUMN "{col.name}" DROP NOT NULL')

    wanted = {col.name for col in table.columns}
    for extra, (_, extra_nullable, extra_default) in sorted(existing.columns.items()):
        if extra not in wanted and not extra_nullable and extra_default is None:
            problems.append(
                f"{name}.{extra} is not in the baseline and is NOT NULL without a default, "
                "so the service could not insert rows"
            )

    if not existing.has_pk:
        # An id column added just above is filled by gen_random_uuid(): no duplicates there.
        duplicates = (
            0
            if "id" not in existing.columns
            else _count(conn, f'SELECT count(*) FROM (SELECT id FROM "{name}" GROUP BY id HAVING count(*) > 1) d')
        )
        if duplicates:
            problems.append(f"{name}.id has {duplicates} duplicated value(s), so it cannot be the primary key")
        else:
            statements.append(f'{alter} ADD CONSTRAINT "{name}_pkey" PRIMARY KEY (id)')

    fk = table.fk
    if fk and fk.column not in existing.fks and fk.column in existing.columns:
        orphan_filter = f'"{fk.column}" IS NOT NULL'
        if _column_exists(conn, fk.table, "id"):
            orphan_filter += f' AND NOT EXISTS (SELECT 1 FROM "{fk.table}" p WHERE p.id = t."{fk.column}")'
        # A parent table (or id column) that does not exist yet starts empty: every reference is an orphan.
        orphans = _count(conn, f'SELECT count(*) FROM "{name}" t WHERE {orphan_filter}')
        if orphans:
            problems.append(f"{name} has {orphans} row(s) whose {fk.column} matches no row of {fk.table}")
        else:
            statements.append(
                f'{alter} ADD CONSTRAINT "{fk.name(name)}" FOREIGN KEY ("{fk.column}") REFERENCES "{fk.table}" (id)'
            )


def _column_exists(conn: sa.Connection, table: str, column: str) -> bool:
    return bool(
        conn.execute(
            sa.text(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(:t) AND attname = :c AND NOT attisdropped"
            ),
            {"t": f"public.{table}", "c": column},
        ).first()
    )


def downgrade() -> None:
    # Dropping the tables loses every conversation: refused while they hold rows, unless the
    # operator passes -x allow_data_loss=true.
    refuse_data_loss(revision, [table.name for table in reversed(TABLES)])
    for table in reversed(TABLES):
        op.execute(f'DROP TABLE IF EXISTS "{table.name}"')
