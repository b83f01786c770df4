"""Child process: the text of a PDF on stdin, to stdout (see extract.py).

``python -I pdf_text.py MAX_CHARS MAX_PAGES`` (imports nothing of ours). Limits its own
address space first; exit 3 when pypdf is not installed, 1 when the PDF is unreadable.
"""

from __future__ import annotations

import contextlib
import io
import sys

MEMORY_LIMIT = 1024 * 1024 * 1024


def _limit_memory() -> None:
    try:
        import resource
    except ImportError:  # not on POSIX: the parent's deadline still applies
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def main(argv: list[str]) -> int:
    max_chars, max_pages = int(argv[0]), int(argv[1])
    _limit_memory()
    try:
        from pypdf import PdfReader
    except ImportError:
        return 3
    data = sys.stdin.buffer.read()
    try:
        reader = PdfReader(io.BytesIO(data))
        parts: list[str] = []
        size = 0
        for number, page in enumerate(reader.pages):
            if number >= max_pages or size >= max_chars:
                break
            text = page.extract_text() or ""
            parts.append(text)
            size += len(text)
    except Exception as exc:  # anything pypdf raises on a broken or hostile file
        print(f"{type(exc).__name__}: {exc}"[:300], file=sys.stderr)
        return 1
    sys.stdout.buffer.write("\n\n".join(parts)[:max_chars].encode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
