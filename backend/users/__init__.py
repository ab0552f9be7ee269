"""Users and their API keys (issue 20), as the operator manages them (who a request comes from: conversations.keys)."""
