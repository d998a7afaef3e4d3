"""One client connection's life: connect to a destination, forward, finish and account.

The session owns both sockets and closes each exactly once, in ``finally``.  It never reads
from the client before a destination is connected (the client's first bytes wait in the kernel).
How the connection ended is decided here and written to the access log; what failed where is
recorded in the greenlet's error state (local.py) by the code that saw it.
"""

import logging
import time

from gevent import GreenletExit

from . import local
from .errors import DestinationUnavailable, NoHealthyDestination, ResourceExhausted
from .forward import Pump
from .log import log_access
from .sockets import connect, peer_name

LOGGER = logging.getLogger("gconn.session")


def connect_destination(route, now):
    """Try the strategy's candidates in order; return (socket, destination) of the first that
    connects.  The socket is owned by the caller.  Raises NoHealthyDestination when the strategy
    offers none, DestinationUnavailable when every candidate failed."""
    candidates = route.destinations.candidates(now)
    if not candidates:
        raise NoHealthyDestination(f"route {route.name}: no destination available")
    for destination in candidates:
        try:
            connection = connect(destination.address, route.config.connect_timeout)
        except DestinationUnavailable as error:
            destination.connect_failed(time.monotonic(), route.config.retry_interval, str(error))
            local.set_error("connect_failed", str(error))
            LOGGER.warning("destination %s failed: %s", destination.address, error)
            continue
        destination.connect_succeeded()
        return connection, destination
    raise DestinationUnavailable(f"route {route.name}: every destination failed")


def serve(route, client, address):
    """Serve one accepted client of ``route`` until it ends; always closes ``client``."""
    context = local.ConnectionContext(route.registry.next_id(), route.name, peer_name(address))
    local.set_current(context)
    route.registry.add(context)
    started = time.monotonic()
    destination_socket = destination = pump = None
    end = "error: unknown"
    try:
        context.phase = "connecting"
        destination_socket, destination = connect_destination(route, started)
        context.destination = str(destination.address)
        context.phase = "forwarding"
        pump = Pump(client, destination_socket, route.config.buffer_size)
        end = pump.run(route.config.idle_timeout)
        if pump.error:
            local.set_error(end, pump.error)
    except NoHealthyDestination as error:
        end = "no_destination"
        LOGGER.warning("%s", error)
    except DestinationUnavailable as error:
        end = "connect_failed"
        LOGGER.warning("%s", error)
    except ResourceExhausted as error:
        end = "fd_exhausted"
        local.set_error(end, str(error))
        LOGGER.warning("%s", error)
    except GreenletExit:
        end = "shutdown"
    except Exception as error:  # a bug or an unforeseen OS error: report it, keep serving others
        end = f"error: {error}"
        local.set_error("error", str(error))
        LOGGER.exception("session failed")
    finally:
        context.phase = "closed"
        if pump is not None:
            pump.stop()
            context.bytes_up, context.bytes_down = pump.bytes_up, pump.bytes_down
        if destination_socket is not None:
            destination_socket.close()
            destination.disconnected()
        client.close()
        route.registry.remove(context)
        log_access(context, end, time.monotonic() - started)
        local.set_current(None)
