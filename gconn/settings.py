"""Every option of gconn, declared once as data, and the small parsers that check their values.

The command-line flags, the ``GCONN_*`` environment variables, the config-file keys (config.py),
the annotated ``conf/gconn.conf`` and README's option table (docs.py) are all derived from
``SETTINGS``; nothing here renders or reads them.  Parsers take text and return a value or raise
``ValueError`` saying what is allowed; they never touch sockets or files (config.py adds the
file, line and key to the message).
"""

import dataclasses
import ipaddress
import re
import warnings

from .protocols.proxy import parse_networks
from .protocols.refusal import PROTOCOLS
from .protocols.sni import parse_server_names

SECONDS = 1.0
MILLISECONDS = SECONDS / 1000
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS
KIB = 1024
MIB = 1024 * KIB
# the longest duration any setting takes: far past any sensible timeout, and well inside what
# socket.settimeout (about 292 years) and gevent's timers accept
MAX_DURATION = 10_000 * DAYS
# Linux's limits on the TCP keepalive and user timeout options (MAX_TCP_KEEPIDLE and
# MAX_TCP_KEEPINTVL in seconds; TCP_USER_TIMEOUT is an int of milliseconds): a setsockopt
# beyond them fails in every worker, which then dies at start and is restarted for ever
MAX_KEEPALIVE_TIME = 32767 * SECONDS
MAX_USER_TIMEOUT = 24 * DAYS  # 2,073,600,000 ms, under 2**31 - 1

PROCESS = "process"  # a key of [gconn] only
ROUTE = "route"  # a key of [route:NAME], or of [gconn] as the default for every route
ROUTE_ONLY = "route-only"  # a key of [route:NAME] only (where a route listens, where it goes)

STRATEGIES = (
    "first-available",
    "next-available",
    "round-robin",
    "round-robin-with-fallback",
    "least-connections",
    "source-hash",
)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")  # log-format: the daemon log's lines
ACCESS_LOG_FORMATS = ("logfmt", "json")  # access-log-format: the access log's lines
LOOPS = ("default", "epoll", "poll", "select", "libuv")
PROXY_VERSIONS = ("no", "v1", "v2", "any")  # accept-proxy: which PROXY headers are read
SEND_PROXY_VERSIONS = ("no", "v1", "v2")  # send-proxy: which PROXY header is written
TLS_VERSIONS = ("1.2", "1.3")  # tls-min-version
MAX_WEIGHT = 256  # a destination's weight=N at most (HAProxy's bound)
CHECKS = ("tcp", "http", "send-expect")  # what a health check asks

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_DURATION_UNITS = {"ms": MILLISECONDS, "s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS,
                   None: SECONDS}
_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]?)[bB]?$")
_SIZE_UNITS = {"": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}


@dataclasses.dataclass(frozen=True)
class Address:
    """Where to listen or connect: ``tcp`` with host and port, or ``unix`` with a path."""

    family: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def fixed(self):
        """Whether this names one place (a unix path or a port other than 0) that two routes
        could both bind; port 0 gives each listener a port of its own."""
        return self.family == "unix" or self.port != 0

    def __str__(self):
        if self.family == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class DestinationSpec:
    """One entry of a route's destination list; ``backup`` ones serve only when no primary can."""

    address: Address
    backup: bool = False
    send_proxy: str | None = None  # this destination's send-proxy; None: the route's
    tls: bool | None = None  # this destination's destination-tls; None: the route's
    weight: int | None = None  # its share of new connections; None: 1 (0: no new ones)
    discover: str | None = None  # "dns" (every address of host, on port) or "srv" (host's
    # SRV records): discovery.py resolves it into destinations; None: this one address
    check: str | None = None  # what its health checks ask (or "no": none); None: the route's
    check_port: int | None = None  # the port its checks probe; None: the route's check-port

    def uses_tls(self, route_tls):
        """Whether connections to it use TLS: its own ``tls=``, else the route's
        destination-tls (``route_tls``)."""
        return route_tls if self.tls is None else self.tls

    def __str__(self):
        words = [str(self.address)]
        if self.discover == "dns":
            words = [f"dns:{self.address}"]
        elif self.discover == "srv":
            words = [f"srv:{self.address.host}"]
        if self.backup:
            words.append("backup")
        if self.send_proxy is not None:
            words.append(f"send-proxy={self.send_proxy}")
        if self.tls is not None:
            words.append(f"tls={'yes' if self.tls else 'no'}")
        if self.weight is not None:
            words.append(f"weight={self.weight}")
        if self.check is not None:
            words.append(f"check={self.check}")
        if self.check_port is not None:
            words.append(f"check-port={self.check_port}")
        return " ".join(words)


