"""The Redis protocol (RESP), as far as a refusal needs it: one error reply.

Redis itself answers a client over ``maxclients`` with ``-ERR max number of clients reached``
written at once, before reading anything, and then closes; clients read it as the reply to
their first command (redis-cli prints ``(error) ERR max number of clients reached``, redis-py
raises ConnectionError for that text).  A refused client of a ``protocol = redis`` route gets
the same reply for a full route, and an ``-ERR`` naming the reason otherwise.
"""

BUSY = "max number of clients reached"  # Redis's own text: clients recognise it


def refusal(reason, route, host):
    """The error reply for a client refused for ``reason`` (an admission shed reason)."""
    if reason in ("queue_full", "queue_timeout"):
        return error_reply(BUSY)
    if reason == "host_limit":
        return error_reply(f"too many connections from client host {host} (gconn route "
                           f"{route})")
    if reason == "host_rate":
        return error_reply(f"too many new connections per second from client host {host} "
                           f"(gconn route {route})")
    if reason == "blocked_host":
        return error_reply(f"client host {host} is blocked because of many connection errors "
                           f"(gconn route {route})")
    return error_reply(f"no destination available (gconn route {route})")


def error_reply(message):
    """A RESP simple error: ``-ERR message`` and CRLF (a line break inside would end it)."""
    return b"-ERR " + " ".join(message.split()).encode("utf-8") + b"\r\n"
