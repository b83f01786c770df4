"""OAuth 2.0 tokens and the sign-in flows."""
