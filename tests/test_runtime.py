"""Runtime control through the admin endpoint and ``gconn ctl`` (issue 18, part 3): drain,
maint, ready and weight of a destination, applied in every worker, kept over a reload and (with
state-file) over a restart; a blocked host lifted at once; POST only, token when configured."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import connect, which_tag
from test_shedding import bound_client, read_to_end


def ctl(daemon, *args):
    """Run ``gconn ctl`` against the daemon's admin endpoint: (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, "-m", "gconn", "ctl", "--admin", daemon.admin,
                             *args], capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout, result.stderr


def destination_flags(servers):
    return [flag for server in servers for flag in ("--destination",
                                                   f"127.0.0.1:{server.port}")]


def tagged_stream(port):
    """A connection through ``port`` whose tag was read: (socket, tag)."""
    client = connect(port)
    tag = b""
    while not tag.endswith(b"\n"):
        tag += client.recv(1)
    return client, tag.decode().strip()


def echoes_whole(client, size=100_000):
    """Whether ``size`` random bytes sent on ``client`` come back whole (SHA-256)."""
    data = os.urandom(size)
    client.sendall(data)
    back = b""
    while len(back) < size and (chunk := client.recv(65536)):
        back += chunk
    return hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


def test_drain_maint_ready_and_weight_through_gconn_ctl(tag_servers, start_daemon):
    """drain: new clients avoid d0 in both workers while a stream through it goes on whole;
    maint with a grace: that stream ends after it (end=maint); ready: d0 serves again;
    weight 3 on d1: three of every four new clients go there (one worker's turns)."""
    servers = tag_servers(2)
    d0 = f"127.0.0.1:{servers[0].port}"
    daemon = start_daemon("--workers", "2", "--strategy", "round-robin", "--bind", "127.0.0.1:0",
                          *destination_flags(servers))
    port = daemon.port()
    streams = [tagged_stream(port) for _ in range(4)]
    stream = next(client for client, tag in streams if tag == "d0")
    code, out, err = ctl(daemon, "drain", "default", d0)
    assert code == 0, err
    assert json.loads(out)["workers"] == 2
    assert {which_tag(port) for _ in range(12)} == {"d1"}
    assert echoes_whole(stream)  # a live connection to a drained destination goes on
    mark = daemon.mark()
    code, _, err = ctl(daemon, "maint", "default", d0, "--grace", "300ms")
    assert code == 0, err
    assert read_to_end(stream, timeout=10) == b""  # ended after the grace
    line = daemon.wait_contains("end=maint", since=mark)
    assert f"destination={d0}" in line
    code, _, err = ctl(daemon, "ready", "default", d0)
    assert code == 0, err
    assert "d0" in {which_tag(port) for _ in range(12)}
    status = json.loads(urllib.request.urlopen(f"http://{daemon.admin}/status").read())
    assert status["routes"]["default"]["destinations"][d0]["state"] == "ready"
    for client, _ in streams:
        client.close()


def test_weight_set_at_runtime_shares_new_connections(tag_servers, start_daemon):
    servers = tag_servers(2)
    daemon = start_daemon("--workers", "1", "--strategy", "round-robin", "--bind", "127.0.0.1:0",
                          *destination_flags(servers))
    code, _, err = ctl(daemon, "weight", "default", f"127.0.0.1:{servers[1].port}", "3")
    assert code == 0, err
    seen = [which_tag(daemon.port()) for _ in range(16)]
    assert seen.count("d1") == 12 and seen.count("d0") == 4


