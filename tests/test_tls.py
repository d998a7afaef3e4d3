"""TLS termination on a route: real clients (Python's ssl, openssl s_client), certificates from
trustme, gconn-echo behind; bytes checked by hash, the access line's TLS fields, client
certificates, pairs picked by SNI, bad files refused at load, certificates reloaded on HUP."""

import hashlib
import os
import signal
import socket
import ssl
import threading
import time

import pytest
from conftest import s_client_line
from test_config import run_gconn

from gconn.log import parse_fields as fields


def write_pair(ca, tmp_path, name, *names):
    """A certificate (with chain) and key for ``names``, as two PEM files: (cert, key)."""
    issued = ca.issue_cert(*names)
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return str(cert), str(key)


def tls_route(destination, certs, keys="", extra=""):
    """A one-worker config whose route ``tls`` terminates TLS towards ``destination``."""
    return (f"[gconn]\nworkers = 1\n[route:tls]\nbind = 127.0.0.1:0\n"
            f"destinations = {destination}\ntls-cert = {certs}\ntls-key = {keys}\n"
            f"tls-handshake-timeout = 2s\n{extra}")


class OneConnection:
    """A plain destination on 127.0.0.1 that serves one connection with ``handle`` in a
    thread; ``finish()`` waits for it and closes the listener."""

    def __init__(self, handle):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, args=(handle,), daemon=True)
        self.thread.start()

    def serve(self, handle):
        connection, _ = self.listener.accept()
        with connection:
            handle(connection)

    def finish(self):
        self.thread.join(10)
        self.listener.close()


def client_context(ca, certificate=None, maximum=None):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if certificate is not None:
        certificate.configure_cert(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


def roundtrip(context, port, name, size=1 << 20, chunk=64 * 1024):
    """``size`` random bytes through TLS to the echo and back, checked by hash; returns the
    server certificate the client verified.  One thread sends a chunk and reads its echo
    before the next (an SSL object must not be read and written from two threads at once)."""
    data = os.urandom(size)
    received = bytearray()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                             server_hostname=name) as tls:
        peer = tls.getpeercert()
        for offset in range(0, size, chunk):
            tls.sendall(data[offset:offset + chunk])
            while len(received) < min(size, offset + chunk):
                part = tls.recv(65536)
                assert part, "closed early"
                received += part
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    return peer


def refused(context, port, name):
    """Whether the TLS connection fails: in the handshake, or (TLS 1.3 checks a client
    certificate after the client's side of it is done) at the first read."""
    try:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                                 server_hostname=name) as tls:
            tls.sendall(b"x")
            return tls.recv(10) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_terminated_tls_carries_a_megabyte_and_logs_version_cipher_and_name(
        start_daemon, start_echo, ca, tmp_path):
    """A Python TLS client verifies gconn's certificate, 1 MB comes back byte for byte from
    the plain echo, and the access line has tls_version, tls_cipher and sni."""
    echo = start_echo()
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    daemon = start_daemon(config=tls_route(echo.address, cert, key), tmp=str(tmp_path))
    since = daemon.mark()
    roundtrip(client_context(ca), daemon.port("tls"), "a.example")
    line = fields(daemon.wait_line(lambda text: " end=" in text, since=since))
    assert line["tls_version"] == "TLSv1.3" and line["tls_cipher"].startswith("TLS_")
    assert line["sni"] == "a.example" and line["bytes_up"] == str(1 << 20)
    assert line["end"] == "client_closed"


def test_openssl_s_client_through_terminated_tls(start_daemon, start_echo, ca, tmp_path):
    """openssl s_client (TLS 1.2 forced) verifies the chain and gets its line echoed."""
    echo = start_echo()
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    daemon = start_daemon(config=tls_route(echo.address, cert, key), tmp=str(tmp_path))
    assert s_client_line(daemon.port("tls"), "a.example", tmp_path / "ca.pem",
                         b"hello through tls\n", "-tls1_2") == b"hello through tls\n"
    line = fields(daemon.wait_line(lambda text: " end=" in text))
    assert line["tls_version"] == "TLSv1.2"


