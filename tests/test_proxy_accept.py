"""accept-proxy: gconn behind a balancer reads its PROXY header in the connection's greenlet.

Real HAProxy (``send-proxy`` / ``send-proxy-v2``) in front of gconn, and raw headers written a
byte at a time; the bytes after the header reach the destination untouched (checked by hash
through an echo), the access line names the client the header carried and the balancer in
``via=``, and a bad, untrusted or late header ends that connection only, as bad_proxy_header.
"""

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time

import pytest
from conftest import connect, echo_roundtrip, free_port
from test_admin import get, scrape

from gconn.log import parse_fields as fields
from gconn.protocols import proxy

ROUTE = """[gconn]
workers = 1
[route:default]
bind = 127.0.0.1:0
destinations = {echo}
accept-proxy = {accept}
accept-proxy-from = {trusted}
proxy-header-timeout = 0.5s
"""


def start(start_daemon, start_echo, tmp_path, accept="any", trusted="127.0.0.0/8, ::1"):
    echo = start_echo()
    daemon = start_daemon(config=ROUTE.format(echo=echo.address, accept=accept,
                                              trusted=trusted), tmp=str(tmp_path))
    return daemon


def access_line(daemon, since, client_port=None):
    """The next access line (of the route) from line ``since`` on; by client port if given."""
    def wanted(line):
        return " route=default " in line and " end=" in line and (
            client_port is None or f":{client_port} " in line)
    return daemon.wait_line(wanted, since=since)


def ended_by_gconn(connection):
    """Whether gconn ended this connection without sending anything: a close, or a reset when
    bytes it did not read were left (how the kernel closes a socket with unread data)."""
    try:
        return connection.recv(100) == b""
    except ConnectionResetError:
        return True


def wait_for_port(port, process, host="127.0.0.1", timeout=15.0):
    """Return once something accepts on host:port (HAProxy started), else fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"HAProxy did not listen on {port}: "
                                     f"{process.stderr.read() if process.stderr else ''}"
                                     ) from None
            time.sleep(0.02)  # polling for a port to open, not synchronising on time


@pytest.mark.parametrize("send_proxy,family", [("send-proxy", "ipv4"),
                                                ("send-proxy-v2", "ipv4"),
                                                ("send-proxy", "ipv6"),
                                                ("send-proxy-v2", "ipv6")])
def test_behind_haproxy_the_access_line_names_the_real_client(start_daemon, start_echo,
                                                               tmp_path, send_proxy, family):
    """HAProxy -> gconn (accept-proxy any) -> echo: 1 MB comes back byte for byte, and the
    access line's client is the client's own address and port (IPv4 or IPv6: HAProxy listens
    on ::1 and sends a TCP6 / AF_INET6 header), via HAProxy's."""
    daemon = start(start_daemon, start_echo, tmp_path)
    host = "127.0.0.1" if family == "ipv4" else "::1"
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend in
    bind {"127.0.0.1" if family == "ipv4" else "[::1]"}:{port}
    default_backend gconn
backend gconn
    server gconn {daemon.address['default']} {send_proxy}
