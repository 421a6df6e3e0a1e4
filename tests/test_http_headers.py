"""harvest's parse of response headers gives what http.client's own (the email package's
feed parser) gives, for plain headers and for every odd form a server may send."""

from __future__ import annotations

import email.parser
import http.client
import io

import pytest

from harvest.core.download.headers import parse_headers

NGINX = (b"Server: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 05:30:00 GMT\r\n"
         b"Content-Type: image/jpeg\r\nContent-Length: 2931\r\nConnection: keep-alive\r\n"
         b"ETag: \"6565-b73\"\r\nAccept-Ranges: bytes\r\n\r\n")

BLOCKS = [
    NGINX,
    NGINX.replace(b"\r\n", b"\n"),
    b"\r\n",
    b"",
    b"Content-Type: image/jpeg\r\n",  # the connection closed before the blank line
    b"X-Empty:\r\nX-Spaces:    \t padded \t \r\nX-Colons: a:b:c\r\n\r\n",
    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nset-cookie: c=3\r\n\r\n",
    b"X-Folded: one\r\n  two\r\n\tthree\r\nX-After: 1\r\n\r\n",
    b"  leading continuation\r\nX-A: 1\r\n\r\n",
    b"From someone@example.com\r\nX-A: 1\r\n\r\n",
    b"X-A: 1\r\nFrom someone\r\nX-B: 2\r\n\r\n",
    b": no name\r\nX-A: 1\r\n\r\n",
    b"Bad Header: space in name\r\nX-A: 1\r\n\r\n",
    b"no colon at all\r\nX-A: 1\r\n\r\n",
    b"X-A: 1\rX-B: 2\r\n\r\n",  # a bare CR splits lines for the email parser
    b"X-A: caf\xe9 \xff\r\n\r\n",
    b"X-A: 1\r\n\r\r\n",
    b"Content-Type: multipart/mixed; boundary=xyz\r\n\r\n",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type:  MULTIPART/related\r\n\r\n",
    b"X-A: 1\r\nX-Nul: a\x00b\r\n\r\n",
    b"X-Tab:\tvalue\r\nX-Trail: value  \r\n\r\n",
]


def shape(message):
    payload = message.get_payload()
    if isinstance(payload, list):  # a message/* or multipart body: its parts, alike
        payload = [shape(part) for part in payload]
    return (type(message), message.items(), [repr(d) for d in message.defects], payload,
            message.get_unixfrom(), message.is_multipart(), message.get_content_type())


@pytest.mark.parametrize("block", BLOCKS)
def test_same_message_as_http_client(block):
    stream = block + b"body bytes"
    ours, rest = io.BytesIO(stream), io.BytesIO(stream)
    message = parse_headers(ours)
    # http.client's own parse_headers, as written in Python 3.11's http/client.py:
    original = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(
        b"".join(http.client._read_headers(rest)).decode("iso-8859-1"))
    assert shape(message) == shape(original)
    assert ours.read() == rest.read()  # the body is left where it was


def test_the_bounds_stay_http_clients():
    with pytest.raises(http.client.LineTooLong):
        parse_headers(io.BytesIO(b"X-A: " + b"a" * 70_000 + b"\r\n\r\n"))
    with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
        parse_headers(io.BytesIO(b"X-A: 1\r\n" * 101 + b"\r\n"))


def test_plain_headers_skip_the_email_parser(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the email parser ran")

    monkeypatch.setattr(email.parser.Parser, "parsestr", refuse)
    message = parse_headers(io.BytesIO(NGINX))
    assert message["content-length"] == "2931" and message.get_content_type() == "image/jpeg"


def test_harvest_downloads_use_it():
    import harvest.core.download.netguard  # noqa: F401  (installs it)

    assert http.client.parse_headers is parse_headers
