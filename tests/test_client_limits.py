"""Per-client limits and unwelcome connections: max-connections-per-host,
max-connect-rate-per-host, allow-from / deny-from, the fin timeouts and TCP keepalive, on real
sockets (and redis-cli for a refusal in the route's protocol); HostLimits without sockets."""

import hashlib
import json
import os
import socket
import subprocess
import threading
import urllib.request

from conftest import AcceptLoop, connect, free_port
from hypothesis import given
from hypothesis import strategies as st
from test_shedding import bound_client, read_to_end

from gconn.admission import HOST_LIMIT, HOST_RATE, HostLimits
from gconn.protocols import proxy

# HostLimits, pure -----------------------------------------------------------------------------

def test_host_limit_counts_live_connections_per_host():
    limits = HostLimits(max_live=2, rate=0)
    assert limits.admit("10.0.0.1", 0.0) is None
    assert limits.admit("10.0.0.1", 0.0) is None
    assert limits.admit("10.0.0.1", 0.0) == HOST_LIMIT
    assert limits.admit("10.0.0.2", 0.0) is None  # another host has its own count
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.1", 0.0) is None
    assert limits.top(1) == [("10.0.0.1", 2)]


def test_host_rate_is_a_token_bucket_of_one_second():
    limits = HostLimits(max_live=0, rate=4)
    assert [limits.admit("h", 0.0) for _ in range(5)] == [None] * 4 + [HOST_RATE]
    assert limits.admit("h", 0.1) == HOST_RATE  # 0.4 of a token came back: not enough
    assert limits.admit("h", 0.3) is None  # 1.2 tokens: one connection
    assert limits.admit("other", 0.3) is None


@given(st.lists(st.tuples(st.integers(0, 300), st.booleans()), max_size=400))
def test_host_tables_stay_bounded_and_live_counts_exact(events):
    """Whatever the sources: the rate table never passes its size, ``live`` holds only hosts
    with live connections, and their counts are exact."""
    limits = HostLimits(max_live=3, rate=2, table=50)
    expected = {}
    now = 0.0
    for host_number, ends in events:
        host = f"10.0.{host_number // 256}.{host_number % 256}"
        now += 0.01
        if ends and expected.get(host):
            limits.release(host)
            expected[host] -= 1
        elif limits.admit(host, now) is None:
            expected[host] = expected.get(host, 0) + 1
        assert len(limits.buckets) <= 50
        assert all(count <= 3 for count in limits.live.values())
    assert limits.live == {host: count for host, count in expected.items() if count}


# on real sockets ------------------------------------------------------------------------------

def status(daemon):
    with urllib.request.urlopen(f"http://{daemon.admin}/status", timeout=10) as response:
        return json.loads(response.read())


def test_max_connections_per_host_sheds_that_host_only(start_echo, start_daemon):
    """Over its limit a host is shed at once (host_limit, the shed-message, counted) while
    another host is served; a place it gives back is its again; /status shows the top hosts."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--max-connections-per-host", "2",
                          "--shed-message", "BUSY", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{echo.port}")
    port = daemon.port()
    held = [bound_client("127.0.0.2", port) for _ in range(2)]
    for client in held:  # both forwarded (a round trip each), so both hold their places
        client.sendall(b"ping")
        assert client.recv(10) == b"ping"
    assert status(daemon)["routes"]["default"]["top_hosts"] == [
        {"host": "127.0.0.2", "connections": 2}]
    with bound_client("127.0.0.2", port) as third:
        assert read_to_end(third) == b"BUSY"
    daemon.wait_contains("end=host_limit")
    with bound_client("127.0.0.3", port) as other:
        other.sendall(b"other")
        assert other.recv(10) == b"other"
    mark = daemon.mark()
    held.pop().close()
    daemon.wait_contains("client=127.0.0.2", since=mark)  # its place is free once it is out
    with bound_client("127.0.0.2", port) as again:
        again.sendall(b"again")
        assert again.recv(10) == b"again"
    routes = status(daemon)["routes"]["default"]
    assert routes["shed"]["host_limit"] == 1
    held[0].close()


def test_max_connect_rate_per_host_sheds_a_burst(start_echo, start_daemon):
    """A host opening connections faster than its rate is shed (host_rate) past its one
    second's burst; another host is not."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--max-connect-rate-per-host", "5",
                          "--shed-message", "SLOW DOWN", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{echo.port}")
    port = daemon.port()
    replies = []
    for number in range(12):  # back to back: far faster than 5 per second
        with bound_client("127.0.0.2", port) as client:
            client.sendall(b"%d" % number)
            replies.append(client.recv(64))  # the echo, or the shed-message before the close
    assert replies[:5] == [b"%d" % n for n in range(5)]  # the burst is served
    assert b"SLOW DOWN" in replies[5:]
    with bound_client("127.0.0.3", port) as other:
        other.sendall(b"x")
        assert other.recv(10) == b"x"
    assert "end=host_rate" in daemon.wait_contains("end=host_rate")