""")
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        wait_for_port(port, haproxy, host)
        since = daemon.mark()
        data = os.urandom(1 << 20)
        with connect(port, host=host) as client:
            client_port = client.getsockname()[1]
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            received = b"".join(iter(lambda: client.recv(65536), b""))
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        line = fields(access_line(daemon, since, client_port))
        expected = f"127.0.0.1:{client_port}" if family == "ipv4" else f"[::1]:{client_port}"
        assert line["client"] == expected
        assert line["via"].startswith("127.0.0.1:") and line["via"] != line["client"]
        assert line["end"] == "client_closed" and line["bytes_up"] == str(len(data))
    finally:
        stop(haproxy)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_sent_a_byte_at_a_time_is_waited_for_and_never_forwarded(
        start_daemon, start_echo, tmp_path, version):
    """Each header byte in its own segment, then the payload: the echo returns exactly the
    payload (no header byte reached the destination) and the client is the header's."""
    daemon = start(start_daemon, start_echo, tmp_path, accept=version)
    build = proxy.build_v1 if version == "v1" else proxy.build_v2
    header = build(("192.0.2.7", 4242), ("198.51.100.1", 3306))
    payload = os.urandom(100_000)
    since = daemon.mark()
    with connect(daemon.port()) as client:
        for byte in header:
            client.send(bytes([byte]))
            time.sleep(0.002)  # shaping the input into one segment per byte, not waiting
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b"".join(iter(lambda: client.recv(65536), b""))
    assert received == payload
    line = fields(access_line(daemon, since))
    assert line["client"] == "192.0.2.7:4242" and line["via"].startswith("127.0.0.1:")
    assert line["bytes_up"] == str(len(payload))


def test_a_v2_local_header_is_served_with_the_balancer_as_client(start_daemon, start_echo,
                                                                  tmp_path):
    """A balancer's health check (v2 LOCAL): forwarded, the peer stays the client, no via."""
    daemon = start(start_daemon, start_echo, tmp_path, accept="v2")
    since = daemon.mark()
    with connect(daemon.port()) as client:
        client.sendall(proxy.local_v2() + b"ping")
        client.shutdown(socket.SHUT_WR)
        assert b"".join(iter(lambda: client.recv(65536), b"")) == b"ping"
        client_port = client.getsockname()[1]
    line = fields(access_line(daemon, since))
    assert line["client"] == f"127.0.0.1:{client_port}" and "via" not in line


