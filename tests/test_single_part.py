"""The direct read of a one-file multipart body (predictor.serving.single_part): the bodies real clients
send take it, and whatever it returns is what Starlette's parser finds in the same body."""

import asyncio
import socket
import subprocess
import threading

import aiohttp
import httpx
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import UploadFile
from starlette.requests import Request

from predictor.serving.single_part import single_file_part

IMAGE = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n\r\n"


def captured_by_curl() -> tuple[bytes, bytes]:
    """The content type and body of `curl -F file=@...` as the server receives them."""
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def serve():
        connection, _ = server.accept()
        with connection:
            while b"\r\n\r\n" not in received:
                received.extend(connection.recv(65536))
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += connection.recv(65536)
            received[:] = head + b"\r\n\r\n" + body
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve)
    thread.start()
    subprocess.run(["curl", "-s", "-H", "Expect:", "-F", "file=@-;filename=cat.jpg;type=image/jpeg",
                    f"http://127.0.0.1:{server.getsockname()[1]}/classify/image"], input=IMAGE, check=True, timeout=10)
    thread.join(10)
    server.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    content_type = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"content-type"))
    return content_type, body


def captured_by_aiohttp() -> tuple[bytes, bytes]:
    form = aiohttp.FormData()
    form.add_field("file", IMAGE, filename="cat.jpg", content_type="image/jpeg")
    payload = form()

    class Sink:
        def __init__(self):
            self.data = bytearray()

        async def write(self, chunk):
            self.data.extend(chunk)

    sink = Sink()
    asyncio.run(payload.write(sink))
    return payload.content_type.encode(), bytes(sink.data)


def captured_by_httpx() -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://x/classify/image", files={"file": ("cat.jpg", IMAGE, "image/jpeg")})
    return request.headers["content-type"].encode(), request.read()


def captured_by_requests() -> tuple[bytes, bytes]:
    prepared = requests.Request("POST", "http://x/classify/image", files={"file": ("cat.jpg", IMAGE, "image/jpeg")}).prepare()
    return prepared.headers["Content-Type"].encode(), prepared.body


@pytest.mark.parametrize("capture", [captured_by_curl, captured_by_aiohttp, captured_by_httpx, captured_by_requests])
def test_standard_clients_bodies_are_read_directly(capture):
    content_type, body = capture()
    assert single_file_part(content_type, body, "file") == IMAGE
    assert starlettes_file(content_type, body, "file") == IMAGE
    assert single_file_part(content_type, body, "files") is None  # another field: the parser's 422


def starlettes_file(content_type: bytes, body: bytes, field: str) -> bytes | str | None:
    """What Starlette's own parser finds in `body` under `field` (None: no such part; a str: a plain field;
    "<error>": it refuses the body; "<several>": more than one part)."""
    async def parse():
        sent = False

        async def receive():
            nonlocal sent
            message = {"type": "http.request", "body": b"" if sent else body, "more_body": False}
            sent = True
            return message

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", content_type)]}, receive)
        try:
            form = await request.form()
        except Exception:  # noqa: BLE001
            return "<error>"
        try:
            if len(form.multi_items()) != 1:
                return "<several>"
            value = form.get(field)
            return await value.read() if isinstance(value, UploadFile) else value
        finally:
            await form.close()

    return asyncio.run(parse())


_BOUNDARY_CHARS = "0123456789abcdefXYZ'()+_,-./:=?"


@st.composite
def multipart_bodies(draw):
    """Bodies around the common shape: the boundary, header spelling and spacing, the field, extra
    headers or parts, line ends, the epilogue and a content that may mimic a delimiter vary."""
    boundary = draw(st.text(_BOUNDARY_CHARS, min_size=1, max_size=20))
    quoted = draw(st.booleans())
    content_type = f'multipart/form-data; boundary={chr(34) + boundary + chr(34) if quoted else boundary}'
    if draw(st.integers(0, 3)) == 0:
        content_type = draw(st.sampled_from([content_type.upper(), content_type.replace("; ", ";"),
                                             content_type + "; charset=utf-8", "multipart/mixed; boundary=" + boundary]))
    name = draw(st.sampled_from(["file"] * 4 + ["files", "File", "", "fi\"le"]))
    disposition = draw(st.sampled_from([
        f'Content-Disposition: form-data; name="{name}"; filename="cat.jpg"',
        f'Content-Disposition: form-data; name="{name}"; filename="cat.jpg"',
        f'content-disposition:form-data;name="{name}";filename="cat.jpg"',
        f'content-disposition:form-data;name="{name}";filename="c\\"at.jpg"',
        f'Content-Disposition: form-data; name="{name}"',
        f'Content-Disposition: form-data; filename="cat.jpg"; name="{name}"',
        f'CONTENT-DISPOSITION: form-data; name="{name}"; filename=""',
        f'Content-Disposition: form-data; name={name}; filename=cat.jpg',
    ]))
    headers = [disposition] + draw(st.lists(st.sampled_from(
        ["Content-Type: image/jpeg"] * 3 + ["X-Extra: 1", 'Content-Disposition: form-data; name="other"; filename="x"',
                                             "broken header line", "X-Pad: " + "a" * 5000]), max_size=2))
    if draw(st.integers(0, 7)) == 0:
        headers += ["X-Many: 1"] * 8  # past the parser's count of headers per part
    headers = draw(st.permutations(headers))
    content = draw(st.one_of(st.binary(max_size=64), st.sampled_from(
        [b"", IMAGE, f"\r\n--{boundary}x".encode(), f"--{boundary}--".encode(), b"\r\n\r\n"])))
    newline = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    part = (f"--{boundary}{newline}" + newline.join(headers) + newline + newline).encode() + content
    extra = draw(st.sampled_from(["", "", "", f'{newline}--{boundary}{newline}Content-Disposition: form-data; name="x"{newline}{newline}v']))
    epilogue = draw(st.sampled_from(["--\r\n"] * 3 + ["--", "--\r\n\r\n", "--epilogue", "", "\r\n"]))
    body = part + (extra + f"{newline}--{boundary}{epilogue}").encode()
    return content_type.encode(), body, draw(st.sampled_from(["file", "files"]))


@settings(max_examples=400, deadline=None)
@given(multipart_bodies())
def test_a_direct_read_is_what_starlettes_parser_finds(case):
    content_type, body, field = case
    direct = single_file_part(content_type, body, field)
    if direct is not None:
        assert starlettes_file(content_type, body, field) == direct
