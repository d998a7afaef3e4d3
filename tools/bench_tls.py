"""tools/bench_tls.py: gconn terminating TLS beside HAProxy terminating it the same way
(``bind ... ssl crt``), one worker / one thread each, pinned to one core, side by side in one
run, as ratios.

    python tools/bench_tls.py [--runs 3] [--seconds 10] [--megabytes 512]

Figures, each the median of ``--runs`` alternating runs:
- new TLS handshakes per proxy-CPU-second: ``openssl s_time -new`` (full handshakes, TLS 1.3,
  ECDHE X25519, the same ECDSA P-256 certificate) through the proxy to gconn-echo, counted by
  s_time, divided by the CPU seconds the proxy used meanwhile;
- one-stream Gbit/s: one Python TLS client sends ``--megabytes`` through the proxy to a
  plain discarding sink.
With ``--passthrough``, the same two figures for gconn forwarding TLS untouched, once as a
plain TCP route (``gconn-tcp``) and once picked by server name (``gconn-sni``: it reads the
ClientHello first): the ratio sni/tcp is what routing by name costs (the issue's bar: within
10 %).  Their connection figure is new connections per proxy-CPU-second with ``--clients``
concurrent clients (as gconn-bench's new-connection figure) that each send a real ClientHello
(recorded from Python's ssl, server name bench.example) and read it back from gconn-echo: the
bytes a route picked by name reads, parses and forwards, without a TLS peer on the load core
that would leave the proxy idle between connections.  Their stream figure is one TLS stream
through them to an HAProxy that terminates it on the other core.
"""

import argparse
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import trustme

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402
    LOAD_CPU,
    PROXY_CPU,
    cpu_seconds,
    free_port,
    gconn_command,
    haproxy_config,
    pinned,
    wait_port,
)

CHUNK = 1024 * 1024  # bytes per sendall of the throughput client


class Sink:
    """A plain server on 127.0.0.1 that reads and drops everything, and says when ``goal``
    bytes have come (what a one-stream run waits for: delivered, not just sent)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.goal = None
        self.done = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def expect(self, goal):
        self.received, self.goal = 0, goal
        self.done.clear()

    def drain(self, connection):
        with connection:
            try:
                while data := connection.recv(1 << 20):
                    self.received += len(data)
                    if self.goal is not None and self.received >= self.goal:
                        self.done.set()
            except ConnectionResetError:  # the proxy was stopped after the run: over anyway
                pass

    def serve(self):
        while True:
            connection, _ = self.listener.accept()
            threading.Thread(target=self.drain, args=(connection,), daemon=True).start()

def start_proxy(peer, scratch, cert, key, pem, target, cpu=PROXY_CPU):
    """gconn or HAProxy terminating TLS on a free port towards 127.0.0.1:target, or gconn
    passing it through (``gconn-tcp``, ``gconn-sni``)."""
    port = free_port()
    if peer.startswith("gconn"):
        command = gconn_command(port, target, *{
            "gconn": ["--tls-cert", cert, "--tls-key", key],
            "gconn-sni": ["--server-names", "bench.example"]}.get(peer, []))
    else:
        path = os.path.join(scratch, f"haproxy-{port}.cfg")
        with open(path, "w") as stream:
            stream.write(haproxy_config(port, target, f" ssl crt {pem}"))
        command = ["haproxy", "-db", "-f", path]
    process = subprocess.Popen(pinned(cpu, command), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    wait_port(port, process)
    return process, port


def handshakes_per_cpu_second(process, port, seconds, ca_file):
    """Full handshakes by openssl s_time per CPU second of the proxy."""
    before = cpu_seconds(process)
    output = subprocess.run(pinned(LOAD_CPU, [
        "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds),
        "-CAfile", ca_file]), capture_output=True, text=True, timeout=seconds + 60).stdout
    used = cpu_seconds(process) - before
    count = int(re.search(r"(\d+) connections in [\d.]+s", output).group(1))
    return count / used


def recorded_hello(context):
    """The ClientHello Python's ssl sends for bench.example (what a passthrough route reads)."""
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                           server_hostname="bench.example")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def hello_connections_per_cpu_second(process, port, seconds, clients, hello):
    """New connections per CPU second of the proxy, ``clients`` at a time, each sending
    ``hello`` and reading it back (checked byte for byte) from the echo behind the proxy."""
    before = cpu_seconds(process)
    output = subprocess.run(pinned(LOAD_CPU, [
        sys.executable, os.path.abspath(__file__), "--hello-clients", str(port), str(clients),
        str(seconds), hello.hex()]), capture_output=True, text=True, check=True,
        timeout=seconds + 60).stdout
    return int(output) / (cpu_seconds(process) - before)


