"""The ClientHello parser, on real ClientHellos (Python's ssl and openssl s_client) cut and
re-fragmented every way: the server name comes out as soon as the hello is whole."""

import socket
import ssl
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gconn.protocols import sni


def captured_hello(connect_client):
    """The bytes a real TLS client sends first, caught by a plain listener that never answers
    (they are read until the parser says the hello is whole)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = threading.Thread(target=connect_client, args=(port,), daemon=True)
        client.start()
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(10)
            data = b""
            while sni.parse(data) is None:
                chunk = accepted.recv(65536)
                assert chunk, "the client closed before its hello ended"
                data += chunk
    client.join(10)
    return data


def python_client(server_name):
    def connect_client(port):
        context = ssl.create_default_context()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                context.wrap_socket(raw, server_hostname=server_name)
        except OSError:  # the listener closes without answering
            pass
    return connect_client


def openssl_client(server_name):
    def connect_client(port):
        subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                        "-servername", server_name], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=20)
    return connect_client


@pytest.fixture(scope="module")
def hellos():
    """Real ClientHellos: Python's ssl and openssl s_client, each naming a server."""
    return {"python": captured_hello(python_client("db.example.com")),
            "openssl": captured_hello(openssl_client("Www.Example.ORG."))}


def refragment(hello, sizes):
    """``hello``'s handshake bytes sent again as records of the given fragment sizes."""
    message = bytearray()
    offset = 0
    while offset < len(hello):
        length = int.from_bytes(hello[offset + 3:offset + 5], "big")
        message += hello[offset + 5:offset + 5 + length]
        offset += 5 + length
    records = b""
    position = 0
    for size in sizes:
        if position >= len(message):
            break
        part = message[position:position + size]
        records += bytes((22, 3, 1)) + len(part).to_bytes(2, "big") + part
        position += len(part)
    if position < len(message):
        part = message[position:]
        records += bytes((22, 3, 1)) + len(part).to_bytes(2, "big") + part
    return records


def test_real_hellos_give_their_server_name(hellos):
    """Python's and openssl's hellos name their server, lowercased, without a trailing dot."""
    assert sni.parse(hellos["python"]).server_name == "db.example.com"
    assert sni.parse(hellos["openssl"]).server_name == "www.example.org"


@pytest.mark.parametrize("client", ["python", "openssl"])
def test_every_prefix_asks_for_more_and_the_whole_hello_answers(hellos, client):
    """A hello arriving a byte at a time: None for every prefix, the name once it is whole
    (and bytes after it do not matter)."""
    hello = hellos[client]
    for cut in range(len(hello)):
        assert sni.parse(hello[:cut]) is None
    assert sni.parse(hello + b"\x17\x03\x03junk").server_name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=40))
def test_a_hello_fragmented_over_many_records_is_reassembled(hellos, sizes):
    """The handshake message split over records of any sizes (as a post-quantum hello spans
    several): the same server name, and every prefix still asks for more."""
    records = refragment(hellos["python"], sizes)
    assert sni.parse(records).server_name == "db.example.com"
    for cut in range(0, len(records), 97):
        assert sni.parse(records[:cut]) is None


def test_a_large_hello_within_the_limit_is_parsed_and_beyond_it_refused(hellos):
    """A 40 KB hello (a padding-sized extension) spread over records parses; over ``limit`` it
    is refused without waiting for more."""
    hello = sni.parse(hellos["python"]) and hellos["python"]
    message = bytearray(refragment(hello, [1 << 20])[5:])
    padding = b"\x00\x15" + (40_000).to_bytes(2, "big") + bytes(40_000)  # RFC 7685 padding
    body = message[4:] + padding
    extensions_at = len(message[4:]) - _extensions_length(message[4:]) - 2
    body[extensions_at:extensions_at + 2] = (
        _extensions_length(message[4:]) + len(padding)).to_bytes(2, "big")
    big = bytes((1,)) + len(body).to_bytes(3, "big") + bytes(body)
    records = b"".join(bytes((22, 3, 1)) + len(big[i:i + 16384]).to_bytes(2, "big")
                       + big[i:i + 16384] for i in range(0, len(big), 16384))
    assert sni.parse(records).server_name == "db.example.com"
    with pytest.raises(sni.HelloError, match="at most"):
        sni.parse(records[:20], limit=16384)


def _extensions_length(body):
    """The extensions block length of a ClientHello body (a helper for growing one)."""
    offset = 2 + 32
    offset += 1 + body[offset]
    offset += 2 + int.from_bytes(body[offset:offset + 2], "big")
    offset += 1 + body[offset]
    return int.from_bytes(body[offset:offset + 2], "big")


@pytest.mark.parametrize("data, reason", [
    (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
    (b"\x16\x02\x00\x00\x05", "not a TLS handshake record"),
    (b"\x16\x03\x01\x00\x00", "a TLS record of 0 bytes"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
    (b"\x15\x03\x03\x00\x02\x02\x28", "not a TLS handshake record"),
])
def test_bytes_that_are_not_a_client_hello_are_refused_at_once(data, reason):
    """Plain text, an alert, a ServerHello or an empty record: HelloError at the first byte
    that shows it."""
    with pytest.raises(sni.HelloError, match=reason):
        sni.parse(data)


def test_a_hello_without_a_name_has_none(hellos):
    """A ClientHello without the server_name extension routes to the default: name None."""
    def no_sni(port):
        context = ssl.create_default_context()
        context.check_hostname = False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                context.wrap_socket(raw)
        except OSError:
            pass
    assert sni.parse(captured_hello(no_sni)).server_name is None


@given(st.binary(max_size=300))
def test_fuzzed_bytes_give_a_hello_none_or_hello_error(data):
    """Any bytes: a ClientHello, None (more needed) or HelloError, never another exception."""
    for prefix in (b"", b"\x16\x03\x01", b"\x16\x03\x01\x01\x00\x01"):
        try:
            sni.parse(prefix + data)
        except sni.HelloError:
            pass