def test_client_certificates_required_and_refused(start_daemon, start_echo, ca, tmp_path):
    """With tls-client-ca a client without a certificate is refused (tls_handshake_failed with
    OpenSSL's reason), one with a certificate from that CA is served."""
    echo = start_echo()
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    daemon = start_daemon(config=tls_route(echo.address, cert, key,
                                           f"tls-client-ca = {tmp_path / 'clients.pem'}\n"),
                          tmp=str(tmp_path))
    port = daemon.port("tls")
    since = daemon.mark()
    assert refused(client_context(ca), port, "a.example")
    line = fields(daemon.wait_line(lambda text: " end=" in text, since=since))
    assert line["end"] == "tls_handshake_failed"
    assert "CERTIFICATE" in line["error"].upper(), line
    roundtrip(client_context(ca, ca.issue_cert("client@example")), port, "a.example",
              size=1000)


def test_several_pairs_are_picked_by_server_name(start_daemon, start_echo, ca, tmp_path):
    """Two certificate/key pairs: a client asking for b.example gets b's certificate (its
    verification would fail with a's), one asking for an unknown name gets the first."""
    echo = start_echo()
    a_cert, a_key = write_pair(ca, tmp_path, "a", "a.example")
    b_cert, b_key = write_pair(ca, tmp_path, "b", "*.b.example")
    daemon = start_daemon(config=tls_route(echo.address, f"{a_cert}, {b_cert}",
                                           f"{a_key}, {b_key}"), tmp=str(tmp_path))
    port = daemon.port("tls")
    peer = roundtrip(client_context(ca), port, "x.b.example", size=100)
    assert ("DNS", "*.b.example") in peer["subjectAltName"]
    peer = roundtrip(client_context(ca), port, "a.example", size=100)
    assert ("DNS", "a.example") in peer["subjectAltName"]


def test_tls_min_version_refuses_older_clients(start_daemon, start_echo, ca, tmp_path):
    """tls-min-version 1.3: a client that offers at most TLS 1.2 fails its handshake."""
    echo = start_echo()
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    daemon = start_daemon(config=tls_route(echo.address, cert, key, "tls-min-version = 1.3\n"),
                          tmp=str(tmp_path))
    assert refused(client_context(ca, maximum=ssl.TLSVersion.TLSv1_2), daemon.port("tls"),
                   "a.example")
    line = fields(daemon.wait_line(lambda text: " end=" in text))
    assert line["end"] == "tls_handshake_failed" and line["error"] == "UNSUPPORTED_PROTOCOL"


@pytest.mark.parametrize("case", ["mismatched key", "missing file", "keys without certs"])
def test_bad_certificate_files_are_config_errors(ca, tmp_path, case):
    """A key that is not the certificate's, a missing file, or tls-key alone: exit 2 with
    one line naming the key."""
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    _, other_key = write_pair(ca, tmp_path, "b", "b.example")
    keys = {"mismatched key": f"tls-cert = {cert}\ntls-key = {other_key}\n",
            "missing file": f"tls-cert = {tmp_path / 'nope.pem'}\n",
            "keys without certs": f"tls-key = {key}\n"}[case]
    path = tmp_path / "bad.conf"
    path.write_text(f"[route:a]\nbind = 127.0.0.1:0\ndestinations = 127.0.0.1:9\n{keys}")
    result = run_gconn("-c", str(path), "--check-config")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ("tls-cert" in lines[0] or "tls-key" in lines[0]), lines


