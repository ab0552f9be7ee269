"""How the migration package writes a moment in what it prints: UTC, to the second.

A leaf module (it imports nothing from ``backend``), so ``ops.py``, which revisions import, can
use it without pulling in the ledger, the database code or the application.
"""

from __future__ import annotations

from datetime import UTC, datetime


def when(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
