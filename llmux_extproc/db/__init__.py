"""PostgreSQL: LiteLLM's schema (a subset), its migrations, the key store, the management API."""