def test_redis_client_over_its_host_limit_reads_why(start_daemon):
    """On a protocol = redis route the refusal is an -ERR reply redis-cli prints."""
    redis_port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "",
                               "--bind", "127.0.0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if "Ready to accept connections" in line:
                break
        daemon = start_daemon("--workers", "1", "--protocol", "redis",
                              "--max-connections-per-host", "1", "--bind", "127.0.0.1:0",
                              "--destination", f"127.0.0.1:{redis_port}")
        with connect(daemon.port()) as holder:
            holder.sendall(b"PING\r\n")
            assert holder.recv(10) == b"+PONG\r\n"
            result = subprocess.run(["redis-cli", "-p", str(daemon.port()), "PING"],
                                    capture_output=True, text=True, timeout=30)
        assert "too many connections from client host 127.0.0.1" in result.stdout
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


def test_allow_and_deny_close_at_accept_without_a_word(start_echo, start_daemon):
    """allow-from lets in only its blocks, deny-from closes its own: closed at once, no
    shed-message, counted as denied, an access line; the allowed are served."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--allow-from", "127.0.0.0/29",
                          "--deny-from", "127.0.0.3", "--shed-message", "BUSY",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{echo.port}")
    port = daemon.port()
    for source in ("127.0.0.3", "127.0.0.9"):  # denied, and not allowed
        with bound_client(source, port) as client:
            assert closed_without_a_word(client)
        assert "end=denied" in daemon.wait_contains(f"client={source}")
    with bound_client("127.0.0.2", port) as client:
        client.sendall(b"in")
        assert client.recv(10) == b"in"
    assert status(daemon)["routes"]["default"]["shed"]["denied"] == 2


def closed_without_a_word(client):
    """Whether the peer closed ``client`` without sending a byte (a reset counts: closing
    with the client's bytes unread resets)."""
    try:
        return read_to_end(client) == b""
    except ConnectionResetError:
        return True


def test_deny_from_checks_the_client_a_proxy_header_names(start_echo, start_daemon):
    """Behind a balancer the client its PROXY header names is checked, not the balancer."""
    echo = start_echo()
    daemon = start_daemon("--workers", "1", "--accept-proxy", "v1", "--deny-from", "10.0.0.0/8",
                          "--bind", "127.0.0.1:0", "--destination", f"127.0.0.1:{echo.port}")
    header = proxy.build_v1(("10.1.2.3", 4000), ("127.0.0.1", daemon.port()))
    with connect(daemon.port()) as client:
        client.sendall(header + b"hello")
        assert closed_without_a_word(client)
    line = daemon.wait_contains("client=10.1.2.3")
    assert "end=denied" in line and "via=127.0.0.1" in line
    header = proxy.build_v1(("192.0.2.7", 4000), ("127.0.0.1", daemon.port()))
    with connect(daemon.port()) as client:
        client.sendall(header + b"hello")
        assert client.recv(10) == b"hello"


class HalfCloser(AcceptLoop):
    """A destination that reads what comes (its SHA-256 kept) and, per connection, either
    sends ``reply`` then ends its side, or never sends nor closes (until ``close``); the end
    of what each connection sent is recorded (``ended``)."""

    def __init__(self, reply=None):
        self.reply = reply
        self.digests = []
        self.ended = threading.Event()
        self.closing = threading.Event()
        super().__init__()

    def accepted(self, connection):
        threading.Thread(target=self.handle, args=(connection,), daemon=True).start()

    def handle(self, connection):
        with connection:
            if self.reply is not None:
                connection.sendall(self.reply)
                connection.shutdown(socket.SHUT_WR)
            digest = hashlib.sha256()
            try:
                while data := connection.recv(65536):
                    digest.update(data)
            except OSError:
                pass
            self.digests.append(digest.hexdigest())
            self.ended.set()
            if self.reply is None:  # its own side stays open and quiet
                self.closing.wait(60)

    def close(self):
        self.closing.set()
        super().close()


def test_client_fin_timeout_closes_a_half_closed_connection(start_daemon):
    """The client sends its bytes and its FIN; the destination never answers: after
    client-fin-timeout (not the idle-timeout) both are closed, every byte delivered."""
    destination = HalfCloser()
    try:
        daemon = start_daemon("--workers", "1", "--client-fin-timeout", "300ms",
                              "--idle-timeout", "1h", "--bind", "127.0.0.1:0",
                              "--destination", f"127.0.0.1:{destination.port}")
        payload = os.urandom(200_000)
        with connect(daemon.port()) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            assert read_to_end(client, timeout=20) == b""
        line = daemon.wait_contains("end=fin_timeout")
        assert "after the client ended its side" in line and "bytes_up=200000" in line
        assert destination.ended.wait(10)
        assert destination.digests == [hashlib.sha256(payload).hexdigest()]
    finally:
        destination.close()


def test_server_fin_timeout_closes_after_the_destination_ended(start_daemon):
    """The destination sends its reply and its FIN; the client reads it and stays quiet:
    server-fin-timeout closes the connection, the reply delivered whole."""
    reply = os.urandom(100_000)
    destination = HalfCloser(reply)
    try:
        daemon = start_daemon("--workers", "1", "--server-fin-timeout", "300ms",
                              "--bind", "127.0.0.1:0",
                              "--destination", f"127.0.0.1:{destination.port}")
        with connect(daemon.port()) as client:
            assert read_to_end(client, timeout=20) == reply
            # the client keeps its side open and quiet; gconn closes it
            assert destination.ended.wait(20)
        line = daemon.wait_contains("end=fin_timeout")
        assert "after the destination ended its side" in line
    finally:
        destination.close()


def keepalive_timers(port_filter):
    """The ``ss`` timer fields of established loopback sockets matching ``port_filter``."""
    output = subprocess.run(["ss", "-tnoH", "state", "established", port_filter],
                            capture_output=True, text=True, check=True).stdout
    return [line for line in output.splitlines() if line.strip()]


def test_keepalive_is_on_both_sides_with_the_configured_idle(start_echo, start_daemon):
    """Both of gconn's sockets of a connection carry keepalive timers (the accepted one
    inherits them from the listener); tcp-keepalive = no leaves both without."""
    for keepalive, expected in (("yes", True), ("no", False)):
        echo = start_echo()  # its own: no connection of the other daemon in sight
        daemon = start_daemon("--workers", "1", "--tcp-keepalive", keepalive,
                              "--tcp-keepalive-idle", "77s", "--bind", "127.0.0.1:0",
                              "--destination", f"127.0.0.1:{echo.port}")
        port = daemon.port()
        with connect(port) as client:
            client.sendall(b"k")
            assert client.recv(1) == b"k"
            local = client.getsockname()[1]
            accepted = keepalive_timers(f"( sport = :{port} and dport = :{local} )")
            outgoing = keepalive_timers(f"( dport = :{echo.port} )")
        assert len(accepted) == 1 and outgoing
        for lines in (accepted, outgoing):
            assert all(("timer:(keepalive" in line) == expected for line in lines), lines
        daemon.stop()


def test_database_clients_over_a_host_limit_hear_too_many_connections():
    """mysql 1040 and postgres 53300 (what their clients retry on), naming the host."""
    from gconn.protocols import mysql, postgres

    for reason in (HOST_LIMIT, HOST_RATE):
        code, message = mysql.parse_error(mysql.split(mysql.refusal(
            reason, "db", "10.0.0.9", "127.0.0.1:3306"))[1])
        assert code == 1040 and "'10.0.0.9'" in message
        response = postgres.refusal(reason, "db", "10.0.0.9")
        assert b"C53300\0" in response and b"10.0.0.9" in response
