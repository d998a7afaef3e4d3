"""What a refused client is told, in the protocol its route speaks (the route's ``protocol``).

A client shed before it is forwarded (queue_full, queue_timeout, blocked_host, host_limit,
host_rate, no_destination) or whose destinations all failed (connect_failed) hears why in
words its client library shows: ``tcp`` sends the route's shed-message, ``mysql`` an error
packet, ``postgres`` an ErrorResponse after reading the startup packet, ``redis`` an ``-ERR``
reply.  ``message`` is pure; ``refuse`` runs in the refused connection's greenlet and never raises.
"""

import time

from gconn.sockets import send_within

from . import mysql, postgres, redis

PROTOCOLS = ("tcp", "mysql", "postgres", "redis")  # the values of a route's ``protocol``
READS_FIRST = ("postgres",)  # protocols whose client speaks first: read before refusing
STARTUP_TIMEOUT = 2.0  # seconds a refused client has to send what precedes the refusal
SEND_TIMEOUT = 0.0  # seconds a refusal waits for the client's buffer: never (it is leaving)


def message(protocol, reason, route, host, bind, shed_message):
    """The bytes that tell a client of ``route`` from ``host``, refused for ``reason``, why."""
    if protocol == "mysql":
        return mysql.refusal(reason, route, host, bind)
    if protocol == "postgres":
        return postgres.refusal(reason, route, host)
    if protocol == "redis":
        return redis.refusal(reason, route, host)
    return shed_message


def refuse(sock, protocol, refusal):
    """Send ``refusal`` on the non-blocking ``sock`` in this greenlet, first reading what the
    client says before it listens (a PostgreSQL startup packet, within STARTUP_TIMEOUT).  Best
    effort: a client that is gone or does not take the bytes at once is not waited for.  The
    caller owns and closes ``sock``."""
    if protocol in READS_FIRST:
        postgres.read_startup(sock, STARTUP_TIMEOUT)
    if refusal:
        try:
            send_within(sock, refusal, time.monotonic() + SEND_TIMEOUT)
        except OSError:
            pass