def test_hup_serves_a_new_certificate_to_new_clients_and_keeps_a_broken_one_out(
        start_daemon, start_echo, ca, tmp_path):
    """HUP after the certificate file changed: new clients get the new certificate while a
    session begun before goes on; a broken pair on the next HUP is refused and the working
    one keeps serving."""
    echo = start_echo()
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    config = tmp_path / "gconn.conf"
    config.write_text(tls_route(echo.address, cert, key))
    daemon = start_daemon("-c", str(config))
    context = client_context(ca)
    old = context.wrap_socket(socket.create_connection(("127.0.0.1", daemon.port("tls")),
                                                       timeout=20), server_hostname="a.example")
    first_serial = old.getpeercert()["serialNumber"]
    new_cert, new_key = write_pair(ca, tmp_path, "a2", "a.example")
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    daemon.wait_contains("ready workers=1 generation=1", since=mark)
    fresh = fields(daemon.wait_contains("listening route=tls", since=mark))
    port = int(fresh["address"].rsplit(":", 1)[1])
    # the old worker's listener may share the port (SO_REUSEPORT): wait until it is closed
    daemon.wait_contains("refusing new connections", since=mark)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                             server_hostname="a.example") as new:
        assert new.getpeercert()["serialNumber"] != first_serial
    with old:
        old.sendall(b"still here")
        assert old.recv(100) == b"still here"
    with open(key, "w") as stream:
        stream.write("not a key\n")
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    line = daemon.wait_contains("reload failed", since=mark)
    assert "tls-cert" in line
    roundtrip(context, port, "a.example", size=100)


def test_a_destination_that_closes_first_sends_close_notify(start_daemon, ca, tmp_path):
    """The destination says goodbye and closes: the client reads the goodbye, then a clean
    TLS end (close_notify, not a truncation), and the access line says destination_closed."""
    destination = OneConnection(lambda connection: connection.sendall(b"bye\n"))
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    daemon = start_daemon(config=tls_route(destination.address, cert, key), tmp=str(tmp_path))
    with client_context(ca).wrap_socket(
            socket.create_connection(("127.0.0.1", daemon.port("tls")), timeout=20),
            server_hostname="a.example", suppress_ragged_eofs=False) as tls:
        received = b""
        while chunk := tls.recv(100):  # a bare FIN would raise SSLEOFError here
            received += chunk
        assert received == b"bye\n"
    destination.finish()
    line = fields(daemon.wait_line(lambda text: " end=" in text))
    assert line["end"] == "destination_closed" and line["bytes_down"] == "4"


# originating TLS: gconn connects to its destinations over TLS ----------------------------------

def plain_roundtrip(port, size=1 << 20):
    """A plain client through gconn to a TLS echo: (the tag line, whether ``size`` random
    bytes came back byte for byte)."""
    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        reader = client.makefile("rb")
        tag = reader.readline().decode().strip()
        received = bytearray()
        for offset in range(0, size, 64 * 1024):
            client.sendall(data[offset:offset + 64 * 1024])
            while len(received) < min(size, offset + 64 * 1024):
                part = reader.read1(65536)
                assert part, "closed early"
                received += part
        reader.close()
    return tag, hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_destination_tls_verifies_the_destination_and_carries_a_megabyte(
        start_daemon, tls_echo, ca, tmp_path):
    """destination-tls: a plain client reaches a TLS echo verified against the CA as
    db.internal; a destination whose certificate does not match fails over to the next one,
    with the OpenSSL reason in the access line."""
    wrong = tls_echo("wrong", "other.internal")
    right = tls_echo("right", "db.internal")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    daemon = start_daemon(config=(
        f"[gconn]\nworkers = 1\n[route:up]\nbind = 127.0.0.1:0\n"
        f"destinations = {wrong.address}, {right.address}\ndestination-tls = yes\n"
        f"destination-tls-ca = {tmp_path / 'ca.pem'}\n"
        f"destination-tls-server-name = db.internal\n"), tmp=str(tmp_path))
    since = daemon.mark()
    assert plain_roundtrip(daemon.port("up")) == ("right", True)
    line = daemon.wait_contains(f"destination {wrong.address} failed", since=since)
    assert "CERTIFICATE_VERIFY_FAILED" in line and "Hostname mismatch" in line


