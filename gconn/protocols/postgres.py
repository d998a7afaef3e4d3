"""The PostgreSQL frontend/backend protocol (version 3), as far as a refusal needs it.

A PostgreSQL client speaks first: an ``SSLRequest`` or ``GSSENCRequest`` (answered ``N``: not
here), then its startup packet, and only then reads the server's answer; libpq reports a
server that closes before that as "server closed the connection unexpectedly".  So a refused
client of a ``protocol = postgres`` route is read up to its startup packet, bounded in bytes
(the server's own MAX_STARTUP_PACKET_LENGTH) and time, and then gets an ``ErrorResponse`` of
severity FATAL (SQLSTATE 53300 too_many_connections when the route is full, 08004
sqlserver_rejected_establishment_of_sqlconnection otherwise), as the postmaster sends it.  This
is the one place gconn reads a client before a destination is connected: the client is being
turned away, nothing it sent is forwarded.  Pure halves first; ``read_startup`` at the end.
"""

import struct
import time

from gconn.sockets import receive_within, send_within

LENGTH = 4  # bytes of every startup-phase packet's length field (it counts itself)
MAX_STARTUP = 10000  # longest startup packet the postmaster reads (MAX_STARTUP_PACKET_LENGTH)
NEGOTIATIONS = 2  # encryption requests answered before the startup packet (SSL, then GSS)
SSL_REQUEST = 80877103  # the request codes of src/include/libpq/pqcomm.h
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
NOT_SUPPORTED = b"N"  # the one-byte answer to an encryption request: go on unencrypted

TOO_MANY_CONNECTIONS = "53300"
REJECTED = "08004"


class StartupError(ValueError):
    """Bytes that are not a PostgreSQL startup-phase packet."""


def refusal(reason, route, host):
    """The ErrorResponse for a client refused for ``reason`` (an admission shed reason)."""
    if reason in ("queue_full", "queue_timeout"):
        return error_response(TOO_MANY_CONNECTIONS,
                              f"sorry, too many clients already (gconn route {route})")
    if reason == "host_limit":
        return error_response(TOO_MANY_CONNECTIONS, f"too many connections from host {host} "
                                                    f"(gconn route {route})")
    if reason == "host_rate":
        return error_response(TOO_MANY_CONNECTIONS, f"too many new connections per second "
                                                    f"from host {host} (gconn route {route})")
    if reason == "blocked_host":
        return error_response(REJECTED, f"host {host} is blocked because of many connection "
                                         f"errors (gconn route {route})")
    return error_response(REJECTED, f"no destination available (gconn route {route})")


def error_response(code, message, severity="FATAL"):
    """An ErrorResponse message: severity (localized and not), SQLSTATE, message."""
    fields = b"".join(kind + value.encode("utf-8") + b"\x00" for kind, value in (
        (b"S", severity), (b"V", severity), (b"C", code), (b"M", message))) + b"\x00"
    return b"E" + struct.pack("!I", LENGTH + len(fields)) + fields


def packet_length(data):
    """The whole length of the startup-phase packet ``data`` begins, or None until its length
    field has come; StartupError when the length is impossible."""
    if len(data) < LENGTH:
        return None
    length = int.from_bytes(data[:LENGTH], "big")
    if not 2 * LENGTH <= length <= MAX_STARTUP:
        raise StartupError(f"startup packet length {length} (allowed 8 to {MAX_STARTUP})")
    return length


def request_code(packet):
    """The request code of a whole startup-phase packet: the protocol version of a startup
    packet (3.0 is 196608) or SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST."""
    return int.from_bytes(packet[LENGTH:2 * LENGTH], "big")


# the greenlet side ---------------------------------------------------------------------------

def read_startup(sock, timeout):
    """Read the client's startup packet on the non-blocking ``sock`` in this greenlet within
    ``timeout``, answering up to NEGOTIATIONS encryption requests with ``N`` on the way.  True
    when the client now waits for the server's answer; False when it sent something else,
    went quiet, closed or cancelled: then an ErrorResponse is sent anyway, best effort.  Never
    raises for the client's doing; the caller owns and closes ``sock``."""
    deadline = time.monotonic() + timeout
    data = b""
    negotiations = 0
    try:
        while True:
            try:
                length = packet_length(data)
            except StartupError:
                return False
            if length is not None and len(data) >= length:
                code = request_code(data[:length])
                if code not in (SSL_REQUEST, GSSENC_REQUEST):
                    return code != CANCEL_REQUEST
                negotiations += 1
                if negotiations > NEGOTIATIONS:
                    return False
                if not send_within(sock, NOT_SUPPORTED, deadline):
                    return False
                data = b""
                continue
            chunk = receive_within(sock, (length or LENGTH) - len(data), deadline)
            if not chunk:  # closed, or nothing in time
                return False
            data += chunk
    except OSError:
        return False
