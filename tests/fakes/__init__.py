"""Test doubles for the inbound-transport tests (pipeline stand-in, scripted IMAP server)."""
