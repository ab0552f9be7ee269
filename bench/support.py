"""What the benchmarks share: the server they make scratch databases on, and the workload's bodies.

Imported as ``support`` by the scripts next to it (``uv run python bench/<script>.py`` puts this
directory first on sys.path).
"""

from __future__ import annotations

import uuid

from backend.config import load_settings
from backend.conversations.schemas import ConversationCreate
from backend.db.embedded import embedded_server
from backend.db.url import DatabaseTarget


async def bench_server() -> DatabaseTarget:
    """DATABASE_URL's server, or the embedded one when it is unset: where scratch databases go."""
    settings = load_settings()
    return settings.database_target() or await embedded_server(settings.embedded_pgdata)


def conversation() -> ConversationCreate:
    return ConversationCreate(
        session_id="bench-" + uuid.uuid4().hex[:8], model="claude-bench", system_prompt_hash="0" * 16, agent_version="1"
    )


def turn_payload(tool_calls: int) -> dict[str, object]:
    """A turn like the chatbot's: a question, a few paragraphs, tool calls with ~400-byte results."""
    rows = [
        {"id": i, "name": f"Station {i}", "temp_c": 20.5 + i, "wind_kmh": 12, "sky": "partly cloudy"} for i in range(5)
    ]
    return {
        "user_query": "What is the weather like in Paris this afternoon, and should I take an umbrella? " * 2,
        "assistant_response": "It is partly cloudy in Paris with temperatures around 21 degrees. " * 8,
        "model": "claude-bench",
        "input_tokens": 1500,
        "output_tokens": 300,
        "cache_creation_tokens": 0,
        "cache_read_tokens": 1200,
        "cost_usd": 0.0123,
        "duration_ms": 2400,
        "tool_calls": [
            {
                "tool_name": f"weather_{j}",
                "tool_args": {"city": "Paris", "when": "15:00", "units": "metric"},
                "tool_result": {"stations": rows},
            }
            for j in range(tool_calls)
        ],
    }
