"""The wire: IMAP, SMTP and TLS."""
