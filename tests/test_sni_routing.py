"""Routes sharing one port, picked by the server name of the client's ClientHello: real TLS
clients (Python's ssl, openssl s_client) and servers (a Python TLS echo, openssl s_server),
certificates from trustme; the TLS bytes pass through gconn untouched (checked by hash)."""

import hashlib
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest
from conftest import connect, free_port, s_client_line
from test_config import run_gconn
from test_proxy_accept import stop, wait_for_port
from test_sni import captured_hello, python_client

from gconn.log import parse_fields as fields


def tls_client(ca, port, server_name, verify=True):
    """A TLS connection through gconn to whichever server the name leads to: (tls socket,
    the server's tag line)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if not verify:
        context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        tls = context.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise
    tag = b""
    while not tag.endswith(b"\n"):
        chunk = tls.recv(1)
        if not chunk:
            tls.close()
            raise ConnectionError("closed before the tag")
        tag += chunk
    return tls, tag.decode().strip()


def shared_port_config(port, routes, timeout="0.5s"):
    """A config with ``routes`` ({name: (server-names, destination)}) all on 127.0.0.1:port."""
    text = f"[gconn]\nworkers = 1\ntls-handshake-timeout = {timeout}\n"
    for name, (names, destination) in routes.items():
        text += f"[route:{name}]\nbind = 127.0.0.1:{port}\ndestinations = {destination}\n"
        if names:
            text += f"server-names = {names}\n"
    return text


def two_named_routes(tls_echo):
    """(port, config) of routes a and b sharing a free port, serving a.example and b.example
    from TLS echoes tagged a and b."""
    port = free_port()
    return port, shared_port_config(port, {
        "a": ("a.example", tls_echo("a", "a.example").address),
        "b": ("b.example", tls_echo("b", "b.example").address)})


def test_three_names_and_a_default_across_routes_sharing_a_port(start_daemon, tls_echo, ca,
                                                                 tmp_path):
    """a.example and *.b.example reach route a, c.example route c (openssl s_server), an
    unknown name or none the default route; each TLS session is the destination's own (the
    certificate verifies for the name asked) and 1 MB comes back byte for byte."""
    a = tls_echo("a", "a.example", "*.b.example")
    default = tls_echo("default", "default.example")
    c_port = free_port()
    cert = ca.issue_cert("c.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
    server = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{c_port}",
                               "-cert", str(tmp_path / "c.pem"), "-rev", "-quiet"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_port(c_port, server)
        port = free_port()
        daemon = start_daemon(config=shared_port_config(port, {
            "a": ("a.example, *.b.example", a.address),
            "c": ("c.example", f"127.0.0.1:{c_port}"),
            "fallback": ("", default.address)}), tmp=str(tmp_path))
        since = daemon.mark()
        for name, tag in (("a.example", "a"), ("x.b.example", "a"), ("A.Example", "a")):
            tls, seen = tls_client(ca, port, name)
            tls.close()
            assert seen == tag, name
        tls, seen = tls_client(ca, port, "unknown.example", verify=False)
        tls.close()
        assert seen == "default"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) \
                as no_name:
            assert no_name.recv(100) == b"default\n"
        with tls_client(ca, port, "a.example")[0] as tls:
            data = os.urandom(1 << 20)
            sender = threading.Thread(target=tls.sendall, args=(data,))
            sender.start()
            received = bytearray()
            while len(received) < len(data):
                received += tls.recv(65536)
            sender.join()
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        # s_server -rev answers each line reversed
        assert s_client_line(port, "c.example", tmp_path / "ca.pem",
                             b"hello gconn\n") == b"nnocg olleh\n"
        daemon.wait_line(lambda text: " sni=c.example " in text and " end=" in text,
                         since=since)
        lines = [fields(line) for line in daemon.lines[since:] if " end=" in line]
        routes = {(line.get("sni"), line["route"]) for line in lines}
        assert {("a.example", "a"), ("x.b.example", "a"), ("c.example", "c"),
                ("unknown.example", "fallback"), (None, "fallback")} <= routes, routes
    finally:
        stop(server)


def test_an_unknown_name_without_a_default_is_closed(start_daemon, tls_echo, ca, tmp_path):
    """A bind whose routes all have names closes a client asking for another name, with
    end=unknown_server_name and the name in the access line."""
    a = tls_echo("a", "a.example")
    port = free_port()
    daemon = start_daemon(config=shared_port_config(port, {"a": ("a.example", a.address)}),
                          tmp=str(tmp_path))
    since = daemon.mark()
    with pytest.raises((ssl.SSLError, OSError)):
        tls_client(ca, port, "other.example", verify=False)
    line = fields(daemon.wait_line(lambda text: " end=" in text, since=since))
    assert line["end"] == "unknown_server_name" and line["sni"] == "other.example"
    tls, tag = tls_client(ca, port, "a.example")
    tls.close()
    assert tag == "a"


def test_a_stalled_hello_ends_at_the_timeout_without_delaying_others(start_daemon, tls_echo,
                                                                      ca, tmp_path):
    """Half a ClientHello: that connection ends at tls-handshake-timeout (2 s) as
    tls_handshake_failed, after five clients that came later were served; plain text ends at
    once, also as tls_handshake_failed."""
    a = tls_echo("a", "a.example")
    port = free_port()
    daemon = start_daemon(config=shared_port_config(port, {"a": ("a.example", a.address)},
                                                    timeout="2s"), tmp=str(tmp_path))
    hello = captured_hello(python_client("a.example"))
    since = daemon.mark()
    with connect(port) as stalled, connect(port) as plain:
        stalled.sendall(hello[:len(hello) // 2])
        began = time.monotonic()
        for _ in range(5):
            tls, tag = tls_client(ca, port, "a.example")
            tls.close()
            assert tag == "a"
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert plain.recv(100) == b""
        stalled.settimeout(10)
        assert stalled.recv(100) == b""
        waited = time.monotonic() - began
    assert 1.5 < waited < 6, waited
    daemon.wait_line(lambda text: text.count(" end=") and " route=a " in text
                     and sum(" end=" in seen for seen in daemon.lines[since:]) >= 7, since=since)
    ends = [fields(line) for line in daemon.lines[since:] if " end=" in line]
    assert ends[-1]["end"] == "tls_handshake_failed"  # the stalled one, after all the others
    assert "no whole ClientHello within 2s" in ends[-1]["error"]
    failed = [line for line in ends[:-1] if line["end"] == "tls_handshake_failed"]
    assert len(failed) == 1 and "not a TLS handshake record" in failed[0]["error"]
    assert sum(line.get("sni") == "a.example" for line in ends) == 5


@pytest.mark.parametrize("text, key", [
    ("[route:a]\nbind = 127.0.0.1:7001\ndestinations = h:1\nserver-names = a.example\n"
     "[route:b]\nbind = 127.0.0.1:7001\ndestinations = h:2\nserver-names = x.example, "
     "A.example\n", "server-names"),
    ("[route:a]\nbind = 127.0.0.1:7001\ndestinations = h:1\n"
     "[route:b]\nbind = 127.0.0.1:7001\ndestinations = h:2\n", "bind"),
    ("[route:a]\nbind = 127.0.0.1:7001\ndestinations = h:1\nserver-names = a.example\n"
     "[route:b]\nbind = 127.0.0.1:7001\ndestinations = h:2\naccept-proxy = v1\n",
     "accept-proxy"),
    ("[route:a]\nbind = 127.0.0.1:7001\ndestinations = h:1\nserver-names = a..example\n",
     "server-names"),
])
def test_bad_shared_binds_are_config_errors(tmp_path, text, key):
    """A name claimed twice, two routes without names, disagreeing pre-route settings, or a
    name that is not a host name: exit 2, one line naming the key."""
    path = tmp_path / "bad.conf"
    path.write_text(text)
    result = run_gconn("-c", str(path), "--check-config")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and str(path) in lines[0], result.stderr


def test_a_full_route_on_a_shared_bind_sheds_only_its_own_clients(start_daemon, tls_echo, ca,
                                                                    tmp_path):
    """Route a (one place, no queue) is full: its next client is shed as queue_full after its
    ClientHello, while route b on the same port goes on serving."""
    port, config = two_named_routes(tls_echo)
    config = config.replace("[route:a]\n", "[route:a]\nmax-connections = 1\nmax-queued = 0\n")
    daemon = start_daemon(config=config, tmp=str(tmp_path))
    held, tag = tls_client(ca, port, "a.example")
    with held:
        assert tag == "a"
        since = daemon.mark()
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls_client(ca, port, "a.example")
        line = fields(daemon.wait_line(lambda text: " end=" in text, since=since))
        assert line["end"] == "queue_full" and line["route"] == "a"
        other, tag = tls_client(ca, port, "b.example")
        other.close()
        assert tag == "b"


def test_host_checks_apply_on_the_route_a_server_name_picks(start_daemon, tls_echo, ca,
                                                          tmp_path):
    """Route b shares route a's listener: b's deny-from and per-host limit are checked in the
    connection's greenlet once the name picked b (the acceptor cannot know the route)."""
    port, config = two_named_routes(tls_echo)
    config = config.replace("[route:b]\n", "[route:b]\ndeny-from = 127.0.0.0/8\n")
    daemon = start_daemon(config=config, tmp=str(tmp_path))
    since = daemon.mark()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_client(ca, port, "b.example")
    line = fields(daemon.wait_line(lambda text: " end=" in text, since=since))
    assert line["end"] == "denied" and line["route"] == "b"
    held, tag = tls_client(ca, port, "a.example")  # route a denies nobody
    held.close()
    assert tag == "a"
