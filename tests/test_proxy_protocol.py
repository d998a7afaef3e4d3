"""The PROXY protocol's pure half: parse, build, incremental reads, trusted networks."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gconn.protocols.proxy import (
    ACCEPT,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyInfo,
    build_v1,
    build_v2,
    in_networks,
    local_v2,
    needed,
    parse,
    parse_networks,
)

PAYLOAD = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"  # client bytes after the header
SPEC_V1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"  # the spec's section 2.1 example
LONGEST_V1 = b"PROXY UNKNOWN " + b" ".join([b"ffff:" * 7 + b"ffff"] * 2) + b" 65535 65535\r\n"
# The spec gives no v2 byte example; these are HAProxy's regression tests, byte for byte
# (reg-tests/connection/proxy_protocol_tlv_validation.vtc client c1 and c3,
# reg-tests/stream/unique-id-from-proxy.vtc): TCP4 127.0.0.1:42 -> 127.0.0.1:1337 + one TLV.
# c4's header announces 20 block bytes but sends 19; the 20th is its request's "G".
HAPROXY_V2 = "0d0a0d0a000d0a515549540a 21 11 0014 7f000001 7f000001 002a 0539"
HAPROXY_AUTHORITY = bytes.fromhex(HAPROXY_V2 + "02 0005 3132333435")
HAPROXY_UNIQUE_ID = bytes.fromhex(HAPROXY_V2 + "05 0005 3132333435")
HAPROXY_OVERRUN = bytes.fromhex(HAPROXY_V2 + "02 000a 31323334353132333435")
HAPROXY_SHORT_TLV = bytes.fromhex(HAPROXY_V2 + "02 0004 31323334") + b"G"


def v2(command_family, block):
    """A hand-built v2 header: signature, version+command and family bytes, length, block."""
    return V2_SIGNATURE + command_family + len(block).to_bytes(2, "big") + block


def read_like_a_greenlet(stream, accept="any", one_byte=True):
    """Read ``stream`` as the caller will, asking needed() before every read; never overshoot."""
    header_length = parse(stream, accept)[1]
    data = b""
    while (more := needed(data, accept)) > 0:
        assert len(data) + more <= header_length, "needed() asked for client payload"
        data += stream[len(data):len(data) + (1 if one_byte else more)]
    assert len(data) == header_length
    return parse(data, accept)


@pytest.mark.parametrize("source, destination, family, expected", [
    (("192.0.2.1", 5000), ("198.51.100.7", 443), "tcp4",
     (("192.0.2.1", 5000), ("198.51.100.7", 443))),
    (("2001:DB8::1", 5000), ("2001:db8::2", 443), "tcp6",
     (("2001:db8::1", 5000), ("2001:db8::2", 443))),
    (("::ffff:192.0.2.1", 0), ("::ffff:198.51.100.7", 65535), "tcp4",
     (("192.0.2.1", 0), ("198.51.100.7", 65535))),
    (("192.0.2.1", 5000), ("2001:db8::2", 443), "tcp6",
     ((str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 5000), ("2001:db8::2", 443))),
])
@pytest.mark.parametrize("build", [build_v1, build_v2])
def test_build_then_parse_round_trips(build, source, destination, family, expected):
    """Built headers parse back; mapped IPv4 goes as TCP4, mixed families as TCP6."""
    header = build(source, destination)
    info, length = parse(header + PAYLOAD, "any")
    assert (info.family, (info.source, info.destination)) == (family, expected)
    assert info.version == (1 if build is build_v1 else 2) and info.command == "PROXY"
    assert length == len(header) and (header + PAYLOAD)[length:] == PAYLOAD


def test_unknown_and_local_headers():
    """A missing end gives v1 UNKNOWN and v2 LOCAL/AF_UNSPEC; parsed as unknown, no addresses."""
    assert build_v1(None, ("192.0.2.1", 80)) == b"PROXY UNKNOWN\r\n"
    assert local_v2() == build_v2(None, None) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), command="LOCAL") == local_v2()
    assert parse(b"PROXY UNKNOWN\r\n", "v1") == (ProxyInfo(1, "PROXY", "unknown", None, None), 15)
    assert parse(local_v2(), "v2") == (ProxyInfo(2, "LOCAL", "unknown", None, None), 16)


def test_tlvs_round_trip_in_order():
    """TLVs come back as (type, value) pairs in header order, empty values included."""
    tlvs = ((0x02, b"example.com"), (0x05, b"\x00" * 128), (0xE0, b""))
    info, _ = parse(build_v2(("2001:db8::1", 1), ("2001:db8::2", 2), tlvs=tlvs), "v2")
    assert info.tlvs == tlvs
    assert parse(build_v2(None, None, tlvs=tlvs), "v2")[0].tlvs == tlvs


def test_known_good_vectors():
    """The spec's v1 example and HAProxy's v2 regression-test headers parse as documented."""
    assert parse(SPEC_V1 + PAYLOAD, "v1") == (
        ProxyInfo(1, "PROXY", "tcp4", ("192.168.0.1", 56324), ("192.168.0.11", 443)), 47)
    for vector, kind in ((HAPROXY_AUTHORITY, 0x02), (HAPROXY_UNIQUE_ID, 0x05)):
        assert parse(vector + PAYLOAD, "any") == (ProxyInfo(
            2, "PROXY", "tcp4", ("127.0.0.1", 42), ("127.0.0.1", 1337), ((kind, b"12345"),)), 36)
    assert build_v2(("127.0.0.1", 42), ("127.0.0.1", 1337), tlvs=[(2, b"12345")]) \
        == HAPROXY_AUTHORITY


def test_v2_families_the_caller_keeps_real_ends_for():
    """LOCAL ignores its address block; PROXY with AF_UNSPEC has no addresses but has TLVs."""
    local_with_address = v2(b"\x20\x11", bytes(12))
    assert parse(local_with_address, "v2")[0] == ProxyInfo(2, "LOCAL", "unknown", None, None)
    unspec = v2(b"\x21\x00", b"\x04\x00\x01\x00")
    assert parse(unspec, "v2")[0] == ProxyInfo(2, "PROXY", "unknown", None, None, ((4, b"\0"),))


def test_v2_unix_paths():
    """AF_UNIX addresses are NUL-padded 108-byte paths; a leading NUL is an abstract name."""
    block = b"/run/client.sock".ljust(108, b"\0") + b"\0gconn".ljust(108, b"\0")
    info, _ = parse(v2(b"\x21\x31", block), "v2")
    assert (info.family, info.source, info.destination) == ("unix", "/run/client.sock", "@gconn")


def test_v1_unknown_ignores_the_rest_of_the_line():
    """After UNKNOWN anything up to CRLF is ignored, even the longest 107-byte line."""
    assert len(LONGEST_V1) == V1_MAX
    assert parse(LONGEST_V1 + PAYLOAD, "any") == (
        ProxyInfo(1, "PROXY", "unknown", None, None), V1_MAX)


@pytest.mark.parametrize("one_byte", [True, False])
@pytest.mark.parametrize("header", [
    SPEC_V1, LONGEST_V1, b"PROXY UNKNOWN\r\n", build_v1(("2001:db8::1", 1), ("2001:db8::2", 2)),
    HAPROXY_AUTHORITY, local_v2(), build_v2(("2001:db8::1", 1), ("::1", 2), tlvs=[(1, b"h2")]),
])
def test_needed_reads_exactly_the_header(header, one_byte):
    """needed() never asks past the header, byte by byte or as asked; payload stays unread."""
    info, length = read_like_a_greenlet(header + PAYLOAD, one_byte=one_byte)
    assert (info, length) == parse(header, "any") and length == len(header)


BAD_V1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 "
MALFORMED = [
    (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    (V2_SIGNATURE[:4] + b"\x01", "bad v2 signature"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c", "bad v2 version 3"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c", "bad v2 command 2"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c", "bad v2 family/transport 0x41"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c", "datagram transport 0x12"),
    (v2(b"\x21\x11", bytes(4)), "truncated v2 tcp4 address block: 4 of 12 bytes"),
    (v2(b"\x21\x21", bytes(12)), "truncated v2 tcp6 address block: 12 of 36 bytes"),
    (HAPROXY_OVERRUN, "TLV 0x02 of 10 bytes overruns the header"),
    (HAPROXY_SHORT_TLV, "truncated v2 TLV header"),
    (b"PROXY UNKNOWN " + b"f" * 100, "v1 line longer than 107 bytes"),
    (b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n", "unknown v1 protocol"),
    (b"PROXI TCP4", "does not start with 'PROXY '"),
    (BAD_V1 + b"65536 80\r\n", "bad source port '65536'"),
    (BAD_V1 + b"+80 80\r\n", "bad source port '+80'"),
    (BAD_V1 + b"80 080\r\n", "bad destination port '080'"),
    (b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "bad TCP4 source address '2001:db8::1'"),
    (b"PROXY TCP6 ::1 192.0.2.2 1 2\r\n", "bad TCP6 destination address '192.0.2.2'"),
    (b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "bad TCP4 source address"),
    (BAD_V1 + b"1  2\r\n", "single spaces"),
    (BAD_V1 + b"1\r\n", "has 5 fields"),
    (BAD_V1 + b"1 2\n", "LF without CR"),
    (BAD_V1 + b"1 2\rX", "CR without LF"),
    (BAD_V1 + b"1 \xff\r\n", "non-ASCII"),
]


@pytest.mark.parametrize("header, message", MALFORMED)
def test_malformed_headers_say_what_is_wrong(header, message):
    """Each malformed header raises ProxyHeaderError with a short message naming the fault."""
    with pytest.raises(ProxyHeaderError, match=message.replace("+", r"\+")) as caught:
        data = b""
        while needed(data, "any") and len(data) < len(header):
            data += header[len(data):len(data) + 1]
        parse(data, "any")
    assert len(str(caught.value)) < 80


def test_incomplete_headers_are_refused_by_parse():
    """parse() on a header cut short says so instead of guessing."""
    with pytest.raises(ProxyHeaderError, match="incomplete v1 header"):
        parse(SPEC_V1[:-2], "v1")
    with pytest.raises(ProxyHeaderError, match="truncated v2 header: 20 of 36 bytes"):
        parse(HAPROXY_AUTHORITY[:20], "v2")


def test_accept_restricts_versions_from_the_first_byte():
    """A header of a version the listener does not accept is refused on its first byte."""
    assert needed(b"", "v1") == needed(b"", "any") == 1 and needed(b"", "v2") == 16
    with pytest.raises(ProxyHeaderError, match="v2 header where only v1 is accepted"):
        needed(b"\r", "v1")
    with pytest.raises(ProxyHeaderError, match="v1 header where only v2 is accepted"):
        needed(b"P", "v2")
    with pytest.raises(ValueError, match="accept must be one of"):
        needed(b"P", "v3")


def test_in_networks_matches_mapped_peers():
    """A dual-stack listener's ::ffff:a.b.c.d peer matches IPv4 networks, and back."""
    trusted = parse_networks("127.0.0.0/8, ::1, 10.0.0.0/8")
    assert in_networks("::ffff:10.1.2.3", trusted) and in_networks("10.1.2.3", trusted)
    assert in_networks("::1", trusted) and in_networks("127.0.0.1", trusted)
    assert not in_networks("::ffff:192.0.2.1", trusted) and not in_networks("::2", trusted)
    assert not in_networks("/run/gconn.sock", trusted)
    assert in_networks("192.0.2.1", parse_networks("::ffff:0:0/96"))