def test_bad_late_or_untrusted_headers_end_only_their_connection(start_daemon, start_echo,
                                                                   tmp_path):
    """Garbage, a truncated header, silence past proxy-header-timeout: each connection ends as
    bad_proxy_header with why in error=, while a good connection opened before keeps
    forwarding byte for byte."""
    daemon = start(start_daemon, start_echo, tmp_path, accept="v1")
    good = connect(daemon.port())
    good.sendall(proxy.build_v1(("192.0.2.9", 1000), ("192.0.2.10", 80)) + b"before")
    assert good.recv(6) == b"before"
    cases = [(b"GET / HTTP/1.0\r\n\r\n", "not a PROXY protocol header"),
             (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 99999\r\n", "bad destination port '99999'"),
             (b"PROXY TCP4 192.0.2.1", "no complete PROXY header within 0.5s (20 bytes came)"),
             (b"", "no complete PROXY header within 0.5s"),
             (proxy.build_v2(("192.0.2.1", 1), ("192.0.2.2", 2)),
              "v2 header where only v1 is accepted")]
    for sent, why in cases:
        since = daemon.mark()
        with connect(daemon.port()) as bad:
            bad.sendall(sent)
            assert ended_by_gconn(bad)
        line = fields(access_line(daemon, since))
        assert line["end"] == "bad_proxy_header" and line["destination"] == "-", line
        assert why in line["error"], line
    good.sendall(b"after")
    assert good.recv(5) == b"after"
    good.close()


def test_a_header_from_outside_accept_proxy_from_is_not_believed(start_daemon, start_echo,
                                                                   tmp_path):
    """Only balancers are believed: from 127.0.0.1 with accept-proxy-from 10.0.0.0/8 a valid
    header ends the connection as bad_proxy_header, naming the peer."""
    daemon = start(start_daemon, start_echo, tmp_path, trusted="10.0.0.0/8")
    since = daemon.mark()
    with connect(daemon.port()) as client:
        client.sendall(proxy.build_v1(("192.0.2.7", 4242), ("192.0.2.8", 80)) + b"x")
        assert ended_by_gconn(client)
    line = fields(access_line(daemon, since))
    assert line["end"] == "bad_proxy_header" and line["client"].startswith("127.0.0.1:")
    assert "not believed from 127.0.0.1" in line["error"]
    ended = frozenset({"route": "default", "end": "bad_proxy_header"}.items())
    assert scrape(daemon)[("gconn_connections_ended_total", ended)] == 1


def test_without_accept_proxy_a_header_is_forwarded_as_data(start_daemon, start_echo,
                                                            tmp_path):
    """accept-proxy = no (the default) reads nothing: a PROXY line is just bytes."""
    daemon = start(start_daemon, start_echo, tmp_path, accept="no")
    header = proxy.build_v1(("192.0.2.7", 4242), ("192.0.2.8", 80))
    digest, size = echo_roundtrip(daemon.port(), header + b"payload")
    assert (digest, size) == (hashlib.sha256(header + b"payload").hexdigest(),
                              len(header) + 7)


# send-proxy: gconn tells its destinations who the client is ----------------------------------

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def start_nginx_reporting_the_header(tmp_path):
    """nginx stream on a free port: reads a PROXY header (proxy_protocol) and answers the
    addresses it carried, one line, then closes.  Returns (process, port)."""
    port = free_port()
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"load_module {NGINX_STREAM_MODULE};\nworker_processes 1;\ndaemon off;\n"
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{ worker_connections 64; }}\n"
        f"stream {{ server {{ listen 127.0.0.1:{port} proxy_protocol; return "
        f"\"$proxy_protocol_addr:$proxy_protocol_port "
        f"$proxy_protocol_server_addr:$proxy_protocol_server_port\\n\"; }} }}\n")
    nginx = subprocess.Popen(["nginx", "-c", str(config), "-p", str(tmp_path)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    wait_for_port(port, nginx)
    return nginx, port


def plain_listener():
    """A listening socket on 127.0.0.1 whose accepts time out after 20 s (a destination that
    shows what gconn sends it)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(20)
    return listener


def read_all(connection):
    """Every byte until the peer closes."""
    return b"".join(iter(lambda: connection.recv(65536), b""))


def stop(process):
    """Kill a process started in a session of its own, and its children (nginx's workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    process.stderr.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_behind_gconn_sees_the_client_gconn_saw(start_daemon, tmp_path, version):
    """gconn (send-proxy) -> nginx (listen proxy_protocol): nginx reports the client's own
    address and port and the gconn address it connected to."""
    nginx, port = start_nginx_reporting_the_header(tmp_path)
    try:
        daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\n"
                                     f"bind = 127.0.0.1:0\ndestinations = 127.0.0.1:{port}\n"
                                     f"send-proxy = {version}\n", tmp=str(tmp_path))
        with connect(daemon.port()) as client:
            seen = b"".join(iter(lambda: client.recv(1024), b"")).decode()
            assert seen == (f"127.0.0.1:{client.getsockname()[1]} "
                            f"{daemon.address['default']}\n")
    finally:
        stop(nginx)


def test_a_client_named_by_a_received_header_is_the_one_passed_on(start_daemon, tmp_path):
    """accept-proxy and send-proxy together: the destination hears of the client the
    balancer's header named (and where it connected), not of the balancer."""
    nginx, port = start_nginx_reporting_the_header(tmp_path)
    try:
        daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\n"
                                     f"bind = 127.0.0.1:0\ndestinations = 127.0.0.1:{port}\n"
                                     f"accept-proxy = any\nsend-proxy = v1\n",
                              tmp=str(tmp_path))
        with connect(daemon.port()) as client:
            client.sendall(proxy.build_v2(("203.0.113.5", 40000), ("198.51.100.2", 443)))
            seen = b"".join(iter(lambda: client.recv(1024), b"")).decode()
        assert seen == "203.0.113.5:40000 198.51.100.2:443\n"
    finally:
        stop(nginx)


@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_behind_gconn_haproxy_accepts_the_header_and_forwards_byte_for_byte(
        start_daemon, start_echo, tmp_path, send_proxy):
    """gconn (send-proxy) -> HAProxy (bind ... accept-proxy) -> echo: 1 MB hashed both ways,
    and HAProxy's log names the client's own port (it believed gconn's header)."""
    echo = start_echo()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""global
    log stdout format raw local0
defaults
    mode tcp
    log global
    log-format "client=%ci:%cp"
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend in
    bind 127.0.0.1:{port} accept-proxy
    default_backend echo
backend echo
    server echo {echo.address}
""")
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_for_port(port, haproxy)
        daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\n"
                                     f"bind = 127.0.0.1:0\ndestinations = 127.0.0.1:{port}\n"
                                     f"send-proxy = {send_proxy}\n", tmp=str(tmp_path))
        data = os.urandom(1 << 20)
        with connect(daemon.port()) as client:
            client_port = client.getsockname()[1]
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            received = b"".join(iter(lambda: client.recv(65536), b""))
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        wanted = f"client=127.0.0.1:{client_port}"
        for line in haproxy.stdout:  # HAProxy logs the session when it ends
            if line.strip() == wanted:
                break
        else:
            pytest.fail(f"HAProxy never logged {wanted}")
    finally:
        stop(haproxy)
        haproxy.stdout.close()


@pytest.mark.parametrize("version,expected", [("v1", b"PROXY UNKNOWN\r\n"),
                                              ("v2", proxy.local_v2())])
def test_health_checks_send_a_proxy_header_when_destinations_expect_one(
        start_daemon, tmp_path, version, expected):
    """With send-proxy, each health check's connection carries a v1 UNKNOWN or v2 LOCAL header
    (a PROXY-expecting backend would count a bare connect as a broken client)."""
    listener = plain_listener()
    try:
        daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\n"
                                     f"bind = 127.0.0.1:0\n"
                                     f"destinations = 127.0.0.1:{listener.getsockname()[1]}\n"
                                     f"send-proxy = {version}\ncheck-interval = 0.1s\n",
                              tmp=str(tmp_path))
        assert daemon.port()
        for _ in range(3):  # three checks in a row, each a connection of its own
            check, _ = listener.accept()
            with check:
                check.settimeout(10)
                assert read_all(check) == expected
    finally:
        listener.close()


def test_a_destination_overrides_the_routes_send_proxy(start_daemon, tmp_path):
    """send-proxy per destination: with the route at v2, nginx listed with send-proxy=v1 gets a
    v1 header and a plain listener listed with send-proxy=no gets the client's bytes only."""
    nginx, port = start_nginx_reporting_the_header(tmp_path)
    plain = plain_listener()
    try:
        daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\n"
                                     f"bind = 127.0.0.1:0\nsend-proxy = v2\n"
                                     f"strategy = round-robin\ndestinations = "
                                     f"127.0.0.1:{port} send-proxy=v1, "
                                     f"127.0.0.1:{plain.getsockname()[1]} send-proxy=no\n",
                              tmp=str(tmp_path))
        with connect(daemon.port()) as client:
            seen = b"".join(iter(lambda: client.recv(1024), b"")).decode()
            assert seen == (f"127.0.0.1:{client.getsockname()[1]} "
                            f"{daemon.address['default']}\n")
        with connect(daemon.port()) as client:
            client.sendall(b"hello")
            accepted, _ = plain.accept()
            with accepted:
                accepted.settimeout(10)
                assert accepted.recv(100) == b"hello"
    finally:
        plain.close()
        stop(nginx)


