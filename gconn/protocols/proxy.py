"""The PROXY protocol, versions 1 and 2 (HAProxy's doc/proxy-protocol.txt): parse and build.

All but the last function is pure: bytes and address text in, values out; no sockets. The
greenlet reading a client (``read_header``, at the end) asks ``needed`` how many more bytes to
read (never past the header, so no client payload is consumed), then calls ``parse``; the
greenlet connecting a destination sends ``build_v1`` or ``build_v2``. ``in_networks`` says
whether a peer is trusted to send a header at all: the spec requires receivers to take headers
from trusted proxies only.
"""

import ipaddress
import re
import socket
import struct
import time
from dataclasses import dataclass

from gconn.errors import DestinationUnavailable, GconnError
from gconn.sockets import receive_within, send_within

V1_MAX = 107  # longest v1 line with CRLF: "PROXY UNKNOWN", two full IPv6 addresses, two ports
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # v2 bytes before the address block: signature, version+command, family, length
V2_MAX = V2_FIXED + 0xFFFF  # the v2 length field is 16 bits
ACCEPT = ("v1", "v2", "any")  # header versions a listener may accept

_V1_PREFIX = b"PROXY "
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_V1_PRINTABLE = bytes(range(0x20, 0x7F))  # what a v1 line may hold before its CRLF
# decimal, no sign, no leading zero: the spec forbids them to avoid octal confusion
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")

_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}  # low nibble of the 13th v2 byte
# v2 family/transport bytes gconn accepts, with the address part each puts before the TLVs
_FAMILIES = {0x00: ("unknown", 0), 0x11: ("tcp4", 12), 0x21: ("tcp6", 36), 0x31: ("unix", 216)}
_DATAGRAM = (0x12, 0x22, 0x32)  # UDP and unix datagrams: valid v2, but gconn forwards streams
_UNIX_PATH = 108  # bytes of each NUL-padded unix address (sun_path)
_TLV_HEADER = 3  # TLV type byte and 2-byte value length
_SHOWN = 24  # characters of a bad field an error message quotes: it is a log field, not a dump