def parse_duration(text):
    """``250ms``, ``5s``, ``2m``, ``8h``, ``1d`` or a plain number of seconds -> float seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError("expected a duration such as 250ms, 5s, 2m or 8h")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if value > MAX_DURATION:
        raise ValueError("must be at most 10000d")
    return value


def duration_at_least(lowest, text_lowest, highest=MAX_DURATION, text_highest="10000d"):
    """A duration parser refusing values below ``lowest`` seconds (``0`` allowed if lowest 0)
    or above ``highest``."""

    def parse_bounded_duration(text):
        value = parse_duration(text)
        if value < lowest:
            raise ValueError(f"must be at least {text_lowest}")
        if value > highest:
            raise ValueError(f"must be at most {text_highest}")
        return value

    parse_bounded_duration.allowed = f"duration >= {text_lowest}: 250ms, 5s, 2m, 8h"
    return parse_bounded_duration


def duration_at_most(highest, text_highest):
    """A duration parser refusing values above ``highest`` seconds."""

    def parse_limited_duration(text):
        value = parse_duration(text)
        if value > highest:
            raise ValueError(f"must be at most {text_highest}")
        return value

    parse_limited_duration.allowed = "duration: 250ms, 5s, 2m, 8h"
    return parse_limited_duration


def size_between(low, high, text_range):
    """A size parser for ``low`` to ``high`` bytes."""

    def parse_bounded_size(text):
        value = parse_size(text)
        if not low <= value <= high:
            raise ValueError(f"must be from {text_range}")
        return value

    parse_bounded_size.allowed = f"size {text_range}: 4096, 64k, 1m"
    return parse_bounded_size


def parse_size(text):
    """``512``, ``64k``, ``1m`` -> bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError("expected a size such as 4096, 64k or 1m")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def integer_between(low, high):
    """A parser for whole numbers from ``low`` to ``high`` inclusive."""

    def parse_integer(text):
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    parse_integer.allowed = f"{low}..{high}"
    return parse_integer


def one_of(choices):
    """A parser accepting exactly one of ``choices``."""

    def parse_choice(text):
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("allowed: " + ", ".join(choices))
        return value

    parse_choice.allowed = " | ".join(choices)
    return parse_choice


def parse_escaped_bytes(text):
    """Text with escapes such as \\r\\n or \\x00 -> bytes (empty allowed)."""
    try:
        with warnings.catch_warnings():
            # an unknown escape such as \\q is only a DeprecationWarning (an error in a
            # Python to come): refuse it now rather than guess which bytes were meant
            warnings.simplefilter("error", DeprecationWarning)
            decoded = text.strip().encode("latin-1").decode("unicode_escape")
        return decoded.encode("latin-1")
    except (UnicodeError, ValueError, DeprecationWarning):
        raise ValueError("expected text with escapes such as \\r\\n or \\x00") from None


def parse_boolean(text):
    """``yes``/``no``, ``true``/``false``, ``on``/``off``, ``1``/``0``."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no")


def parse_text(text):
    """Any text, surrounding blanks removed."""
    return text.strip()


def parse_paths(text):
    """Comma-separated file paths -> a tuple (empty text: none)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_source(text):
    """An IP address (v4 or v6) to connect from, or empty for the kernel's choice."""
    text = text.strip()
    if text:
        try:
            ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            raise ValueError("expected an IP address such as 127.0.0.2 or ::1, or empty") from None
    return text.strip("[]")