def start_haproxy(config_path, text):
    """HAProxy in the foreground with ``text`` as its config, in a session of its own."""
    config_path.write_text(text)
    return subprocess.Popen(["haproxy", "-db", "-f", str(config_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


HAPROXY_DEFAULTS = """global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""


def wait_for_unix(path, process, timeout=15.0):
    """Return once something accepts on the unix socket ``path``, else fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {path}") from None
            time.sleep(0.02)  # polling for a socket to appear, not synchronising on time


def hashed_roundtrip(client, size=1 << 20):
    """Send ``size`` random bytes, half-close, and check they all come back (by hash)."""
    data = os.urandom(size)
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    received = b"".join(iter(lambda: client.recv(65536), b""))
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_over_a_unix_socket_to_gconn_names_the_tcp_client(start_daemon, start_echo,
                                                                   tmp_path, send_proxy):
    """TCP client -> HAProxy -> gconn listening on a unix socket (accept-proxy: a unix peer
    is believed): the header names the TCP client, whose bytes come back byte for byte."""
    echo = start_echo()
    path = str(tmp_path / "gconn.sock")
    daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\nbind = unix:{path}\n"
                                 f"destinations = {echo.address}\naccept-proxy = any\n",
                          tmp=str(tmp_path))
    port = free_port()
    haproxy = start_haproxy(tmp_path / "haproxy.cfg", HAPROXY_DEFAULTS + f"""
frontend in
    bind 127.0.0.1:{port}
    default_backend gconn
backend gconn
    server gconn unix@{path} {send_proxy}
""")
    try:
        wait_for_port(port, haproxy)
        since = daemon.mark()
        with connect(port) as client:
            client_port = client.getsockname()[1]
            hashed_roundtrip(client)
        line = fields(access_line(daemon, since, client_port))
        assert line["client"] == f"127.0.0.1:{client_port}" and line["end"] == "client_closed"
    finally:
        stop(haproxy)


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_a_unix_socket_client_of_haproxy_reaches_gconn_as_unknown_or_local(
        start_daemon, start_echo, tmp_path, send_proxy):
    """unix client -> HAProxy (bind unix@) -> gconn over TCP: HAProxy's header for a unix
    client carries no address (v1 UNKNOWN, v2 LOCAL with no family); gconn serves it, byte
    for byte, with HAProxy as the client."""
    daemon = start(start_daemon, start_echo, tmp_path)
    path = str(tmp_path / "haproxy.sock")
    haproxy = start_haproxy(tmp_path / "haproxy.cfg", HAPROXY_DEFAULTS + f"""
frontend in
    bind unix@{path}
    default_backend gconn
backend gconn
    server gconn {daemon.address['default']} {send_proxy}
""")
    try:
        wait_for_unix(path, haproxy)
        since = daemon.mark()
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(30)
            client.connect(path)
            hashed_roundtrip(client)
        # (the readiness probe's own connection through HAProxy may log first)
        line = fields(daemon.wait_line(lambda text: f" bytes_up={1 << 20} " in text,
                                       since=since))
        assert line["end"] == "client_closed"
        assert line["client"].startswith("127.0.0.1:") and "via" not in line, line
    finally:
        stop(haproxy)


def test_a_connection_reading_its_header_is_in_phase_handshake(start_daemon, start_echo,
                                                               tmp_path):
    """/connections shows a client whose PROXY header is still coming as phase handshake,
    under the balancer's address, and as forwarding under its real one once it has come."""
    echo = start_echo()
    daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\nbind = 127.0.0.1:0\n"
                                 f"destinations = {echo.address}\naccept-proxy = v1\n",
                          tmp=str(tmp_path))
    with connect(daemon.port()) as client:
        client.sendall(b"PROXY TCP4 203.0.113.9 ")
        balancer = f"127.0.0.1:{client.getsockname()[1]}"

        def phase_of(name):
            status, body = get(daemon, "/connections")
            assert status == 200
            return {entry["client"]: entry["phase"]
                    for entry in json.loads(body)["connections"]}.get(name)

        deadline = time.monotonic() + 10
        while phase_of(balancer) != "handshake":  # until the worker has accepted it
            assert time.monotonic() < deadline, "never seen in phase handshake"
            time.sleep(0.02)
        client.sendall(b"198.51.100.1 5000 443\r\nping")
        assert client.recv(4) == b"ping"
        assert phase_of("203.0.113.9:5000") == "forwarding"


def test_an_ipv4_balancer_matches_an_ipv4_mapped_network(start_daemon, start_echo, tmp_path):
    """accept-proxy-from written as IPv4-mapped IPv6 (::ffff:127.0.0.0/104, as a dual-stack
    config may say it) believes an IPv4 balancer's header.  (gconn's own IPv6 listeners are
    IPv6-only; the pure tests cover a mapped peer against IPv4 blocks.)"""
    echo = start_echo()
    daemon = start_daemon(config=f"[gconn]\nworkers = 1\n[route:default]\nbind = 127.0.0.1:0\n"
                                 f"destinations = {echo.address}\naccept-proxy = v1\n"
                                 f"accept-proxy-from = ::ffff:127.0.0.0/104\n", tmp=str(tmp_path))
    since = daemon.mark()
    with connect(daemon.port()) as client:
        client.sendall(proxy.build_v1(("192.0.2.44", 1234), ("198.51.100.1", 80)) + b"ping")
        assert client.recv(4) == b"ping"
    line = fields(access_line(daemon, since))
    assert line["client"] == "192.0.2.44:1234" and line["via"].startswith("127.0.0.1:")


def fuzzed_headers(seed, count):
    """``count`` header-like inputs from a seeded generator: valid headers with one byte
    changed, cut short, or followed by junk; random bytes after either signature."""
    rng = random.Random(seed)
    valid = [proxy.build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)),
             proxy.build_v1(("2001:db8::1", 65535), ("2001:db8::2", 1)),
             proxy.build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(0x04, b"x" * 30)]),
             proxy.build_v2(("2001:db8::1", 1), ("2001:db8::2", 2)), proxy.local_v2()]
    for _ in range(count):
        header = bytearray(rng.choice(valid))
        kind = rng.randrange(4)
        if kind == 0:
            header[rng.randrange(len(header))] = rng.randrange(256)
        elif kind == 1:
            del header[rng.randrange(1, len(header)):]
        elif kind == 2:
            header[rng.randrange(len(header)):] = rng.randbytes(rng.randrange(1, 200))
        else:
            header = bytearray(header[:rng.choice((6, 12))] + rng.randbytes(rng.randrange(300)))
        yield bytes(header)