def hello_clients(port, clients, seconds, hello):
    """The load of ``hello_connections_per_cpu_second`` (run in a process of its own):
    gevent's sockets, ``clients`` loops until ``seconds`` passed; prints the connection count.
    A hello that does not come back whole raises."""
    import gevent  # noqa: PLC0415 (only this load process runs a hub)
    from gevent import socket as green

    deadline = time.monotonic() + seconds
    count = 0

    def loop():
        nonlocal count
        while time.monotonic() < deadline:
            with green.create_connection(("127.0.0.1", port), timeout=20) as connection:
                connection.sendall(hello)
                back = b""
                while len(back) < len(hello) and (data := connection.recv(65536)):
                    back += data
                if back != hello:
                    raise RuntimeError(f"{len(back)} of {len(hello)} hello bytes came back")
                count += 1

    gevent.joinall([gevent.spawn(loop) for _ in range(clients)], raise_error=True)
    print(count)


def stream_gbits(port, megabytes, context, sink):
    """One TLS client sending ``megabytes`` through the proxy, until the sink has them all:
    Gbit/s."""
    data = os.urandom(CHUNK)
    sink.expect(megabytes * CHUNK)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=60),
                             server_hostname="bench.example") as tls:
        began = time.perf_counter()
        for _ in range(megabytes):
            tls.sendall(data)
        if not sink.done.wait(60):
            raise RuntimeError(f"the sink got {sink.received} of {megabytes * CHUNK} bytes")
        elapsed = time.perf_counter() - began
    return megabytes * CHUNK * 8 / elapsed / 1e9


def main():
    parser = argparse.ArgumentParser(prog="bench_tls.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--passthrough", action="store_true",
                        help="also gconn passing TLS through, by TCP route and by server name")
    parser.add_argument("--clients", type=int, default=50,
                        help="concurrent clients of the passthrough connection figure")
    parser.add_argument("--hello-clients", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.hello_clients:
        port, clients, seconds, hello = options.hello_clients
        return hello_clients(int(port), int(clients), float(seconds), bytes.fromhex(hello))
    peers = ["gconn", "haproxy"] + (["gconn-tcp", "gconn-sni"] if options.passthrough else [])
    ca = trustme.CA()
    issued = ca.issue_cert("bench.example")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    echo = subprocess.Popen([sys.executable, "-m", "gconn.echo", "--bind", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    echo_port = int(echo.stdout.readline().rsplit(":", 1)[1])
    discard = Sink()
    results = {peer: {"handshakes": [], "gbits": []} for peer in peers}
    terminators = []
    with tempfile.TemporaryDirectory() as scratch:
        cert, key, pem, ca_file = (os.path.join(scratch, name) for name in
                                   ("cert.pem", "key.pem", "both.pem", "ca.pem"))
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        issued.private_key_and_cert_chain_pem.write_to_path(pem)
        ca.cert_pem.write_to_path(ca_file)
        try:
            targets = {"sink": discard.port}
            if options.passthrough:  # HAProxy terminates the stream behind gconn passing it
                process, terminator = start_proxy("haproxy", scratch, cert, key, pem,
                                                  discard.port, cpu=LOAD_CPU)
                terminators.append(process)
                targets["tls-sink"] = terminator
            for run in range(options.runs):
                order = peers[run % len(peers):] + peers[:run % len(peers)]
                for peer in order:
                    through = "tls-" if peer in ("gconn-tcp", "gconn-sni") else ""
                    process, port = start_proxy(peer, scratch, cert, key, pem, echo_port)
                    try:
                        results[peer]["handshakes"].append(
                            hello_connections_per_cpu_second(
                                process, port, options.seconds, options.clients,
                                recorded_hello(context)) if through
                            else handshakes_per_cpu_second(process, port, options.seconds,
                                                           ca_file))
                    finally:
                        process.kill()
                        process.wait()
                    process, port = start_proxy(peer, scratch, cert, key, pem,
                                                targets[through + "sink"])
                    try:
                        results[peer]["gbits"].append(stream_gbits(port, options.megabytes,
                                                                   context, discard))
                    finally:
                        process.kill()
                        process.wait()
                    print(f"run {run + 1}/{options.runs} {peer}: "
                          f"{results[peer]['handshakes'][-1]:.0f} "
                          f"{'hello connections' if through else 'handshakes'} per CPU-s, "
                          f"{results[peer]['gbits'][-1]:.2f} Gbit/s", file=sys.stderr)
        finally:
            for process in [echo, *terminators]:
                process.kill()
                process.wait()
    medians = {peer: {key: statistics.median(values) for key, values in figures.items()}
               for peer, figures in results.items()}
    print("| proxy | new TLS handshakes (passthrough: hello connections) per proxy-CPU-s "
          "| TLS one-stream Gbit/s |")
    print("|---|---|---|")
    for peer, figures in medians.items():
        print(f"| {peer} | {figures['handshakes']:.0f} | {figures['gbits']:.2f} |")
    for name, first, second in (("gconn / HAProxy", "gconn", "haproxy"),
                                ("gconn-sni / gconn-tcp", "gconn-sni", "gconn-tcp")):
        if second in medians:
            print(f"| {name} | "
                  f"{medians[first]['handshakes'] / medians[second]['handshakes']:.2f}x | "
                  f"{medians[first]['gbits'] / medians[second]['gbits']:.2f}x |")


if __name__ == "__main__":
    main()