class ProxyHeaderError(GconnError, ValueError):
    """A client sent a malformed PROXY header; the message says what is wrong in a few words."""


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header says about the client's original connection.

    ``source`` and ``destination`` are ``(host, port)`` for tcp4/tcp6, a path for unix, and
    None for unknown (v1 UNKNOWN, v2 AF_UNSPEC, every LOCAL): the caller then keeps the real
    endpoints.  ``tlvs`` holds v2's ``(type, value)`` pairs in header order, unvalidated.
    """

    version: int
    command: str
    family: str
    source: tuple[str, int] | str | None
    destination: tuple[str, int] | str | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


def needed(data, accept):
    """How many more bytes ``parse`` needs after ``data``: 0 when it can decide now.

    Never counts past the end of the header, so the caller may read exactly that many without
    consuming client payload.  v1 ends at its CRLF, so it is asked for one byte at a time.
    Raises ProxyHeaderError as soon as ``data`` cannot start a header of an accepted version.
    """
    version = _version(data, accept)
    if version == 1:
        return 0 if _v1_length(data) else 1
    if version == 2:
        total = _v2_length(data)
        return V2_FIXED - len(data) if total is None else max(0, total - len(data))
    return V2_FIXED if accept == "v2" else 1


def parse(data, accept):
    """The header at the start of ``data`` as ``(ProxyInfo, its length in bytes)``.

    Bytes after the header (client payload) are left alone.  Raises ProxyHeaderError for a
    malformed or incomplete header, or one of a version ``accept`` does not allow.
    """
    version = _version(data, accept)
    if version == 1:
        length = _v1_length(data)
        if length is None:
            raise ProxyHeaderError("incomplete v1 header: no CRLF")
        return _parse_v1(data[:length - 2].decode("ascii")), length
    if version == 2:
        total = _v2_length(data)
        if total is None or len(data) < total:
            raise ProxyHeaderError(f"truncated v2 header: {len(data)} of {total or V2_FIXED} bytes")
        return _parse_v2(data[:total]), total
    raise ProxyHeaderError("empty PROXY header")


def _version(data, accept):
    """The header version ``data`` starts (1 or 2), None while empty; checks ``accept``."""
    if accept not in ACCEPT:
        raise ValueError(f"accept must be one of {', '.join(ACCEPT)}, not {accept!r}")
    if not data:
        return None
    if data[0] == _V1_PREFIX[0]:
        version = 1
    elif data[0] == V2_SIGNATURE[0]:
        version = 2
    else:
        raise ProxyHeaderError("not a PROXY protocol header")
    if accept not in ("any", f"v{version}"):
        raise ProxyHeaderError(f"v{version} header where only {accept} is accepted")
    return version


def _v1_length(data):
    """The v1 line's length with its CRLF, None until the CRLF arrives.

    Checks what has arrived so far (prefix, protocol word, printable ASCII, CR only before LF,
    the 107-byte bound) so a bad line is refused before the caller reads any further.
    """
    window = data[:V1_MAX]
    if not _V1_PREFIX.startswith(window[:len(_V1_PREFIX)]):
        raise ProxyHeaderError("v1 header does not start with 'PROXY '")
    start = len(_V1_PREFIX)
    if not any(word.startswith(window[start:start + len(word)]) for word in _V1_PROTOCOLS):
        raise ProxyHeaderError("unknown v1 protocol")
    cr = window.find(b"\r")
    line = window if cr < 0 else window[:cr]
    if b"\n" in line:
        raise ProxyHeaderError("v1 line ends in LF without CR")
    if line.translate(None, _V1_PRINTABLE):
        raise ProxyHeaderError("control or non-ASCII byte in v1 line")
    if cr < 0 and len(data) < V1_MAX:
        return None
    if cr < 0 or cr + 2 > V1_MAX:
        raise ProxyHeaderError(f"v1 line longer than {V1_MAX} bytes")
    if cr + 1 == len(data):
        return None
    if data[cr + 1] != ord("\n"):
        raise ProxyHeaderError("v1 line has CR without LF")
    return cr + 2


def _parse_v1(line):
    """A complete v1 line (printable ASCII, CRLF removed) as ProxyInfo."""
    if line == "PROXY UNKNOWN" or line.startswith("PROXY UNKNOWN "):
        return ProxyInfo(1, "PROXY", "unknown", None, None)  # the spec: ignore the rest
    fields = line.split(" ")
    if "" in fields:
        raise ProxyHeaderError("v1 fields not separated by single spaces")
    if fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("unknown v1 protocol")
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1 {fields[1]} line has {len(fields)} fields, not 6")
    _, protocol, source, destination, source_port, destination_port = fields
    return ProxyInfo(1, "PROXY", protocol.lower(),
                     (_v1_host(protocol, "source", source), _v1_port("source", source_port)),
                     (_v1_host(protocol, "destination", destination),
                      _v1_port("destination", destination_port)))


def _v1_host(protocol, role, text):
    """A v1 address field as canonical text; TCP4 must be IPv4 and TCP6 IPv6, no scope id."""
    kind = ipaddress.IPv4Address if protocol == "TCP4" else ipaddress.IPv6Address
    try:
        address = kind(text)
    except ValueError:
        address = None
    if address is None or "%" in text:  # ipaddress takes "fe80::1%eth0"; inet_pton does not
        raise ProxyHeaderError(f"bad {protocol} {role} address {_shown(text)}")
    return str(address)


def _v1_port(role, text):
    """A v1 port field as an int: decimal 0-65535, no sign, no leading zero."""
    if not _PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"bad {role} port {_shown(text)}")
    return int(text)


def _v2_length(data):
    """The v2 header's total length once its 16 fixed bytes are in, None before.

    Checks each fixed byte as it arrives (signature, version, command, family) and, for a
    PROXY command, that the length covers the family's address part.
    """
    head = data[:V2_FIXED]
    if not V2_SIGNATURE.startswith(head[:len(V2_SIGNATURE)]):
        raise ProxyHeaderError("bad v2 signature")
    if len(head) > 12:
        if head[12] >> 4 != 2:
            raise ProxyHeaderError(f"bad v2 version {head[12] >> 4}")
        if head[12] & 0x0F not in _COMMANDS:
            raise ProxyHeaderError(f"bad v2 command {head[12] & 0x0F}")
    if len(head) > 13:
        if head[13] in _DATAGRAM:
            raise ProxyHeaderError(f"v2 datagram transport 0x{head[13]:02x} not supported")
        if head[13] not in _FAMILIES:
            raise ProxyHeaderError(f"bad v2 family/transport 0x{head[13]:02x}")
    if len(head) < V2_FIXED:
        return None
    length = int.from_bytes(head[14:16], "big")
    family, size = _FAMILIES[head[13]]
    if _COMMANDS[head[12] & 0x0F] == "PROXY" and length < size:
        raise ProxyHeaderError(f"truncated v2 {family} address block: {length} of {size} bytes")
    return V2_FIXED + length


def _parse_v2(header):
    """A complete, fixed-part-checked v2 header as ProxyInfo.

    LOCAL ignores the family, as the spec says: with AF_UNSPEC the block is all TLVs (what
    HAProxy's health checks send), with another family the block is skipped unread.
    """
    family, size = _FAMILIES[header[13]]
    block = header[V2_FIXED:]
    if _COMMANDS[header[12] & 0x0F] == "LOCAL":
        return ProxyInfo(2, "LOCAL", "unknown", None, None,
                         _tlvs(block) if family == "unknown" else ())
    if family == "tcp4":
        source, destination, source_port, destination_port = struct.unpack("!4s4sHH", block[:12])
        source = (str(ipaddress.IPv4Address(source)), source_port)
        destination = (str(ipaddress.IPv4Address(destination)), destination_port)
    elif family == "tcp6":
        source, destination, source_port, destination_port = struct.unpack("!16s16sHH", block[:36])
        source = (str(ipaddress.IPv6Address(source)), source_port)
        destination = (str(ipaddress.IPv6Address(destination)), destination_port)
    elif family == "unix":
        source, destination = _unix_path(block[:_UNIX_PATH]), _unix_path(block[_UNIX_PATH:size])
    else:
        source = destination = None  # PROXY with AF_UNSPEC: the caller keeps the real ends
    return ProxyInfo(2, "PROXY", family, source, destination, _tlvs(block[size:]))


def _unix_path(raw):
    """A NUL-padded unix address as text; a Linux abstract name (leading NUL) as '@name'."""
    if raw[:1] == b"\0":
        return "@" + raw[1:].rstrip(b"\0").decode("utf-8", "backslashreplace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _tlvs(block):
    """The TLVs filling ``block`` as ``(type, value)`` pairs; one overrunning it is an error."""
    tlvs = []
    offset = 0
    while offset < len(block):
        if offset + _TLV_HEADER > len(block):
            raise ProxyHeaderError(f"truncated v2 TLV header at TLV byte {offset}")
        kind, length = struct.unpack_from("!BH", block, offset)
        end = offset + _TLV_HEADER + length
        if end > len(block):
            raise ProxyHeaderError(f"v2 TLV 0x{kind:02x} of {length} bytes overruns the header")
        tlvs.append((kind, bytes(block[offset + _TLV_HEADER:end])))
        offset = end
    return tuple(tlvs)


def build_v1(source, destination):
    """The v1 line announcing ``source`` -> ``destination`` (``(host, port)`` pairs).

    Both IPv4 (or IPv4-mapped) gives TCP4; otherwise TCP6, mapping an IPv4 end into IPv6.
    A missing end (a unix-socket client, a health check) gives "PROXY UNKNOWN".  Raises
    ValueError for a host that is not an IP address or a port outside 0-65535.
    """
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    (source_host, source_port), (destination_host, destination_port) = _endpoints(
        source, destination)
    protocol = "TCP4" if source_host.version == 4 else "TCP6"
    return (f"PROXY {protocol} {source_host} {destination_host} "
            f"{source_port} {destination_port}\r\n").encode("ascii")


def build_v2(source, destination, command="PROXY", tlvs=()):
    """The v2 header announcing ``source`` -> ``destination``, followed by ``tlvs``.

    Families are chosen as for build_v1 (AF_INET, else AF_INET6).  LOCAL, or a missing end,
    gives LOCAL with AF_UNSPEC and no address, as HAProxy sends for ends it cannot describe.
    Raises ValueError for a bad host, port, command or TLV, or a header over V2_MAX bytes.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"command must be PROXY or LOCAL, not {command!r}")
    block = b"".join(_tlv(kind, value) for kind, value in tlvs)
    if command == "LOCAL" or source is None or destination is None:
        return _v2(0x20, 0x00, block)
    (source_host, source_port), (destination_host, destination_port) = _endpoints(
        source, destination)
    family = 0x11 if source_host.version == 4 else 0x21
    address = source_host.packed + destination_host.packed
    return _v2(0x21, family, address + struct.pack("!HH", source_port, destination_port) + block)


