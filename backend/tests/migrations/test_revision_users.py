"""The users revision (issue 20): kraken_users, and kraken_conversations.user_id referring to it,
indexed; the conversations already there keep NULL (the operator's key's). Its downgrade refuses
to drop users, or the user_id of conversations, without -x allow_data_loss=true."""

from backend.db.url import DatabaseTarget
from backend.tests.helpers import constraints, indexes, out, run_alembic, sql

REVISION = "008"
BEFORE = "007"

CONVERSATION = (
    "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
    " VALUES ('s', 'm', 'h', 'v') RETURNING id"
)


def migrate(db: DatabaseTarget, *args: str) -> None:
    # Through the post-deploy phase: BEFORE (007, the timestamptz swap) is a post-deploy revision.
    result = run_alembic("-x", "phase=post-deploy", *args, target=db)
    assert result.returncode == 0, out(result)


def has_users(db: DatabaseTarget) -> bool:
    found = sql(db, "SELECT to_regclass('kraken_users') IS NOT NULL")[0][0]
    column = sql(
        db,
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = 'kraken_conversations' AND column_name = 'user_id'",
    )[0][0]
    assert found == bool(column)
    return bool(found)


def test_existing_conversations_keep_no_user_and_new_ones_can_have_one(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", BEFORE)
    [(old,)] = sql(empty_db, CONVERSATION)

    migrate(empty_db, "upgrade", REVISION)

    assert sql(empty_db, "SELECT user_id FROM kraken_conversations WHERE id = $1", old) == [(None,)]
    found = constraints(empty_db)
    assert found[("kraken_conversations", "kraken_conversations_user_id_fkey")] == (
        "FOREIGN KEY (user_id) REFERENCES kraken_users(id)",
        True,
    )
    assert found[("kraken_users", "kraken_users_api_key_hash_key")] == ("UNIQUE (api_key_hash)", True)
    assert indexes(empty_db)["ix_kraken_conversations_user_id"] == ("(user_id)", True)
    [(user,)] = sql(empty_db, "INSERT INTO kraken_users (api_key_hash, name) VALUES ('\\x01', 'ada') RETURNING id")
    [(active, last_active)] = sql(empty_db, "SELECT is_active, last_active FROM kraken_users WHERE id = $1", user)
    assert (active, last_active) == (True, None)
    sql(empty_db, "UPDATE kraken_conversations SET user_id = $1 WHERE id = $2", user, old)


def test_the_downgrade_refuses_to_lose_users_without_the_flag(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", REVISION)
    [(user,)] = sql(empty_db, "INSERT INTO kraken_users (api_key_hash, name) VALUES ('\\x01', 'ada') RETURNING id")
    sql(empty_db, CONVERSATION.replace("agent_version)", "agent_version, user_id)").replace("'v')", "'v', $1)"), user)

    refused = run_alembic("-x", "phase=post-deploy", "downgrade", BEFORE, target=empty_db)

    assert refused.returncode != 0
    [failed] = [line for line in out(refused).splitlines() if line.startswith("FAILED")]
    assert "kraken_users (1 row(s))" in failed, failed
    assert "allow_data_loss=true" in failed, failed
    assert has_users(empty_db)
    assert sql(empty_db, "SELECT user_id FROM kraken_conversations") == [(user,)]

    migrate(empty_db, "-x", "allow_data_loss=true", "downgrade", BEFORE)
    assert not has_users(empty_db)
    assert sql(empty_db, "SELECT count(*) FROM kraken_conversations") == [(1,)]


def test_with_nothing_to_lose_the_downgrade_needs_no_flag_and_upgrades_again(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", REVISION)
    sql(empty_db, CONVERSATION)
    migrate(empty_db, "downgrade", BEFORE)
    assert not has_users(empty_db)
    migrate(empty_db, "upgrade", REVISION)
    assert has_users(empty_db)
