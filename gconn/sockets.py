"""Sockets at the edges: listening, connecting to destinations, naming peers, process limits.

Every function that opens a socket either returns it to the caller, who then owns and closes it,
or closes it itself before raising.  Errors leave here sorted by whose fault they are: the
environment at start-up (StartupError), the destination (DestinationUnavailable / Timeout).
Called after gevent's monkey-patching: listeners are gevent sockets (StreamServer's), while
forwarded connections are plain non-blocking OS sockets that the connection's greenlet waits on
through the loop's own watchers.
"""

import _socket
import errno
import functools
import ipaddress
import os
import resource
import socket
import stat
import time

import gevent
from gevent.hub import get_hub
from greenlet import getcurrent

from .errors import DestinationTimeout, DestinationUnavailable, ResourceExhausted, StartupError

RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
DESCRIPTOR_RESERVE = 64  # descriptors a worker keeps for logs, listeners, health checks, admin


def keepalive_options(config, switch_off=False):
    """The socket options (level, name, value) a route's config asks of both sides of its
    TCP connections: keepalive probes and TCP_USER_TIMEOUT.  With ``switch_off`` also those
    that turn off what the config leaves off (for a socket that had them on before)."""
    options = []
    if switch_off:
        options += [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),
                    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)]
    if config.tcp_keepalive:
        options += [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(config.tcp_keepalive_idle)),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL,
                     int(config.tcp_keepalive_interval)),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, config.tcp_keepalive_count)]
    if config.tcp_user_timeout > 0:
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        max(1, int(config.tcp_user_timeout * 1000))))
    return tuple(options)


