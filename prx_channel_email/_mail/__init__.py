"""Pure RFC 5322 / MIME: bytes in, values out. No I/O, nothing else of ours."""