def local_v2():
    """The v2 LOCAL header a health check sends: no address, the receiver uses the real ends."""
    return build_v2(None, None, command="LOCAL")


def _v2(version_command, family, block):
    """Signature, the two type bytes, the length and ``block``."""
    if len(block) > 0xFFFF:
        raise ValueError(f"v2 header block of {len(block)} bytes exceeds 65535")
    return V2_SIGNATURE + struct.pack("!BBH", version_command, family, len(block)) + block


def _tlv(kind, value):
    """One encoded TLV; ``kind`` 0-255, ``value`` up to 65535 bytes."""
    value = bytes(value)
    if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
        raise ValueError(f"TLV type {kind!r} with {len(value)} bytes is out of range")
    return struct.pack("!BH", kind, len(value)) + value


def _endpoints(source, destination):
    """Both ends as (address, port) of one family: IPv4 when both are, else both IPv6."""
    ends = [(_unmapped(host), _port(port)) for host, port in (source, destination)]
    if ends[0][0].version != ends[1][0].version:
        ends = [(_mapped(address), port) for address, port in ends]
    return ends


def _unmapped(host):
    """``host`` text as an address: IPv4-mapped IPv6 as plain IPv4, any IPv6 scope id dropped."""
    address = ipaddress.ip_address(host)
    if address.version == 6:
        return address.ipv4_mapped or ipaddress.IPv6Address(address.packed)
    return address


