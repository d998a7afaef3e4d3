"""SIGUSR2: the supervisor starts its program again with every listening socket; the new one
takes over once it serves (MAINPID to systemd), the old one drains and exits, and neither a
connect nor a live stream fails across it; a new one that cannot start leaves the old one."""

import hashlib
import json
import os
import re
import signal
import socket
import threading
import urllib.request

import pytest
from conftest import connect
from test_activation import DAEMON_ARGS, HANDOVER, Launched
from test_systemd import NotifyListener

STREAM = 2 * 1024 * 1024  # bytes each long stream sends, half before and half after
LOOPS = 8  # clients connecting back to back across the upgrade


class ConnectLoop:
    """Clients connecting and echoing one after the other until stopped; every failure kept."""

    def __init__(self, port):
        self.port = port
        self.done = 0
        self.failures = []
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.running.is_set():
            payload = os.urandom(64)
            try:
                with connect(self.port, timeout=10) as client:
                    client.sendall(payload)
                    received = b""
                    while len(received) < len(payload):
                        chunk = client.recv(64)
                        if not chunk:
                            raise ConnectionError("closed before the echo")
                        received += chunk
                    if received != payload:
                        raise ValueError("echo differs")
                self.done += 1
            except (OSError, ValueError) as error:
                self.failures.append(repr(error))

    def stop(self):
        self.running.clear()
        self.thread.join(20)
        return self.done, self.failures


class LongStream:
    """An echo stream begun before the upgrade and finished after it, every byte hashed."""

    def __init__(self, port):
        self.data = os.urandom(STREAM)
        self.client = connect(port, timeout=30)
        self.digest = hashlib.sha256()
        self.received = 0
        self.send_half(0)

    def send_half(self, half):
        chunk = self.data[half * STREAM // 2:(half + 1) * STREAM // 2]
        sender = threading.Thread(target=self.client.sendall, args=(chunk,), daemon=True)
        sender.start()
        target = (half + 1) * STREAM // 2
        while self.received < target:
            data = self.client.recv(65536)
            assert data, "stream cut"
            self.digest.update(data)
            self.received += len(data)
        sender.join(30)

    def finish(self):
        self.send_half(1)
        self.client.close()
        return self.digest.hexdigest() == hashlib.sha256(self.data).hexdigest()


def readyz(daemon):
    with urllib.request.urlopen(f"http://{daemon.admin}/readyz", timeout=10) as answer:
        return answer.status


@pytest.fixture
def listener():
    made = NotifyListener()
    yield made
    made.close()


def test_usr2_upgrade_refuses_no_client_and_cuts_no_stream(listener, start_echo,
                                                           start_daemon):
    """USR2 under a connect loop with long streams open: the new supervisor takes over (the
    old says MAINPID= for it, never STOPPING=1), the old drains its streams intact and exits
    0, the admin address stays, and not one connect fails."""
    echo = start_echo()
    daemon = start_daemon("--workers", "2", "--bind", "127.0.0.1:0", "--destination",
                          echo.address, env={"NOTIFY_SOCKET": listener.name})
    old = daemon.popen.pid
    port = daemon.port()
    listener.wait(lambda fields: fields.get("READY") == "1")
    streams = [LongStream(port) for _ in range(4)]
    loops = [ConnectLoop(port) for _ in range(LOOPS)]
    mark = daemon.mark()
    daemon.signal(signal.SIGUSR2)
    line = daemon.wait_contains("upgraded: supervisor pid=", since=mark)
    new = int(re.search(r"pid=(\d+)", line).group(1))
    _, handed = listener.wait(lambda fields: "MAINPID" in fields)
    assert handed["MAINPID"] == str(new)
    assert readyz(daemon) == 200  # the same admin address, answered by the new supervisor
    assert all(stream.finish() for stream in streams)
    assert daemon.popen.wait(timeout=30) == 0  # the old supervisor, once its workers drained
    results = [loop.stop() for loop in loops]
    failures = [failure for _, found in results for failure in found]
    assert not failures and all(done for done, _ in results), failures[:5]
    os.kill(new, 0)  # the new supervisor runs on
    with connect(port) as client:
        client.sendall(b"after")
        assert client.recv(5) == b"after"
    pids = {pid for pid, _, fields in listener.messages}
    assert pids <= {old, new}
    assert not any("STOPPING" in fields for _, _, fields in listener.messages)
    assert any(pid == old and "MAINPID" in fields for pid, _, fields in listener.messages)
    os.kill(new, signal.SIGTERM)  # stops like any gconn: its STOPPING=1 is its own
    listener.wait(lambda fields: "STOPPING" in fields)
    assert {pid for pid, _, fields in listener.messages if "STOPPING" in fields} == {new}


def test_failed_upgrade_leaves_the_old_supervisor_serving(tmp_path, listener, start_echo,
                                                          start_daemon):
    """A new supervisor that cannot start (its config is broken now) ends; the old one logs
    the failure, keeps serving and ready, and says nothing to systemd about it."""
    echo = start_echo()
    config = tmp_path / "gconn.conf"
    config.write_text(f"[route:default]\nbind = 127.0.0.1:0\ndestinations = {echo.address}\n")
    daemon = start_daemon("-c", str(config), "--workers", "1",
                          env={"NOTIFY_SOCKET": listener.name})
    listener.wait(lambda fields: fields.get("READY") == "1")
    config.write_text("[route:default]\nbind = 127.0.0.1:0\n")
    mark = daemon.mark()
    daemon.signal(signal.SIGUSR2)
    daemon.wait_contains("upgrade failed: new supervisor pid=", since=mark)
    assert readyz(daemon) == 200
    with connect(daemon.port()) as client:
        client.sendall(b"still")
        assert client.recv(5) == b"still"
    assert not any("MAINPID" in fields for _, _, fields in listener.messages)
    assert {pid for pid, _, _ in listener.messages} == {daemon.popen.pid}


def test_upgrade_keeps_the_sockets_systemd_gave(tmp_path, processes, start_echo):
    """Under socket activation the inherited socket is handed on with its name: the new
    supervisor serves the route from it and the old one exits."""
    echo = start_echo()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(64)
    port = holder.getsockname()[1]
    try:
        launched = Launched(["-c", HANDOVER, str(holder.fileno()), "front", *DAEMON_ARGS,
                             "--workers", "1", "--route-name", "front", "--bind",
                             "127.0.0.1:0", "--destination", echo.address],
                            pass_fds=(holder.fileno(),))
        processes.append(launched)
        launched.wait_ready()
        holder.close()  # from now on only gconn holds the port
        mark = launched.mark()
        launched.signal(signal.SIGUSR2)
        launched.wait_contains("upgraded: supervisor pid=", since=mark)
        launched.wait_contains("route=front serves the inherited socket name=front",
                               since=mark)
        assert launched.popen.wait(timeout=30) == 0  # the old one; the new one has the pipe
        with connect(port) as client:
            client.sendall(b"front")
            assert client.recv(5) == b"front"
        assert json.loads(urllib.request.urlopen(
            f"http://{launched.admin}/status", timeout=10).read())["routes"]["front"]
    finally:
        holder.close()