def parse_address(text, *, listening=False):
    """``host:port``, ``[v6]:port`` or ``unix:/path`` -> Address; port 0 only when listening."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError("expected unix:/path with a path")
        return Address("unix", path=path)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError("expected host:port, [ipv6]:port or unix:/path")
    if not host.isprintable() or any(character.isspace() for character in host):
        raise ValueError(f"{host!r} is not a host name or IP address")
    lowest = 0 if listening else 1
    if not (port_text.isascii() and port_text.isdigit()) \
            or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from {lowest} to 65535")
    return Address("tcp", host=host, port=int(port_text))


def parse_discovered(text):
    """A destination's address: ``dns:NAME:PORT`` (every A/AAAA address of NAME, on PORT),
    ``srv:_service._proto.NAME`` (its SRV records), or a plain address -> (Address, "dns" |
    "srv" | None)."""
    kind, colon, rest = text.partition(":")
    if colon and kind in ("dns", "srv"):
        if kind == "srv":
            name = rest.strip(".")
            if not name or any(c.isspace() for c in name):
                raise ValueError("expected srv:_service._proto.NAME")
            return Address("tcp", host=name, port=0), "srv"
        address = parse_address(rest)
        if address.family != "tcp" or ":" in address.host:
            raise ValueError("expected dns:NAME:PORT")
        return address, "dns"
    return parse_address(text), None


def parse_resolvers(text):
    """``resolvers``: comma-separated ``host:port`` name servers (IP addresses) -> a tuple of
    (ip, port); empty: the system's (/etc/resolv.conf)."""
    servers = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        address = parse_address(item)
        try:
            ipaddress.ip_address(address.host)
        except ValueError:
            raise ValueError(f"{item!r}: a name server is an IP address and port") from None
        servers.append((address.host, address.port))
    return tuple(servers)


def parse_bind(text):
    """The listening address of a route."""
    return parse_address(text, listening=True)


def parse_admin_address(text):
    """The admin endpoint's address, or None (empty: no admin endpoint)."""
    return parse_address(text, listening=True) if text.strip() else None


def parse_destinations(text):
    """A comma-separated list of ``host:port`` / ``unix:/path``, each optionally followed by
    ``backup``, ``send-proxy=no|v1|v2`` and ``tls=yes|no`` (this destination's own PROXY
    header version and TLS, overriding the route's send-proxy and destination-tls) and
    ``weight=N`` (0 to MAX_WEIGHT: its share of new connections; 0 takes none),
    ``check=no|tcp|http|send-expect`` and ``check-port=N`` (its own health check, overriding
    the route's check and check-port; ``no``: never checked, always up)."""
    entries = []
    for item in text.split(","):
        words = item.split()
        if not words:
            continue
        try:
            address, discover = parse_discovered(words[0])
        except ValueError as error:
            raise ValueError(f"{words[0]!r}: {error}") from None
        backup, send_proxy, tls, weight, check, check_port = False, None, None, None, None, None
        for word in words[1:]:
            key, _, value = word.partition("=")
            if word.lower() == "backup":
                backup = True
            elif key == "send-proxy" and value in SEND_PROXY_VERSIONS:
                send_proxy = value
            elif key == "tls" and value in ("yes", "no"):
                tls = value == "yes"
            elif key == "weight" and value.isascii() and value.isdigit() \
                    and int(value) <= MAX_WEIGHT:
                weight = int(value)
            elif key == "check" and value in ("no", *CHECKS):
                check = value
            elif key == "check-port" and value.isascii() and value.isdigit() \
                    and 0 < int(value) <= 65535:
                check_port = int(value)
            else:
                raise ValueError(f"{item.strip()!r}: expected host:port, then optionally "
                                 f"'backup', 'send-proxy=no|v1|v2', 'tls=yes|no', "
                                 f"'weight=0..{MAX_WEIGHT}', 'check=no|{'|'.join(CHECKS)}' "
                                 f"and 'check-port=1..65535'")
        entries.append(DestinationSpec(address, backup, send_proxy, tls, weight, discover,
                                       check, check_port))
    if not entries:
        raise ValueError("expected at least one destination host:port")
    return tuple(entries)


parse_duration.allowed = "duration: 250ms, 5s, 2m, 8h"
parse_escaped_bytes.allowed = "text with escapes: \\r\\n \\x00"
parse_boolean.allowed = "yes | no"
parse_size.allowed = "size: 4096, 64k, 1m"
parse_text.allowed = "text"
parse_source.allowed = "an IP address, or empty"
parse_paths.allowed = "file paths, comma-separated"
parse_server_names.allowed = "host names or *.suffix wildcards, comma-separated"
parse_bind.allowed = "host:port | [ipv6]:port | unix:/path"
parse_resolvers.allowed = "ip:port name servers, comma-separated, or empty"
parse_destinations.allowed = ("host:port | dns:NAME:PORT | srv:_svc._proto.NAME [backup] "
                              "[send-proxy=no|v1|v2] [tls=yes|no] [weight=N] "
                              "[check=no|tcp|http|send-expect] [check-port=N], ...")