def _mapped(address):
    """An IPv4 address as IPv4-mapped IPv6 (::ffff:a.b.c.d); IPv6 unchanged."""
    if address.version == 4:
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address


def _port(port):
    """``port`` checked to be an int in 0-65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} is not an integer in 0-65535")
    return port


def _shown(text):
    """``text`` quoted and cut short for an error message."""
    return repr(text[:_SHOWN]) + ("..." if len(text) > _SHOWN else "")


def in_networks(host, networks):
    """Whether address text ``host`` is in any of ``networks`` (ipaddress network objects).

    An IPv4-mapped IPv6 peer (a dual-stack listener's view of an IPv4 client) matches IPv4
    networks, and an IPv4 peer matches ::ffff:0:0/96 networks.  Text that is not an IP address
    (a unix-socket peer) is in no network.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    plain = _unmapped(host)
    candidates = {address, plain, _mapped(plain)}
    return any(candidate in network for network in networks for candidate in candidates)


def parse_networks(text):
    """Comma-separated addresses and CIDR blocks as a tuple of ipaddress networks.

    Raises ValueError naming the bad item, including a block with host bits set
    ("10.0.0.1/8"), which is more likely a typo than a meant network.
    """
    if not text.strip():
        return ()
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(f"empty item in network list {text!r}")
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"bad network {item!r}: {exc}") from None
    return tuple(networks)


# the greenlet side ---------------------------------------------------------------------------

def read_header(sock, accept, timeout):
    """Read one PROXY header from the non-blocking ``sock`` in the calling greenlet, within
    ``timeout`` seconds, and consume exactly its bytes: what follows it stays in the kernel
    for the destination.  ProxyHeaderError when it is malformed, truncated, late or missing.

    The bytes are peeked, never read past the header: ``needed`` says when a prefix is not
    yet complete (then all of it is header, and it is consumed), ``parse`` how long the whole
    header is.  A header split over many segments, even a byte at a time, is waited for.
    """
    deadline = time.monotonic() + timeout
    limit = V1_MAX if accept == "v1" else V2_MAX
    header = b""
    while True:
        try:
            peeked = receive_within(sock, limit - len(header), deadline, socket.MSG_PEEK)
        except OSError as error:
            raise ProxyHeaderError(f"client failed before its PROXY header ended: "
                                   f"{error.strerror or error}") from None
        if peeked is None:
            came = f" ({len(header)} bytes came)" if header else ""
            raise ProxyHeaderError(f"no complete PROXY header within {timeout:g}s{came}")
        if not peeked:
            raise ProxyHeaderError("client closed before its PROXY header ended")
        data = header + peeked
        if needed(data, accept) == 0:
            info, length = parse(data, accept)
            _consume(sock, length - len(header))
            return info
        _consume(sock, len(peeked))
        header = data


def _consume(sock, count):
    """Read and drop ``count`` bytes already peeked (they are in the socket's buffer)."""
    while count > 0:
        chunk = sock.recv(count)
        if not chunk:
            raise ProxyHeaderError("client closed inside its PROXY header")
        count -= len(chunk)


def send_header(sock, header, timeout):
    """Write ``header`` to the freshly connected non-blocking ``sock`` in the calling greenlet
    before any client byte; DestinationUnavailable when it cannot within ``timeout``."""
    try:
        sent = send_within(sock, header, time.monotonic() + timeout)
    except OSError as error:
        raise DestinationUnavailable(f"sending the PROXY header: "
                                     f"{error.strerror or error}") from None
    if not sent:
        raise DestinationUnavailable(f"destination did not take the PROXY header within "
                                     f"{timeout:g}s")


def check_header(version):
    """What a health check sends to a destination that expects a PROXY header: a v2 LOCAL
    (the balancer speaking for itself) or v1 UNKNOWN."""
    return local_v2() if version == "v2" else build_v1(None, None)