def test_a_state_set_at_runtime_is_kept_over_a_reload_and_a_restart(tmp_path, tag_servers,
                                                                     start_daemon):
    """drain d0, HUP: the new generation avoids d0 too; stop and start again with the same
    state-file: still drained, and /status says so."""
    servers = tag_servers(2)
    d0 = f"127.0.0.1:{servers[0].port}"
    state_file = tmp_path / "state.json"
    args = ("--workers", "1", "--strategy", "round-robin", "--bind", "127.0.0.1:0",
            "--state-file", str(state_file), *destination_flags(servers))
    daemon = start_daemon(*args)
    assert ctl(daemon, "drain", "default", d0)[0] == 0
    mark = daemon.mark()
    daemon.signal(signal.SIGHUP)
    daemon.wait_contains("ready workers=1 generation=1", since=mark)
    assert {which_tag(daemon.port()) for _ in range(6)} == {"d1"}
    daemon.stop()
    assert json.loads(state_file.read_text()) == [
        {"route": "default", "destination": d0, "state": "drain"}]
    again = start_daemon(*args)
    assert {which_tag(again.port()) for _ in range(6)} == {"d1"}
    status = json.loads(urllib.request.urlopen(f"http://{again.admin}/status").read())
    assert status["routes"]["default"]["destinations"][d0]["state"] == "drain"
    printed = subprocess.run([sys.executable, "-m", "gconn", "status", "--admin", again.admin],
                             capture_output=True, text=True, timeout=30).stdout
    assert f"{d0} 1/0 drain" in printed


def test_unblock_lifts_a_blocked_host_at_once(tag_servers, start_daemon):
    (server,) = tag_servers(1)
    daemon = start_daemon("--workers", "1", "--max-connect-errors", "2", "--blocked-host-time",
                          "1h", "--shed-message", "BLOCKED", "--bind", "127.0.0.1:0",
                          "--destination", f"127.0.0.1:{server.port}")
    port = daemon.port()
    for _ in range(2):
        mark = daemon.mark()
        bound_client("127.0.0.2", port).close()  # connected, gone without a byte: a failure
        daemon.wait_contains("client=127.0.0.2", since=mark)
    daemon.wait_contains("client host 127.0.0.2 blocked")
    with bound_client("127.0.0.2", port) as client:
        assert read_to_end(client) == b"BLOCKED"
    code, out, err = ctl(daemon, "unblock", "default", "127.0.0.2")
    assert code == 0, err
    assert json.loads(out)["answers"] == [{"unblocked": True}]
    with bound_client("127.0.0.2", port) as client:
        assert client.recv(10) == b"d0\n"


def post(daemon, path, data=None, token=None, method="POST"):
    request = urllib.request.Request(f"http://{daemon.admin}{path}", method=method,
                                     data=None if data is None else data.encode())
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_changes_are_post_only_checked_and_need_the_token(tmp_path, start_echo, start_daemon):
    echo = start_echo()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    daemon = start_daemon("--workers", "1", "--admin-token-file", str(token_file),
                          "--bind", "127.0.0.1:0", "--destination", echo.address)
    path = f"/destinations/default/{echo.address}"
    assert post(daemon, path, "state=drain")[0] == 401  # a token is configured: even loopback
    assert post(daemon, path, token="s3cret", method="GET")[0] == 405
    for data, message in (("state=off", "state must be one of"),
                          ("weight=300", "weight must be a whole number"),
                          ("", "expected state="),
                          ("state=maint&grace=soon", "grace:")):
        code, body = post(daemon, path, data, token="s3cret")
        assert code == 400 and message in body["error"], (data, body)
    code, body = post(daemon, "/destinations/default/127.0.0.1:1", "state=drain",
                      token="s3cret")
    assert code == 400 and "has no destination" in body["error"]
    code, body = post(daemon, path, "state=drain", token="s3cret")
    assert code == 200 and body["workers"] == 1
    result = subprocess.run([sys.executable, "-m", "gconn", "ctl", "--admin", daemon.admin,
                             "ready", "default", echo.address], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "answered 401" in result.stderr


@pytest.mark.parametrize("args", [["weight", "r", "d"], ["drain", "r", "d", "3"],
                                  ["launch", "r", "d"]])
def test_ctl_refuses_bad_arguments_with_exit_2(args):
    result = subprocess.run([sys.executable, "-m", "gconn", "ctl", *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_nothing_listens_is_exit_1(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "gconn", "ctl", "--admin",
                             f"127.0.0.1:{port}", "drain", "r", "d"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "cannot read" in result.stderr
