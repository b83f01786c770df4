"""The fast MIME split gives exactly the standard parser's tree, or steps aside."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from prx_channel_email._mail import mime_body
from prx_channel_email._mail.headers import Headers, split_header_block
from tests.inbound_helpers import corpus_names, corpus_raw


def _tree(msg: Any) -> Any:
    if msg.is_multipart():
        return (msg.get_content_type(), msg.items(), [_tree(k) for k in msg.get_payload()])
    return (msg.get_content_type(), msg.items(), msg.get_payload())


def _top(raw: bytes) -> tuple[bytes, bytes]:
    block, body = split_header_block(raw)
    top = mime_body.mime_fields(Headers.from_block(block))
    return top, body


def _same_as_stdlib(top: bytes, body: bytes) -> bool:
    """True when the fast split took the message (and then matched the standard parser)."""
    try:
        fast = mime_body._split_tree(top, body)
    except mime_body._Unusual:
        return False
    reference = mime_body._PARSER.parsebytes(top + b"\r\n" + body)
    # Decoded straight from the bytes (before anything reads the parts as text)...
    decoded = [mime_body._payload(p) for p in fast.walk() if not p.is_multipart()]
    assert decoded == [mime_body._payload(p) for p in reference.walk() if not p.is_multipart()]
    # ... and read as text, the same tree.
    assert _tree(fast) == _tree(reference)
    return True


def test_corpus_splits_like_the_standard_parser() -> None:
    taken = [name for name in corpus_names() if _same_as_stdlib(*_top(corpus_raw(name)))]
    assert len(taken) >= len(corpus_names()) - 3  # message/rfc822 parts go to the stdlib


_LINES = [
    "text",
    "",
    " ",
    "--",
    "--b",
    "--b--",
    "--b  ",
    "--b-- x",
    "--bb",
    "--c",
    "--c--",
    "Content-Type: text/plain",
    "Content-Type: multipart/mixed; boundary=c",
    'Content-Type: multipart/alternative; boundary="b"',
    "Content-Type: message/rfc822",
    "Content-Transfer-Encoding: base64",
    "X: y",
    " folded",
    "From nobody",
    ":bad",
    "no colon here",
    "aGVsbG8=",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(_LINES), max_size=30),
    st.sampled_from(["\r\n", "\n"]),
    st.booleans(),
    st.sampled_from(
        [
            b"Content-Type: multipart/mixed; boundary=b\r\n",
            b'Content-Type: multipart/related; boundary="c"\r\n',
            b"Content-Type: text/plain\r\n",
            b"",
        ]
    ),
)
def test_random_bodies_split_like_the_standard_parser(
    lines: list[str], eol: str, trailing: bool, top: bytes
) -> None:
    body = (eol.join(lines) + (eol if trailing else "")).encode()
    _same_as_stdlib(top, body)


@st.composite
def _tree_bytes(draw: st.DrawFn, depth: int = 0) -> bytes:
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    if depth >= 3 or draw(st.booleans()):
        head = draw(st.sampled_from([b"Content-Type: text/plain", b"Content-Type: text/html", b""]))
        cte = draw(st.sampled_from([b"", b"base64", b"quoted-printable", b"8bit", b"x-uuencode"]))
        if head and cte:
            head += eol + b"Content-Transfer-Encoding: " + cte
        text = draw(
            st.sampled_from(
                [
                    b"",
                    b"hi",
                    b"hi" + eol,
                    b"a" + eol + eol + b"b",
                    eol,
                    b"aGk=",
                    b"a=3Db=",
                    b"\xe9t\xe9",
                ]
            )
        )
        return head + eol + eol + text if head else eol + text
    boundary = draw(st.sampled_from([b"b1", b"b2", b"x y"]))
    kids = [draw(_tree_bytes(depth + 1)) for _ in range(draw(st.integers(0, 3)))]
    out = b'Content-Type: multipart/mixed; boundary="' + boundary + b'"' + eol + eol
    out += draw(st.sampled_from([b"", b"preamble" + eol]))
    for kid in kids:
        out += b"--" + boundary + eol + kid + eol
    if draw(st.booleans()):
        out += b"--" + boundary + b"--" + eol + draw(st.sampled_from([b"", b"epilogue" + eol]))
    return out


@settings(max_examples=300, deadline=None)
@given(_tree_bytes())
def test_random_trees_split_like_the_standard_parser(part: bytes) -> None:
    head, _, body = (
        part.partition(b"\n\n") if b"\r\n\r\n" not in part else part.partition(b"\r\n\r\n")
    )
    _same_as_stdlib(head.replace(b"\r", b"") + b"\r\n" if head else b"", body)


_B64_PIECES = ["aGVs", "bG8=", "YQ==", "YWI=", "\r\n", "\n", " ", "!", "=", "QUJD", "\x80", "*"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_B64_PIECES), max_size=20))
def test_base64_payloads_decode_like_the_standard_library(pieces: list[str]) -> None:
    raw = "".join(pieces).encode("latin-1")
    part = mime_body._PARSER.parsebytes(b"Content-Transfer-Encoding: base64\r\n\r\n" + raw)
    assert mime_body._payload(part) == part.get_payload(decode=True)
