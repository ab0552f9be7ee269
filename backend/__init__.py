"""KRAKEN chatbot backend: conversation records in PostgreSQL behind a FastAPI service."""
