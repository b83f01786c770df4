"""The hand-off ledger both flows share: what was handed on, and acked."""
