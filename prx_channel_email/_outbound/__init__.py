"""Sending: reply -> compose -> outbox -> SMTP."""
