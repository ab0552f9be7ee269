"""The conversations domain: schemas (what clients send and get) and service (the SQL)."""
