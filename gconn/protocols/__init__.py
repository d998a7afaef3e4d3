"""Protocol steps a connection's greenlet runs before and while forwarding: one module per
protocol.

``proxy`` (PROXY protocol headers, read and sent), ``sni`` (the ClientHello that picks a route
on a shared bind), ``tls`` (terminating and originating TLS over memory BIOs), ``mysql``,
``postgres`` and ``redis`` (refusals a database client understands, MySQL health checks) and
``refusal`` (which of those a route speaks).  Each module is a pure parse/build half (bytes in,
values out, tested without sockets) and a short greenlet-side half with timeouts that the
session's greenlet calls.  Protocol steps never import the session.
"""
