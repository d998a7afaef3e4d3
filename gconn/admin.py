"""The admin HTTP endpoint, served by the supervisor with gevent.pywsgi.

``/livez`` answers from the supervisor's own loop and never waits on workers or destinations
(Keycloak's lesson: a busy process must not be restarted for answering slowly).  ``/readyz``,
``/status`` and ``/connections`` ask the workers through the fleet (fleet.py) when requested,
never on the data path; this module only parses requests and shapes answers.  ``/config``
shows the effective config with the origin of every value.  Two POSTs change state (never a
GET): ``/destinations/ROUTE/DESTINATION`` with ``state=drain|maint|ready`` (``grace=`` for
maint) and/or ``weight=N``, and ``/unblock/ROUTE/HOST``; the supervisor applies them in every
worker (runtime.py).  Bound to loopback by default;
elsewhere a bearer token (``admin-token-file``) or ``--admin-insecure`` is required.  The probes
(``/livez``, ``/readyz``) answer without the token, as Kubernetes' own API server does, because
kubelets and balancers' health checks cannot carry a secret; a caller without the token gets
their status and first line only, not the reasons.  Bad paths get 404, bad query values 400 with
a one-line JSON error, a wrong or missing token elsewhere 401 without detail.
"""

import hmac
import json
import logging
import urllib.parse

from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from . import metrics, runtime
from .settings import MAX_WEIGHT, parse_duration
from .sockets import bound_address, listen

LOGGER = logging.getLogger("gconn.admin")
ADMIN_CONNECTIONS = 256  # admin requests served at once
READ_TIMEOUT = 2.0  # seconds an admin client may take to send its request
PAGE_LIMIT = 1000  # /connections entries per page when no limit is given
PAGE_LIMIT_MAX = 100_000  # the largest limit a request may ask for
FORM_LIMIT = 4096  # bytes of a POST's form
PROBES = ("/livez", "/readyz")  # answered without the token: status and first line only


class TimedWSGIServer(WSGIServer):
    """pywsgi with a read timeout: an idle admin client cannot hold a slot (or the
    supervisor's forks, which wait for in-flight requests) for more than READ_TIMEOUT."""

    def handle(self, sock, address):
        sock.settimeout(READ_TIMEOUT)
        super().handle(sock, address)


class AccessLog:
    """pywsgi's request log, sent to the daemon log at debug level."""

    def write(self, line):
        LOGGER.debug("%s", line.rstrip())