parse_admin_address.allowed = "host:port | [ipv6]:port | unix:/path | empty"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One option: its key, where it may stand, how its text is checked, its default and help."""

    name: str  # the config key; flag --NAME, environment GCONN_NAME
    scope: str  # PROCESS, ROUTE or ROUTE_ONLY
    parse: object  # text -> value, raising ValueError that says what is allowed
    default: str | None  # as text, run through parse; None: must be given
    help: str
    flag: str = ""  # the command-line flag, derived from name unless given
    repeatable: bool = False  # the flag may be given several times; values are joined by commas
    bare: str | None = None  # the value a flag given without one means (a switch)

    @property
    def attribute(self):
        """The Python attribute name of this setting on Config / RouteConfig."""
        return self.name.replace("-", "_")

    @property
    def env(self):
        """The environment variable that sets this option."""
        return "GCONN_" + self.name.upper().replace("-", "_")

    @property
    def option(self):
        """The command-line flag that sets this option."""
        return self.flag or f"--{self.name}"

    @property
    def allowed(self):
        """A short description of the values this setting accepts."""
        return getattr(self.parse, "allowed", "text")


SETTINGS = (
    Setting("workers", PROCESS, integer_between(0, 1024), "0",
            "worker processes, each with its own event loop and connections; 0: one per CPU core"),
    Setting("loop", PROCESS, one_of(LOOPS), "default",
            "the event loop: gevent's default, libev with a given backend, or libuv"),
    Setting("worker-timeout", PROCESS, duration_at_least(3.0, "3s"), "30s",
            "a worker whose heartbeat is silent this long is killed and replaced"),
    Setting("admin", PROCESS, parse_admin_address, "127.0.0.1:8421",
            "the admin HTTP endpoint (livez, readyz, status, connections, config); empty: off"),
    Setting("admin-token-file", PROCESS, parse_text, "",
            "a file holding the bearer token the admin endpoint requires (but for /livez and "
            "/readyz, which answer their status without it); needed (or admin-insecure) when "
            "admin is not on loopback"),
    Setting("admin-insecure", PROCESS, parse_boolean, "no",
            "allow an admin endpoint beyond loopback without a token", bare="yes"),
    Setting("log-level", PROCESS, one_of(LOG_LEVELS), "info",
            "how much the daemon logs"),
    Setting("log-file", PROCESS, parse_text, "-",
            "where the daemon's log goes: - for stderr, or a file path"),
    Setting("access-log", PROCESS, parse_text, "-",
            "one line per finished connection: - for stderr, a file path, or off"),
    Setting("log-format", PROCESS, one_of(LOG_FORMATS), "text",
            "the daemon log's lines: text (time level gconn[pid] conn=ID message) or json "
            "(one object per line: time, level, logger, pid, conn, message, exception)"),
    Setting("access-log-format", PROCESS, one_of(ACCESS_LOG_FORMATS), "logfmt",
            "the access log's lines: logfmt (time key=value ...) or json (one object per "
            "line with the same keys, numbers as numbers)"),
    Setting("resolvers", PROCESS, parse_resolvers, "",
            "name servers (ip:port, comma-separated) that resolve dns: and srv: destinations; "
            "empty: the system's, from /etc/resolv.conf"),
    Setting("state-file", PROCESS, parse_text, "",
            "a file where destination states and weights set at runtime (POST "
            "/destinations, gconn ctl) are kept, so that a restart keeps them (HAProxy's "
            "server-state-file); empty: kept until gconn stops"),
    Setting("shutdown-delay", PROCESS, parse_duration, "0",
            "on SIGTERM/SIGINT, how long /readyz answers 503 while gconn still accepts and "
            "serves new connections, before it stops accepting and drains: the time a load "
            "balancer or Kubernetes takes to stop sending clients; a second signal skips it"),
    Setting("shutdown-timeout", PROCESS, parse_duration, "30s",
            "on SIGTERM/SIGINT, how long live connections may run before they are closed "
            "(counted from the end of shutdown-delay)"),
    # --- systemd and runtime worker changes (issue 20): keep these together -------------
    Setting("hard-stop-after", PROCESS, parse_duration, "0",
            "the longest an old generation of workers may drain after a reload (HUP) or a "
            "worker's removal (TTOU), HAProxy's name: then its connections are closed "
            "(end=shutdown), so that reloads do not pile up generations; it caps their "
            "shutdown-timeout, which a stop (TERM) still uses whole; 0: off"),
    Setting("bind", ROUTE_ONLY, parse_bind, None,
            "where the route listens: host:port, [ipv6]:port or unix:/path"),
    Setting("destinations", ROUTE_ONLY, parse_destinations, None,
            "where the route forwards, in order: host:port or unix:/path, comma-separated; "
            "append 'backup' to a fallback destination, 'send-proxy=no|v1|v2' or "
            "'tls=yes|no' to override the route's send-proxy or destination-tls for one, "
            "'weight=N' (0-256, default 1) for its share of new connections under "
            "round-robin and least-connections (0: none), 'check=no|tcp|http|send-expect' and "
            "'check-port=N' for a health check of its own (no: never checked); dns:NAME:PORT "
            "makes every address NAME resolves to a destination, srv:_service._proto.NAME its "
            "SRV records (re-resolved every resolve-interval)",
            flag="--destination", repeatable=True),
    Setting("resolve-interval", ROUTE, duration_at_least(0.1, "100ms"), "30s",
            "how often dns: and srv: destinations are resolved again (and at once on HUP); a "
            "failed or empty lookup keeps the last good set"),
    Setting("strategy", ROUTE, one_of(STRATEGIES), "first-available",
            "how a destination is picked for each new connection"),
    Setting("max-connections", ROUTE, integer_between(1, 10_000_000), "10000",
            "forwarded connections served at once, over all workers; further clients wait in "
            "the queue (up to max-queued, for at most queue-timeout), then are shed"),
    Setting("backlog", ROUTE, integer_between(1, 1_000_000), "4096",
            "the listen backlog: accepted-by-kernel clients not yet taken by gconn"),
    Setting("max-queued", ROUTE, integer_between(0, 10_000_000), "1000",
            "accepted clients waiting for a free slot, in arrival order; beyond it they are "
            "shed at once"),
    Setting("queue-timeout", ROUTE, parse_duration, "5s",
            "a client waiting longer than this for a slot is shed"),
    Setting("server-names", ROUTE_ONLY, parse_server_names, "",
            "TLS server names (SNI) this route serves, exact or *.suffix, comma-separated: "
            "routes sharing one bind are picked by the name in the client's ClientHello, "
            "which is read (not decrypted) and forwarded untouched; the route on that bind "
            "without names is the default, else an unknown name is closed"),
    Setting("tls-handshake-timeout", ROUTE, duration_at_least(0.001, "1ms"), "5s",
            "how long a client on a server-names bind may take to send its whole ClientHello"),
    Setting("tls-cert", ROUTE_ONLY, parse_paths, "",
            "terminate TLS: PEM certificate files (each with its chain, and its key unless "
            "tls-key names it), comma-separated; with several, the client's server name picks "
            "the one whose certificate names it"),
    Setting("tls-key", ROUTE_ONLY, parse_paths, "",
            "the PEM private keys of tls-cert, in the same order; empty: in the cert files"),
    Setting("tls-client-ca", ROUTE, parse_text, "",
            "with tls-cert: require client certificates signed by these CA certificates (PEM)"),
    Setting("tls-min-version", ROUTE, one_of(TLS_VERSIONS), "1.2",
            "with tls-cert: the oldest TLS version accepted"),
    Setting("tls-ciphers", ROUTE, parse_text, "",
            "with tls-cert: TLS 1.2 cipher suites in OpenSSL's syntax; empty: OpenSSL's default"),
    Setting("destination-tls", ROUTE, parse_boolean, "no",
            "connect to the destinations over TLS (health checks complete a handshake too), "
            "verifying them against destination-tls-ca and destination-tls-server-name"),
    Setting("destination-tls-ca", ROUTE, parse_text, "",
            "with destination-tls: the CA certificates (PEM) destinations are verified "
            "against; empty: the system's store"),
    Setting("destination-tls-server-name", ROUTE, parse_text, "",
            "with destination-tls: the name sent as SNI and verified in the destination's "
            "certificate; empty: the destination's host (name or IP address)"),
    Setting("destination-tls-cert", ROUTE, parse_text, "",
            "with destination-tls: a client certificate (PEM, with its key unless "
            "destination-tls-key names it) presented to destinations"),
    Setting("destination-tls-key", ROUTE, parse_text, "",
            "the key of destination-tls-cert"),
    Setting("accept-proxy", ROUTE, one_of(PROXY_VERSIONS), "no",
            "read a PROXY protocol header (HAProxy's v1 text, v2 binary, or any) before "
            "anything else; its client address becomes the connection's client"),
    Setting("accept-proxy-from", ROUTE, parse_networks, "127.0.0.0/8, ::1",
            "addresses and CIDR blocks whose PROXY headers are believed (the balancers); a "
            "connection from anywhere else ends as bad_proxy_header (on a unix: bind every "
            "peer is believed: the socket file's permissions say who may connect)"),
    Setting("proxy-header-timeout", ROUTE, duration_at_least(0.001, "1ms"), "5s",
            "how long a connection may take to send its whole PROXY header"),
    Setting("send-proxy", ROUTE, one_of(SEND_PROXY_VERSIONS), "no",
            "write a PROXY header to each destination before the first client byte, naming "
            "the client (the one a received header named, with accept-proxy); health checks "
            "then send v1 UNKNOWN or a v2 LOCAL header"),
    Setting("protocol", ROUTE, one_of(PROTOCOLS), "tcp",
            "what the route's clients speak, for refusals they understand: tcp sends "
            "shed-message; mysql an error packet (1040, 1129, 2003); postgres an ErrorResponse "
            "(53300, 08004); redis an -ERR reply; mysql also makes health checks log in"),
    Setting("shed-message", ROUTE, parse_escaped_bytes, "",
            "bytes sent to a shed client before the close, so it can tell busy from down "
            "(protocol tcp)"),
    Setting("max-connect-errors", ROUTE, integer_between(0, 1_000_000_000), "100",
            "consecutive failed connections after which a client host is blocked; 0: never"),
    Setting("blocked-host-time", ROUTE, duration_at_least(0.001, "1ms"), "1m",
            "how long a blocked client host is refused"),
    Setting("allow-from", ROUTE, parse_networks, "",
            "addresses and CIDR blocks that may connect (IPv4-mapped IPv6 peers match IPv4 "
            "blocks); anyone else is closed at accept, counted as denied; empty: everyone. "
            "With accept-proxy the client a PROXY header names is checked"),
    Setting("deny-from", ROUTE, parse_networks, "",
            "addresses and CIDR blocks closed at accept, counted as denied (checked after "
            "allow-from)"),
    Setting("max-connections-per-host", ROUTE, integer_between(0, 10_000_000), "0",
            "live connections one client host may hold in each worker (nginx limit_conn); "
            "more are shed as host_limit; 0: no limit"),
    Setting("max-connect-rate-per-host", ROUTE, integer_between(0, 10_000_000), "0",
            "new connections per second one client host may open in each worker, a token "
            "bucket holding a second's worth; more are shed as host_rate; 0: no limit"),
    Setting("client-connect-timeout", ROUTE, parse_duration, "9s",
            "a client that closes within this without sending a byte counts as a failure"),
    Setting("check-interval", ROUTE, parse_duration, "0",
            "active health checks: TCP connect to each destination this often; 0: none "
            "(a failed destination is then skipped for retry-interval)"),
    Setting("check", ROUTE, one_of(CHECKS), "tcp",
            "what a health check asks: tcp connects; http sends GET check-path and expects "
            "check-expect-status (e.g. Patroni's /primary on 8008); send-expect sends "
            "check-send and expects check-expect in the answer (e.g. INFO replication -> "
            "role:master)"),
    Setting("check-port", ROUTE, integer_between(0, 65535), "0",
            "the port health checks probe on each destination's host; 0: its traffic port"),
    Setting("check-path", ROUTE, parse_text, "/",
            "check = http: the path requested"),
    Setting("check-expect-status", ROUTE, integer_between(100, 599), "200",
            "check = http: the status that means up"),
    Setting("check-send", ROUTE, parse_escaped_bytes, "",
            "check = send-expect: the bytes sent (escapes allowed: INFO replication\\r\\n)"),
    Setting("check-expect", ROUTE, parse_text, "",
            "check = send-expect: a regular expression the answer must match (role:master)"),
    Setting("on-marked-down", ROUTE, one_of(("keep", "shutdown-sessions")), "keep",
            "when checks take a destination down: keep its live connections, or close them "
            "(end=destination_down) so that clients reconnect to one that is up"),
    Setting("slow-start", ROUTE, parse_duration, "0",
            "a destination that comes back up (checks) or is added by discovery takes a share "
            "of new connections growing from nothing to its full share over this time "
            "(round-robin, round-robin-with-fallback, least-connections); 0: at once"),
    Setting("on-marked-up", ROUTE, one_of(("keep", "shutdown-backup-sessions")), "keep",
            "when checks bring a primary (not backup) destination back: keep the live "
            "connections on backups, or close them (end=primary_up) so that clients move "
            "back to the primaries (round-robin-with-fallback)"),
    Setting("check-user", ROUTE, parse_text, "gconn_check",
            "protocol mysql: the user a health check logs in as (empty password) before it "
            "quits, so the server does not count the check as a failed handshake; a missing "
            "user is refused politely and still proves the server up"),
    Setting("rise", ROUTE, integer_between(1, 1000), "2",
            "consecutive good checks that bring a down destination back"),
    Setting("fall", ROUTE, integer_between(1, 1000), "3",
            "consecutive failed checks that take a healthy destination down"),
    Setting("connect-timeout", ROUTE, duration_at_least(0.001, "1ms"), "1s",
            "per destination attempt; past it the next destination is tried"),
    Setting("source", ROUTE, parse_source, "",
            "the local IP address connections to destinations (and health checks) leave from; "
            "empty: the kernel's choice. Several gconn routes or instances on several source "
            "addresses multiply the ephemeral ports available per destination"),
    Setting("retry-interval", ROUTE, parse_duration, "5s",
            "how long a destination that failed to connect is skipped before it is tried again"),
    Setting("idle-timeout", ROUTE, parse_duration, "8h",
            "no byte either way for this long closes both sides; 0 turns it off"),
    Setting("client-fin-timeout", ROUTE, parse_duration, "0",
            "once the client has ended its side (FIN), the other way may be quiet this long "
            "before both are closed (HAProxy's timeout client-fin); 0: idle-timeout applies"),
    Setting("server-fin-timeout", ROUTE, parse_duration, "0",
            "once the destination has ended its side (FIN), the other way may be quiet this "
            "long before both are closed (HAProxy's timeout server-fin); 0: idle-timeout "
            "applies"),
    Setting("max-connection-lifetime", ROUTE, parse_duration, "0",
            "a connection older than this is closed at its first idle moment: nothing in "
            "flight either way for a second (Envoy's max_connection_duration, but never "
            "mid-transfer), so long-lived clients reconnect and spread over destinations "
            "added since; end=max_lifetime; 0: off"),
    Setting("max-connection-lifetime-jitter", ROUTE, parse_duration, "0",
            "with max-connection-lifetime: a random extra in [0, this], drawn per connection, "
            "so connections opened together do not all close together"),
    Setting("tcp-keepalive", ROUTE, parse_boolean, "yes",
            "TCP keepalive probes on both sides, so a peer that vanished without a FIN is "
            "found (HAProxy's clitcpka/srvtcpka)"),
    Setting("tcp-keepalive-idle", ROUTE,
            duration_at_least(1.0, "1s", MAX_KEEPALIVE_TIME, "32767s"), "2m",
            "with tcp-keepalive: quiet time before the first probe (whole seconds)"),
    Setting("tcp-keepalive-interval", ROUTE,
            duration_at_least(1.0, "1s", MAX_KEEPALIVE_TIME, "32767s"), "20s",
            "with tcp-keepalive: time between unanswered probes (whole seconds)"),
    Setting("tcp-keepalive-count", ROUTE, integer_between(1, 127), "3",
            "with tcp-keepalive: unanswered probes after which the connection is dead"),
    Setting("tcp-user-timeout", ROUTE, duration_at_most(MAX_USER_TIMEOUT, "24d"), "0",
            "sent data left unacknowledged this long ends the connection on either side "
            "(TCP_USER_TIMEOUT); 0: the kernel's retransmission limits (about 15 minutes)"),
    Setting("buffer-size", ROUTE, size_between(1024, 16 * MIB, "1k to 16m"), "64k",
            "bytes read from one side at a time; also the most held for a slow reader"),
    Setting("splice", ROUTE, parse_boolean, "yes",
            "bulk streams (a read that fills the buffer) move through a pipe with os.splice, "
            "never copied into Python (Linux; like HAProxy's splice-auto)"),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
PROCESS_SETTINGS = tuple(s for s in SETTINGS if s.scope == PROCESS)
ROUTE_SETTINGS = tuple(s for s in SETTINGS if s.scope in (ROUTE, ROUTE_ONLY))