@pytest.mark.parametrize("text, message", [
    ("10.0.0.0/8, nonsense", "bad network 'nonsense'"),
    ("10.0.0.1/8", "bad network '10.0.0.1/8': .*host bits set"),
    ("10.0.0.0/8,, ::1", "empty item"),
])
def test_parse_networks_names_the_bad_item(text, message):
    """parse_networks refuses a bad item by name; an empty list is no networks."""
    with pytest.raises(ValueError, match=message):
        parse_networks(text)
    assert parse_networks("  ") == ()


VALID = [SPEC_V1, LONGEST_V1, HAPROXY_AUTHORITY, local_v2(), v2(b"\x21\x31", bytes(216))]
mutated = st.builds(lambda header, index, byte, tail: (
    header[:index % len(header)] + bytes([byte]) + header[index % len(header) + 1:] + tail),
    st.sampled_from(VALID), st.integers(0, 300), st.integers(0, 255), st.binary(max_size=20))
junk = st.one_of(st.binary(max_size=200), st.binary().map(V2_SIGNATURE.__add__),
                 st.binary().map(b"PROXY ".__add__), mutated)


@settings(max_examples=500, deadline=None)
@given(junk, st.sampled_from(ACCEPT))
def test_random_bytes_raise_only_proxy_header_error(data, accept):
    """Whatever a client sends, needed/parse answer or raise ProxyHeaderError, nothing else."""
    try:
        more = needed(data, accept)
        info, length = parse(data, accept)
    except ProxyHeaderError:
        return
    assert more == 0 and 0 < length <= len(data) and info.version in (1, 2)


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


def announced(address):
    """What a header should announce for ``address``: IPv4-mapped IPv6 as plain IPv4."""
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address


@settings(deadline=None)
@given(addresses, st.integers(0, 65535), addresses, st.integers(0, 65535),
       st.sampled_from([build_v1, build_v2]))
def test_random_addresses_round_trip(source, source_port, destination, destination_port, build):
    """Any IPv4/IPv6 pair and ports come back from parse as built, in one family."""
    ends = [announced(source), announced(destination)]
    if ends[0].version != ends[1].version:
        ends = [ipaddress.IPv6Address(f"::ffff:{end}") if end.version == 4 else end
                for end in ends]
    header = build((str(source), source_port), (str(destination), destination_port))
    info, length = parse(header + PAYLOAD, "any")
    assert info.family == f"tcp{ends[0].version}" and length == len(header)
    assert info.source == (str(ends[0]), source_port)
    assert info.destination == (str(ends[1]), destination_port)