def test_destination_tls_presents_a_client_certificate(start_daemon, tls_echo, ca, tmp_path):
    """A destination requiring client certificates serves gconn with destination-tls-cert and
    refuses it without one (then the client is closed: connect_failed)."""
    server = tls_echo("mtls", "db.internal", client_ca=ca)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert, client_key = write_pair(ca, tmp_path, "gconn-client", "gconn.internal")
    base = (f"[gconn]\nworkers = 1\n[route:up]\nbind = 127.0.0.1:0\n"
            f"destinations = {server.address} tls=yes\n"
            f"destination-tls-ca = {tmp_path / 'ca.pem'}\n"
            f"destination-tls-server-name = db.internal\n")
    daemon = start_daemon(config=base + f"destination-tls-cert = {client_cert}\n"
                                        f"destination-tls-key = {client_key}\n",
                          tmp=str(tmp_path))
    assert plain_roundtrip(daemon.port("up"), size=1000) == ("mtls", True)
    bare = start_daemon(config=base, tmp=str(tmp_path))
    since = bare.mark()
    with socket.create_connection(("127.0.0.1", bare.port("up")), timeout=20) as client:
        client.settimeout(20)
        try:
            assert client.recv(100) == b""
        except ConnectionResetError:
            pass
    # TLS 1.3: the server checks the client's certificate after gconn's side of the handshake
    # is done, so its refusal arrives as an alert instead of the first bytes
    line = fields(bare.wait_line(lambda text: " end=" in text, since=since))
    assert line["end"] == "destination_closed" and "CERTIFICATE_REQUIRED" in line["error"]


def test_health_checks_complete_a_tls_handshake(start_daemon, tls_echo, ca, tmp_path):
    """With destination-tls, each check completes a handshake (the server counts them); a
    destination that cannot be verified is taken down by the checks."""
    good = tls_echo("good", "db.internal")
    bad = tls_echo("bad", "other.internal")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    daemon = start_daemon(config=(
        f"[gconn]\nworkers = 1\n[route:up]\nbind = 127.0.0.1:0\n"
        f"destinations = {good.address}, {bad.address}\ndestination-tls = yes\n"
        f"destination-tls-ca = {tmp_path / 'ca.pem'}\n"
        f"destination-tls-server-name = db.internal\ncheck-interval = 50ms\nfall = 2\n"),
        tmp=str(tmp_path))
    daemon.wait_contains(f"destination {bad.address} is down")
    deadline = time.monotonic() + 20
    while good.handshakes < 3:  # the good one keeps being checked, each a full handshake
        assert time.monotonic() < deadline, good.handshakes
        time.sleep(0.02)  # a counter in the server's threads: nothing to wait on
    assert not any(f"destination {good.address} is down" in line for line in daemon.lines)


def test_a_client_that_ends_first_gets_a_close_notify_back(start_daemon, ca, tmp_path):
    """The client sends, then its close_notify (unwrap); the destination reads to the end and
    closes; gconn ends the client's side with a close_notify too, so unwrap completes cleanly
    (a bare FIN would be a truncation) and every byte reached the destination."""
    got = []
    destination = OneConnection(
        lambda connection: got.append(b"".join(iter(lambda: connection.recv(65536), b""))))
    cert, key = write_pair(ca, tmp_path, "a", "a.example")
    daemon = start_daemon(config=tls_route(destination.address, cert, key), tmp=str(tmp_path))
    data = os.urandom(1 << 20)
    with client_context(ca).wrap_socket(
            socket.create_connection(("127.0.0.1", daemon.port("tls")), timeout=20),
            server_hostname="a.example") as tls:
        tls.sendall(data)
        tls.unwrap()  # raises SSLEOFError if gconn closed without a close_notify
    destination.finish()
    assert hashlib.sha256(got[0]).digest() == hashlib.sha256(data).digest()
