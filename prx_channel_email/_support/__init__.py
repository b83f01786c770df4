"""Small helpers every layer may use: backoff and structured logs."""
