"""The one-file multipart body that every client sends to /classify/image, read without a parser.

`curl -F file=@cat.jpg`, httpx, requests, aiohttp and browsers all send the same shape: one
`form-data` part with a name and a filename, then the closing delimiter. Starlette's multipart parser
(python-multipart's per-byte state machine with a callback per event, a spooled temporary file) cost
about as much as the JPEG decode on this route; this finds the same bytes with two `bytes.find`s.
Anything else - another shape, several parts, odd quoting, bare LF line ends - is left to that parser
(None here), so the rules and the errors stay Starlette's.
"""

import re

# RFC 2046 boundary characters, unquoted or in simple quotes (no escapes): what clients generate.
_MULTIPART_TYPE = re.compile(
    rb"""multipart/form-data;[ \t]*boundary=(?:([0-9A-Za-z'()+_,\-./:=?]{1,70})|"([0-9A-Za-z'()+_,\-./:=? ]{1,70})")[ \t]*""",
    re.IGNORECASE)
_DISPOSITION = re.compile(rb"""content-disposition:[ \t]*form-data;[ \t]*name="([^"\\\r\n]*)";[ \t]*filename="[^"\\\r\n]*"[ \t]*""",
                          re.IGNORECASE)
_HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*")
# Well inside python-multipart's limits on a part's headers (8 lines of at most 4,224 bytes), which the
# parser enforces with its own 400: a part beyond these is left to it.
_MAX_HEADER_LINES = 4
_MAX_HEADERS_BYTES = 1024


def single_file_part(content_type: bytes | None, body: bytes, field: str) -> bytes | None:
    """The file in `body` when it is exactly one multipart/form-data file part named `field` (the
    bytes Starlette's parser would give that part), or None for any other body."""
    shape = _MULTIPART_TYPE.fullmatch(content_type or b"")
    if shape is None:
        return None
    delimiter = b"--" + (shape.group(1) or shape.group(2))
    if not body.startswith(delimiter + b"\r\n"):
        return None
    headers_end = body.find(b"\r\n\r\n", len(delimiter), len(delimiter) + 2 + _MAX_HEADERS_BYTES + 2)
    if headers_end < 0:
        return None
    content_end = body.find(b"\r\n" + delimiter, headers_end + 4)
    if content_end < 0 or body[content_end + 2 + len(delimiter):] not in (b"--", b"--\r\n"):
        return None  # another part follows, or the body does not end at the closing delimiter
    named = None
    lines = body[len(delimiter) + 2:headers_end].split(b"\r\n")
    if len(lines) > _MAX_HEADER_LINES:
        return None
    for line in lines:
        disposition = _DISPOSITION.fullmatch(line)
        if disposition is not None:
            if named is not None:
                return None
            named = disposition.group(1)
        elif _HEADER.fullmatch(line) is None or line[:20].lower().startswith(b"content-disposition"):
            return None
    if named != field.encode():
        return None
    return body[headers_end + 4:content_end]
