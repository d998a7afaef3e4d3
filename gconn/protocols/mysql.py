"""The MySQL classic protocol, as far as gconn speaks it: refusals and polite health checks.

A refused client of a ``protocol = mysql`` route gets an error packet as the server's first
packet: 1040 when the route is full and 1129 for a blocked host, as MySQL Router sends them,
and 9001 when no destination can be reached, as ProxySQL does.  MySQL Router sends 2003
there, but 2003 is a client-side code, and MariaDB's client library (Debian's ``mariadb``)
shows a server's 2002 or 2003 as "ERROR 2027 (HY000): Received malformed packet" while it
prints a 9001 with its message (both tried with mariadb 10.11).  Like any server before the
handshake, the packet carries no SQL state (the client has not said it speaks protocol 4.1),
so clients show HY000.  A health check reads the server's greeting and answers it with a
handshake response for ``check-user`` and a COM_QUIT, the way a client that connects and logs
out does: a bare connect-and-close counts as a failed handshake, and MySQL and MariaDB block
the checking host after ``max_connect_errors`` of those.  Pure halves first; the greenlet
side (``check``) at the end.
"""

import struct
import time

from gconn.errors import DestinationUnavailable
from gconn.sockets import receive_within, send_within

HEADER = 4  # bytes before every packet's payload: 3-byte little-endian length, sequence id
MAX_PACKET = 0xFFFFFF  # the longest payload one packet carries
GREETING_MAX = 1024  # bytes a check reads of a greeting (real ones are about 100)
PROTOCOL_10 = 10  # first payload byte of every greeting since MySQL 3.21
ERROR = 0xFF  # first payload byte of an error packet
OK = 0x00  # first payload byte of an OK packet
AUTH_SWITCH = 0xFE  # the server asks for another authentication method
COM_QUIT = b"\x01"  # the command a client ends its session with
CHARSET_UTF8 = 33  # utf8_general_ci: what the handshake response says it speaks

# capability flags of the check's handshake response (MySQL's include/mysql_com.h)
CLIENT_LONG_PASSWORD = 0x1
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000
CHECK_CAPABILITIES = (CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION
                      | CLIENT_PLUGIN_AUTH)

TOO_MANY_CONNECTIONS = 1040  # ER_CON_COUNT_ERROR, as MySQL Router sends it
HOST_BLOCKED = 1129  # ER_HOST_IS_BLOCKED, as MySQL Router sends it
CANNOT_CONNECT = 9001  # ProxySQL's "cannot reach a backend" (see above for why not 2003)


class MysqlError(ValueError):
    """Bytes that are not the MySQL packet expected."""


def refusal(reason, route, host, bind):
    """The error packet for a client refused for ``reason`` (an admission shed reason)."""
    if reason in ("queue_full", "queue_timeout"):
        return error_packet(TOO_MANY_CONNECTIONS, f"Too many connections to gconn route {route}")
    if reason == "host_limit":
        return error_packet(TOO_MANY_CONNECTIONS, f"Too many connections from host '{host}' "
                                                  f"to gconn route {route}")
    if reason == "host_rate":
        return error_packet(TOO_MANY_CONNECTIONS, f"Too many new connections per second from "
                                                  f"host '{host}' to gconn route {route}")
    if reason == "blocked_host":
        return error_packet(HOST_BLOCKED, f"Host '{host}' is blocked because of many "
                                          f"connection errors (gconn route {route})")
    return error_packet(CANNOT_CONNECT, f"Can't connect to remote MySQL server for client "
                                        f"connected to '{bind}' (gconn route {route}: no "
                                        f"destination available)")


def error_packet(code, message, sequence=0):
    """An ERR packet as a server sends it before the handshake: no SQL-state marker."""
    return packet(struct.pack("<BH", ERROR, code) + message.encode("utf-8"), sequence)


