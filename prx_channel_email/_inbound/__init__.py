"""Receiving: IMAP bytes -> parse/normalize -> policy -> hand-off."""
