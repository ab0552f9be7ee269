"""Database plumbing any part of the service can use: URLs, engines, statements, errors, servers.

Imports neither FastAPI nor the settings class: its functions take what they need, so the
dependencies point one way (``api`` -> ``conversations`` -> ``db``; ``alembic/env.py`` ->
``migrations`` -> ``db``).
"""