def listen(address, backlog, reuse_port=False, listening=True, options=()):
    """A listening socket on ``address``; StartupError names the address when the OS refuses.

    With ``listening=False`` the socket is only bound: it holds the port (with ``reuse_port``,
    for the workers' own listeners to join) without taking any connection.  ``options``
    (keepalive_options) are set on a TCP listener: the sockets it accepts inherit them, so
    no accepted connection pays for them.
    """
    if address.family == "unix":
        return _listen_unix(address, backlog)
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {address}: {error.strerror}") from None
    family, kind, protocol, _, sockaddr = infos[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for option in options:
            listener.setsockopt(*option)
        listener.bind(sockaddr)
        if listening:
            listener.listen(backlog)
    except OSError as error:
        listener.close()
        raise StartupError(_describe_bind_error(address, error)) from None
    return listener


def _listen_unix(address, backlog):
    """A listening unix socket; a stale socket file nobody listens on is replaced."""
    path = address.path
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody answers: a leftover of an earlier run
            else:
                raise StartupError(f"cannot listen on {address}: address already in use")
            finally:
                probe.close()
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(backlog)
    except OSError as error:
        listener.close()
        raise StartupError(_describe_bind_error(address, error)) from None
    return listener


def _describe_bind_error(address, error):
    """One line saying why binding ``address`` failed, in words an operator acts on."""
    if error.errno == errno.EADDRINUSE:
        return f"cannot listen on {address}: address already in use"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot listen on {address}: permission denied"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: address not available on this host"
    return f"cannot listen on {address}: {error.strerror or error}"


def connect(address, timeout, source=None, options=()):
    """A connected, non-blocking OS socket to ``address`` within ``timeout`` seconds, owned by
    the caller; waits cooperatively in the calling greenlet (never call it from the hub).
    With ``source`` (an IP address) a TCP connection leaves from that address; ``options``
    (keepalive_options) are set on a TCP connection before it connects.

    The socket is a plain ``_socket.socket`` (what the pump and the session use), not gevent's
    wrapper: creating and closing the wrapper, its two watchers and its timeout machinery was
    the largest share of a new connection's cost.  An IP literal or unix path is connected at
    once (on loopback the connect has completed when it returns: no wait at all); a name is
    resolved through gevent's resolver and each address tried in turn within ``timeout``.
    Raises DestinationTimeout when no answer came in time, DestinationUnavailable when it was
    refused, reset or not resolvable, ResourceExhausted when this process is out of
    descriptors or ports.
    """
    attempt = begin_connect(address, source, options)
    if attempt is not None:
        return complete_connect(attempt, address, timeout)
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise _destination_error(address, error) from None
    failure = DestinationUnavailable(f"{address}: no address")
    for family, _, _, _, target in infos:  # each address gets the whole timeout (as
        try:  # socket.create_connection): a blackholed AAAA record must not hide the A one
            return complete_connect(_start_connect(family, target, source, options), address,
                                    timeout)
        except DestinationUnavailable as error:  # a timeout too: try the next address
            failure = error
    raise failure


def begin_connect(address, source=None, options=()):
    """Start connecting to an IP-literal or unix ``address`` without waiting: an attempt for
    ``complete_connect``, or None when ``address`` is a name to resolve.  An attempt whose
    code is 0 is connected already (on loopback the handshake is over when connect returns)."""
    family = _LITERAL_FAMILIES.get(address.family) or _literal_family(address.host)
    if family is None:
        return None
    target = address.path if family == socket.AF_UNIX else (address.host, address.port)
    return _start_connect(family, target, source, options)


def _start_connect(family, target, source=None, options=()):
    """(socket or None, errno code, target): a new non-blocking socket's connect, begun; from
    ``source`` and with the socket ``options`` when given (a TCP connection; a unix one
    ignores both)."""
    try:
        connection = _socket.socket(family, _NONBLOCKING_STREAM)
    except OSError as error:
        return None, error.errno, target
    try:
        if not _SOCK_NONBLOCK:
            connection.setblocking(False)
        if family != socket.AF_UNIX:
            for option in options:
                connection.setsockopt(*option)
            if source:
                # the port is picked at connect, per destination, not at bind: the source
                # address's ephemeral ports are not used up one per connection (Linux 4.2+)
                connection.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                connection.bind((source, 0))
        code = connection.connect_ex(target)
    except (OSError, ValueError) as error:  # an address the OS refuses outright (too long)
        connection.close()
        return None, getattr(error, "errno", None) or errno.EINVAL, target
    if code == errno.EINPROGRESS and _connected(connection):
        code = 0
    return connection, code, target


def _connected(connection):
    """Whether a connect in progress has completed (getpeername answers only then)."""
    try:
        connection.getpeername()
        return True
    except OSError:
        return False


def complete_connect(attempt, address, timeout):
    """The connected socket of ``attempt`` (from ``begin_connect``), waiting in this greenlet
    up to ``timeout`` seconds if it is still in progress; closed before any error is raised."""
    connection, code, target = attempt
    if connection is None:
        raise _destination_error(address, OSError(code, os.strerror(code)))
    try:
        deadline = time.monotonic() + timeout
        # a unix listener's full backlog answers EAGAIN: busy, not down; retry until the
        # deadline (gevent's blocking connect did the same)
        while code == errno.EAGAIN and connection.family == socket.AF_UNIX:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DestinationTimeout(f"{address}: connect timed out (backlog full)")
            gevent.sleep(min(UNIX_RETRY, left))
            code = connection.connect_ex(target)
        while code == errno.EINPROGRESS:
            if not wait_writable(connection.fileno(), max(0.0, deadline - time.monotonic())):
                raise DestinationTimeout(f"{address}: connect timed out")
            code = connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not code and not _connected(connection):  # a spurious wake-up: wait again
                code = errno.EINPROGRESS
        if code:
            raise _destination_error(address, OSError(code, os.strerror(code)))
        if connection.family != socket.AF_UNIX:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        connection.close()
        raise
    return connection


def wait_readable(fileno, timeout):
    """Wait in this greenlet until ``fileno`` is readable (True) or ``timeout`` passed (False).
    (wait_writable's twin: one io watcher and one timer.)"""
    return _wait(fileno, 1, timeout)


def wait_writable(fileno, timeout):
    """Wait in this greenlet until ``fileno`` is writable (True) or ``timeout`` passed (False).

    One io watcher and one timer switch straight back into the waiting greenlet: what gevent's
    socket.connect does with a Timeout, minus the exception machinery.  A kill (GreenletExit)
    while waiting is raised here, after both watchers are closed.
    """
    return _wait(fileno, 2, timeout)


def receive_within(sock, limit, deadline, flags=0):
    """Up to ``limit`` bytes from the non-blocking ``sock``, waiting in this greenlet until
    ``deadline`` (a time.monotonic() value): b"" when the peer closed, None when nothing came
    in time.  OSError (a reset) propagates to the caller, who owns the socket."""
    while True:
        try:
            return sock.recv(limit, flags)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable(sock.fileno(), left):
                return None


def send_within(sock, data, deadline):
    """Send all of ``data`` on the non-blocking ``sock``, waiting in this greenlet until
    ``deadline`` (a time.monotonic() value): False when the peer did not take it in time.
    OSError (a reset, a closed peer) propagates to the caller, who owns the socket."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_writable(sock.fileno(), left):
                return False
    return True


def _wait(fileno, events, timeout):
    hub = get_hub()
    watcher = hub.loop.io(fileno, events)
    timer = hub.loop.timer(timeout)
    try:
        switch = getcurrent().switch
        watcher.start(switch, True)
        timer.start(switch, False)
        return hub.switch()
    finally:
        watcher.close()
        timer.close()


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux's value
UNIX_RETRY = 0.01  # seconds between connects to a unix socket whose backlog is full
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_NONBLOCKING_STREAM = socket.SOCK_STREAM | _SOCK_NONBLOCK | getattr(socket, "SOCK_CLOEXEC", 0)
_LITERAL_FAMILIES = {"unix": socket.AF_UNIX}


@functools.lru_cache(maxsize=4096)
def _literal_family(host):
    """AF_INET / AF_INET6 when ``host`` is an IP literal, else None (a name to resolve)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _destination_error(address, error):
    """Sort a connect failure into timeout or unavailable, keeping the OS's words."""
    if isinstance(error, (TimeoutError, socket.timeout)):
        return DestinationTimeout(f"{address}: connect timed out")
    if isinstance(error, socket.gaierror):
        return DestinationUnavailable(f"{address}: cannot resolve: {error.strerror}")
    if isinstance(error, OSError) and error.errno in RESOURCE_ERRORS:
        return ResourceExhausted(f"connecting to {address}: {error.strerror}")
    if isinstance(error, OSError):
        return DestinationUnavailable(f"{address}: {error.strerror or error}")
    if isinstance(error, Exception):
        return DestinationUnavailable(f"{address}: {error}")
    raise error  # GreenletExit and friends pass through


def peer_name(address):
    """``host:port`` of a peer address tuple, or ``unix`` for a unix-socket peer."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix"


def client_host(address):
    """The host part of a peer address tuple (what max-connect-errors counts), or ``unix``."""
    return address[0] if isinstance(address, tuple) else "unix"


def bound_address(listener, address):
    """The address a listener really has (the port the OS chose for port 0)."""
    if address.family == "unix":
        return str(address)
    host, port = listener.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_descriptors(pid="self"):
    """How many descriptors process ``pid`` has open.  Linux 6.2 and newer give the count as
    the size of /proc/PID/fd, in microseconds; listing the directory (older kernels) takes
    about 17 ms at 15,000 descriptors, which once a second per worker was a fifth of a core
    at 100,000 connections."""
    path = f"/proc/{pid}/fd"
    size = os.stat(path).st_size
    return size if size > 0 else len(os.listdir(path))


def process_usage():
    """(open descriptors, open-files soft limit, resident bytes) of this process, from /proc."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/proc/self/statm") as stream:
        resident = int(stream.read().split()[1]) * resource.getpagesize()
    return open_descriptors(), soft, resident


def open_sockets():
    """How many sockets this process has open (from /proc: once, at a worker's end)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the descriptor listdir itself used, closed since
            pass
    return count


def connections_per_process(open_files_limit):
    """Forwarded connections one process with ``open_files_limit`` descriptors can hold: two
    descriptors each (client and destination), less a reserve.  The one place this is said."""
    if open_files_limit == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, (open_files_limit - DESCRIPTOR_RESERVE) // 2)


def descriptor_capacity():
    """Forwarded connections this process can hold with its current open-files soft limit."""
    return connections_per_process(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def raise_open_files_limit():
    """Raise this process's open-files soft limit to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft
