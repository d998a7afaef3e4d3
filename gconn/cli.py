"""Entry points: monkey-patch first, parse the configuration, then dispatch.

Bad configuration exits 2 with one line naming file, line, key, value and what is allowed; an
environment that refuses (address in use, permission denied) exits 1 with one line; neither
prints a traceback.
"""

from gevent import monkey

monkey.patch_all()  # before anything below imports socket, ssl, threading or time

import logging  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from . import log  # noqa: E402
from .capacity import (  # noqa: E402
    capacity,
    capacity_warnings,
    certificate_warnings,
    worker_count,
)
from .config import load  # noqa: E402
from .errors import EXIT_CONFIG, EXIT_RUNTIME, ConfigError, StartupError  # noqa: E402
from .sockets import raise_open_files_limit  # noqa: E402
from .supervisor import Supervisor  # noqa: E402

LOGGER = logging.getLogger("gconn")
LIBEV_BACKENDS = ("epoll", "poll", "select")


def select_loop(config):
    """Make gevent use the configured event loop; ConfigError if this host cannot."""
    choice = config.process.loop
    source = config.values["gconn"]["loop"].source
    try:
        if choice == "libuv":
            gevent.config.loop = "libuv"
        elif choice in LIBEV_BACKENDS:
            gevent.config.loop = "libev-cext"
            gevent.config.libev_backend = choice
        loop = gevent.get_hub().loop
    except Exception as error:  # gevent raises several kinds for a loop it cannot load
        raise ConfigError(f"bad value {choice!r}: this host cannot run it ({error})",
                          source=source, key="loop", section="gconn") from None
    if choice in LIBEV_BACKENDS and loop.backend != choice:
        raise ConfigError(f"bad value {choice!r}: libev here offers {loop.backend}, not {choice}",
                          source=source, key="loop", section="gconn")
    return loop


def describe_capacity(config):
    """Comment lines for --check-config: workers, descriptor limit, connections they hold, and
    the same capacity warnings the supervisor logs."""
    limit = raise_open_files_limit()
    workers = worker_count(config)
    wanted = sum(route.max_connections for route in config.routes)
    lines = [f"; capacity: {workers} workers x ({limit} open files - reserve) / 2 = "
             f"{capacity(limit, workers)} forwarded connections; routes ask for {wanted}"]
    lines += [f"; warning: {warning}" for warning
              in capacity_warnings(config, limit) + certificate_warnings(config)]
    return "\n".join(lines) + "\n"


def read_admin_token(config):
    """The admin bearer token from admin-token-file (None without one); ConfigError if the
    file cannot be read or is empty."""
    path = config.process.admin_token_file
    if not path:
        return None
    source = config.values["gconn"]["admin-token-file"].source
    try:
        with open(path, encoding="utf-8") as stream:
            token = stream.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"cannot read token file {path!r}: {reason}", source=source,
                          key="admin-token-file", section="gconn") from None
    if not token:
        raise ConfigError(f"token file {path!r} is empty", source=source,
                          key="admin-token-file", section="gconn")
    return token


def main(argv=None):
    """The ``gconn`` command; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        from .status import main as status_main
        return status_main(argv[1:])
    if argv[:1] == ["ctl"]:
        from .ctl import main as ctl_main
        return ctl_main(argv[1:])
    try:
        config, options = load(argv)
        select_loop(config)
        admin_token = read_admin_token(config)
    except ConfigError as error:
        print(f"gconn: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if options.check_config:
        print(config.render() + describe_capacity(config), end="")
        return 0
    try:
        log.setup(config.process)
    except OSError as error:
        print(f"gconn: cannot open log file {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_RUNTIME
    try:
        import setproctitle
        setproctitle.setproctitle("gconn: supervisor " + " ".join(sys.argv[1:]))
    except ImportError:
        pass
    try:
        return Supervisor(config, argv, admin_token).run()
    except StartupError as error:
        LOGGER.error("%s", error)
        print(f"gconn: {error}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 0