def packet(payload, sequence):
    """One packet: the 3-byte length, the sequence id, the payload."""
    if len(payload) > MAX_PACKET:
        raise ValueError("payload longer than one packet")
    return struct.pack("<I", len(payload))[:3] + bytes((sequence & 0xFF,)) + payload


def split(data):
    """(sequence, payload, rest) for the first whole packet in ``data``, or None if it has not
    all come yet."""
    if len(data) < HEADER:
        return None
    length = int.from_bytes(data[:3], "little")
    if len(data) < HEADER + length:
        return None
    return data[3], data[HEADER:HEADER + length], data[HEADER + length:]


def parse_error(payload):
    """(code, message) of an ERR packet's payload, with or without the SQL-state marker."""
    if len(payload) < 3 or payload[0] != ERROR:
        raise MysqlError("not an error packet")
    code = int.from_bytes(payload[1:3], "little")
    message = payload[3:]
    if message[:1] == b"#":
        message = message[6:]
    return code, message.decode("utf-8", "replace")


def parse_greeting(payload):
    """The server version of a greeting's payload; MysqlError for an error packet or bytes
    that are not a protocol-10 greeting."""
    if payload[:1] == bytes((ERROR,)):
        code, message = parse_error(payload)
        raise MysqlError(f"server refused: {code} {message}")
    if payload[:1] != bytes((PROTOCOL_10,)) or b"\x00" not in payload[1:]:
        raise MysqlError("not a MySQL greeting")
    return payload[1:payload.index(b"\x00", 1)].decode("ascii", "replace")


def handshake_response(user):
    """A HandshakeResponse41 for ``user`` with an empty password and no schema (sequence 1)."""
    payload = (struct.pack("<IIB", CHECK_CAPABILITIES, MAX_PACKET, CHARSET_UTF8) + bytes(23)
               + user.encode("utf-8") + b"\x00" + b"\x00" + b"mysql_native_password\x00")
    return packet(payload, 1)


# the greenlet side ---------------------------------------------------------------------------

def check(sock, user, timeout):
    """A health check's conversation on the freshly connected non-blocking ``sock``: read the
    greeting, log in as ``user`` with an empty password, quit; all within ``timeout``.  An
    answer to the login either way (OK, or access denied) proves the server serves;
    DestinationUnavailable when the greeting is an error (too many connections, a blocked
    host), the bytes are not MySQL, or the server falls silent.  The caller closes ``sock``."""
    deadline = time.monotonic() + timeout
    try:
        parse_greeting(_read_packet(sock, deadline)[1])
        _send(sock, handshake_response(user), deadline)
        sequence, reply = _read_packet(sock, deadline)
        if reply[:1] == bytes((AUTH_SWITCH,)):  # another plugin: offer it the empty password
            _send(sock, packet(b"", sequence + 1), deadline)
            reply = _read_packet(sock, deadline)[1]
        if reply[:1] == bytes((OK,)):
            _send(sock, packet(COM_QUIT, 0), deadline)
    except MysqlError as error:
        raise DestinationUnavailable(f"MySQL check: {error}") from None


def _read_packet(sock, deadline):
    """(sequence, payload) of the next packet, reading no more than GREETING_MAX bytes."""
    data = b""
    while (whole := split(data)) is None:
        if len(data) >= GREETING_MAX:
            raise MysqlError(f"a packet longer than {GREETING_MAX} bytes")
        try:
            chunk = receive_within(sock, GREETING_MAX - len(data), deadline)
        except OSError as error:
            raise MysqlError(error.strerror or str(error)) from None
        if chunk is None:
            raise MysqlError("no answer within connect-timeout")
        if not chunk:
            raise MysqlError("closed mid-handshake")
        data += chunk
    return whole[0], whole[1]


def _send(sock, data, deadline):
    """Send all of ``data`` before ``deadline``."""
    try:
        if not send_within(sock, data, deadline):
            raise MysqlError("the server did not take the handshake in time")
    except OSError as error:
        raise MysqlError(error.strerror or str(error)) from None
