"""The built-in demo mail server (prx-email demo)."""
