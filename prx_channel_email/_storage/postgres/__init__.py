"""The PostgreSQL backend: shared state for replicas (state_url = "postgresql://...")."""
