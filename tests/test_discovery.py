"""Destinations that follow DNS (issue 18, part 1), against a real authoritative DNS server on
loopback that the test starts and changes (built with dnspython): scale-out, scale-in with a
live stream verified to its end, DNS down keeping the last set, SRV priorities and weights."""

import hashlib
import os
import socket
import threading
import urllib.request

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from conftest import TagServer, connect, which_tag

PORT_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Zone:
    """A tiny authoritative DNS server on 127.0.0.1 (UDP): ``records`` maps (name, type) to
    record texts and may be changed while it runs; ``down`` makes it ignore queries."""

    def __init__(self):
        self.records = {}
        self.down = False
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                data, peer = self.socket.recvfrom(4096)
            except OSError:
                return
            if self.down:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            question = query.question[0]
            name = question.name.to_text()
            kind = dns.rdatatype.to_text(question.rdtype)
            texts = self.records.get((name, kind))
            if texts:
                response.answer.append(dns.rrset.from_text(name, 1, "IN", kind, *texts))
            elif not any(key[0] == name for key in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.socket.sendto(response.to_wire(), peer)

    def close(self):
        self.socket.close()


@pytest.fixture
def zone():
    made = Zone()
    yield made
    made.close()


@pytest.fixture
def backends():
    """One backend per PORT_HOSTS address, all on one port, each tagged with its address."""
    first = TagServer(PORT_HOSTS[0], host=PORT_HOSTS[0])
    made = [first] + [TagServer(host, first.port, host) for host in PORT_HOSTS[1:]]
    yield made
    for backend in made:
        backend.stop()


def tags(port, count=12):
    return {which_tag(port) for _ in range(count)}


def test_scale_out_scale_in_and_dns_down(zone, backends, start_daemon):
    """An address that appears takes connections; one that disappears takes no new one while
    a stream through it goes on whole to its end; with DNS down the last set keeps serving."""
    port = backends[0].port
    zone.records[("svc.test.", "A")] = ["127.0.0.2", "127.0.0.3"]
    daemon = start_daemon("--workers", "1", "--strategy", "round-robin", "--resolvers",
                          zone.address, "--resolve-interval", "200ms",
                          "--bind", "127.0.0.1:0", "--destination", f"dns:svc.test:{port}")
    daemon.wait_contains(f"destinations now 127.0.0.2:{port}, 127.0.0.3:{port}")
    assert tags(daemon.port()) == {"127.0.0.2", "127.0.0.3"}
    mark = daemon.mark()
    zone.records[("svc.test.", "A")] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    daemon.wait_contains(f"127.0.0.4:{port}", since=mark)
    assert tags(daemon.port()) == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    # scale-in: a stream through .2 goes on after .2 left DNS
    streams = [connect(daemon.port()) for _ in range(3)]
    readers = [stream.makefile("rb") for stream in streams]
    stream = next(s for s, r in zip(streams, readers, strict=True)
                  if r.readline().decode().strip() == "127.0.0.2")
    mark = daemon.mark()
    zone.records[("svc.test.", "A")] = ["127.0.0.3", "127.0.0.4"]
    daemon.wait_line(lambda line: "destinations now" in line and "127.0.0.2" not in line,
                     since=mark)
    assert tags(daemon.port()) == {"127.0.0.3", "127.0.0.4"}
    data = os.urandom(200_000)
    stream.sendall(data)
    stream.shutdown(socket.SHUT_WR)
    back = b"".join(iter(lambda: stream.recv(65536), b""))
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    for reader, client in zip(readers, streams, strict=True):
        reader.close()
        client.close()
    # DNS down: logged once, the last set keeps serving
    mark = daemon.mark()
    zone.down = True
    daemon.wait_contains("lookup failed, keeping the last 2 destinations", since=mark)
    assert tags(daemon.port()) == {"127.0.0.3", "127.0.0.4"}
    with urllib.request.urlopen(f"http://{daemon.admin}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    assert any(line.startswith('gconn_discovery_failures_total{route="default"}')
               and float(line.split()[-1]) >= 1 for line in scraped.splitlines())
    zone.down = False
    daemon.wait_contains("lookups answer again", since=mark)


def test_srv_priorities_are_backups_and_weights_share(zone, backends, start_daemon):
    """SRV: priority 10 weight 3 and weight 1 share new connections 3:1; priority 20 is a
    backup, used only when no primary connects."""
    port = backends[0].port
    zone.records[("_db._tcp.svc.test.", "SRV")] = [
        f"10 3 {port} a.svc.test.", f"10 1 {port} b.svc.test.", f"20 1 {port} c.svc.test."]
    for name, host in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")):
        zone.records[(f"{name}.svc.test.", "A")] = [host]
    daemon = start_daemon("--workers", "1", "--strategy", "round-robin-with-fallback",
                          "--resolvers", zone.address, "--resolve-interval", "200ms",
                          "--retry-interval", "1h", "--max-connect-errors", "0",
                          "--bind", "127.0.0.1:0", "--destination", "srv:_db._tcp.svc.test")
    daemon.wait_contains(f"127.0.0.4:{port}")
    seen = [which_tag(daemon.port()) for _ in range(16)]
    assert seen.count("127.0.0.2") == 12 and seen.count("127.0.0.3") == 4
    backends[0].stop()
    backends[1].stop()
    assert which_tag(daemon.port()) == "127.0.0.4"  # the primaries refuse: the backup serves