def test_fuzzed_headers_never_hurt_the_worker(start_daemon, start_echo, tmp_path):
    """500 seeded fuzzed headers over real sockets: each connection ends with one access line,
    the worker is the same process afterwards, and a good client still round-trips."""
    daemon = start(start_daemon, start_echo, tmp_path)  # proxy-header-timeout 0.5s
    since = daemon.mark()
    inputs = list(fuzzed_headers(seed=15, count=500))
    for start_at in range(0, len(inputs), 50):  # 50 at a time: each may wait for the timeout
        clients = []
        for data in inputs[start_at:start_at + 50]:
            client = connect(daemon.port())
            clients.append(client)
            try:
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)
            except OSError:  # gconn already refused a header it could judge early
                pass
        for client in clients:
            with client:
                client.settimeout(10)
                try:
                    while client.recv(65536):
                        pass
                except ConnectionResetError:
                    pass
    daemon.wait_line(lambda line: sum(" end=" in seen for seen in daemon.lines[since:])
                     >= len(inputs), since=since)
    ended = [fields(line)["end"] for line in daemon.lines[since:] if " end=" in line]
    assert len(ended) == len(inputs) and "error" not in ended, set(ended)
    assert "bad_proxy_header" in ended
    assert not any("Traceback" in line or "session failed" in line for line in daemon.lines)
    assert echo_roundtrip(daemon.port(), proxy.local_v2() + b"still here") == (
        hashlib.sha256(b"still here").hexdigest(), 10)