class Admin:
    """The admin endpoint of one supervisor."""

    def __init__(self, address, token, fleet, metrics_dir, current_config, changer=None,
                 sock=None):
        self.token = token  # the bearer token every request must carry; None: no check
        self.fleet = fleet  # the supervisor's workers, asked together
        self.metrics_dir = metrics_dir  # the workers' prometheus-client multiprocess files
        self.current_config = current_config  # returns the Config in effect (reloads change it)
        self.changer = changer  # the supervisor: set_destination and unblock
        self.socket = sock or listen(address, 128)  # sock: handed over by an upgrade
        self.address = bound_address(self.socket, address)
        # Requests are served by greenlets of this pool, one connection each, closed after
        # one answer: the supervisor forks only while the pool is empty, so no request is
        # ever half-way in a freshly forked worker.
        self.pool = Pool(ADMIN_CONNECTIONS)
        self.server = TimedWSGIServer(self.socket, self.application, spawn=self.pool,
                                      log=AccessLog(), error_log=AccessLog())
        self.routes = {"/livez": self.livez, "/readyz": self.readyz, "/status": self.status,
                       "/connections": self.connections, "/config": self.config,
                       "/metrics": self.metrics}
        self.posts = {"destinations": self.set_destination, "unblock": self.unblock}

    def start(self):
        self.server.start()
        LOGGER.info("admin listening address=%s", self.address)

    def stop(self):
        self.server.close()

    @property
    def busy(self):
        """Whether a request is being served (the supervisor then waits to fork)."""
        return len(self.pool) > 0

    def abandon(self):
        """In a forked worker: drop the copy of the admin endpoint (the supervisor keeps it)."""
        self.server.close()
        self.pool.kill(block=True, timeout=1)

    # --- WSGI ------------------------------------------------------------------------------

    def application(self, environ, start_response):
        """Answer one request: plain text or JSON; to HEAD, the same status and headers
        without the body (RFC 9110 9.3.2: pywsgi would send it, and a client reading the
        next answer on the connection would take it for that)."""
        data = self.dispatch(environ, start_response)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else data

    def dispatch(self, environ, start_response):
        """Dispatch one request to its endpoint; the answer's body."""
        path = environ.get("PATH_INFO", "")
        authorised = self.token is None or self.authorised(environ)
        if not authorised and path not in PROBES:
            return self.reply(start_response, 401, {"error": "unauthorized"})
        kind, _, rest = path.lstrip("/").partition("/")
        if kind in self.posts:
            if environ.get("REQUEST_METHOD") != "POST":
                return self.reply(start_response, 405, {"error": "POST only"})
            try:
                return self.reply(start_response, 200, self.posts[kind](rest, form(environ)))
            except BadRequest as error:
                return self.reply(start_response, 400, {"error": str(error)})
        handler = self.routes.get(path)
        if handler is None or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return self.reply(start_response, 404, {"error": "not found"})
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        try:
            code, body = handler({key: values[-1] for key, values in query.items()})
        except BadRequest as error:
            return self.reply(start_response, 400, {"error": str(error)})
        if not authorised:  # a probe: what is wrong inside is for the token's holders
            body = body.split("\n", 1)[0] + "\n"
        return self.reply(start_response, code, body)

    def authorised(self, environ):
        """Whether the request carries the bearer token (compared in constant time)."""
        given = environ.get("HTTP_AUTHORIZATION", "")
        expected = f"Bearer {self.token}"
        return hmac.compare_digest(given.encode(), expected.encode())

    @staticmethod
    def reply(start_response, code, body):
        """Send ``body`` with HTTP status ``code`` (text as is, anything else as one line of
        JSON)."""
        reasons = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                   405: "Method Not Allowed", 503: "Service Unavailable"}
        if isinstance(body, bytes):  # the Prometheus text format
            data, kind = body, "text/plain; version=0.0.4; charset=utf-8"
        elif isinstance(body, str):
            data, kind = body.encode(), "text/plain; charset=utf-8"
        else:
            data, kind = (json.dumps(body) + "\n").encode(), "application/json"
        start_response(f"{code} {reasons[code]}",
                       [("Content-Type", kind), ("Content-Length", str(len(data))),
                        ("Connection", "close")])
        return [data]

    # --- endpoints -------------------------------------------------------------------------

    def livez(self, query):
        """200 while the supervisor's loop runs: nothing else is consulted."""
        return 200, "ok\n"

    def readyz(self, query):
        """200 when every route listens in every worker with a healthy destination."""
        reasons = self.fleet.readiness_problems()
        if reasons:
            return 503, "not ready\n" + "".join(f"{reason}\n" for reason in reasons)
        return 200, "ready\n"

    def status(self, query):
        """Per-route totals over the workers: active/limit, queued, shed, destinations (JSON)."""
        return 200, self.fleet.totals()

    def connections(self, query):
        """Live connections of every worker, filtered and paginated (JSON); ``stack=1`` adds
        each one's greenlet stack."""
        unknown = set(query) - {"route", "client", "limit", "offset", "stack"}
        if unknown:
            raise BadRequest(f"unknown query parameter {sorted(unknown)[0]!r}")
        limit = whole_number(query, "limit", PAGE_LIMIT, 1, PAGE_LIMIT_MAX)
        offset = whole_number(query, "offset", 0, 0, 10**12)
        found = self.fleet.connections(stacks=switch(query, "stack"))
        if query.get("route"):
            found = [c for c in found if c["route"] == query["route"]]
        if query.get("client"):
            found = [c for c in found if c["client"].startswith(query["client"])]
        found.sort(key=lambda c: (c["started"], str(c["id"])))
        return 200, {"total": len(found), "offset": offset, "limit": limit,
                     "connections": found[offset:offset + limit]}

    def metrics(self, query):
        """Prometheus text over every worker (multiprocess files, summed), each worker asked
        first to publish what it counted since its last heartbeat."""
        self.fleet.flush_metrics()
        return 200, metrics.render(self.metrics_dir)

    def set_destination(self, rest, fields):
        """POST /destinations/ROUTE/DESTINATION: state=ready|drain|maint (grace=SECONDS for
        maint, default 0), weight=N; applied in every worker."""
        route, destination = target(rest, "destinations")
        unknown = set(fields) - {"state", "weight", "grace"}
        if unknown or not {"state", "weight"} & set(fields):
            raise BadRequest("expected state=ready|drain|maint and/or weight=N (grace= for "
                             "maint)")
        state = fields.get("state")
        if state is not None and state not in runtime.STATES:
            raise BadRequest(f"state must be one of {', '.join(runtime.STATES)}")
        weight = None
        if "weight" in fields:
            weight = whole_number(fields, "weight", None, 0, MAX_WEIGHT)
        grace = fields.get("grace") or "0"
        try:
            grace = parse_duration(grace)
        except ValueError as error:
            raise BadRequest(f"grace: {error}") from None
        try:
            answer = self.changer.set_destination(route, destination, state, weight, grace)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        return {"route": route, "destination": destination, "state": state, "weight": weight,
                **answer}

    def unblock(self, rest, fields):
        """POST /unblock/ROUTE/HOST: lift the host's block in every worker."""
        route, host = target(rest, "unblock")
        if fields:
            raise BadRequest("no fields expected")
        try:
            answer = self.changer.unblock(route, host)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        return {"route": route, "host": host, **answer}

    def config(self, query):
        """The effective configuration, each value with where it came from (JSON)."""
        values = self.current_config().values
        return 200, {section: {key: {"value": value.text, "source": value.source}
                               for key, value in entries.items()}
                     for section, entries in values.items()}


def form(environ):
    """A POST's fields: its urlencoded body (at most FORM_LIMIT bytes) and query string."""
    fields = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""),
                                         keep_blank_values=True))
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise BadRequest("Content-Length must be a number") from None
    if not 0 <= length <= FORM_LIMIT:
        raise BadRequest(f"a form of at most {FORM_LIMIT} bytes")
    if length:
        body = environ["wsgi.input"].read(length).decode("utf-8", "replace")
        fields.update(urllib.parse.parse_qsl(body, keep_blank_values=True))
    return fields


def target(rest, what):
    """(route, the rest) of a POST's path after its kind: ROUTE/NAME, NAME percent-decoded
    (a destination's own ``/`` of unix:/path included)."""
    route, _, name = rest.partition("/")
    route, name = urllib.parse.unquote(route), urllib.parse.unquote(name)
    if not route or not name:
        raise BadRequest(f"expected /{what}/ROUTE/NAME")
    return route, name


class BadRequest(ValueError):
    """A query value the admin endpoint cannot use."""


def whole_number(query, name, default, low, high):
    """``query[name]`` as an integer from ``low`` to ``high``, or BadRequest."""
    text = query.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def switch(query, name):
    """``query[name]`` as a bool from ``0`` or ``1`` (absent or empty: False), or BadRequest."""
    text = query.get(name) or "0"
    if text not in ("0", "1"):
        raise BadRequest(f"{name} must be 0 or 1")
    return text == "1"
