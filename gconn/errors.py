"""The error tree of gconn and its named exit codes.

Errors are sorted by whose fault they are (the config's, the environment's, the destination's,
a client's turn refused), never recognised by their text.  The entry point (cli.py) turns
ConfigError into EXIT_CONFIG and StartupError into EXIT_RUNTIME.  Nothing here does I/O.
"""

EXIT_RUNTIME = 1  # the environment said no: port in use, permission denied, descriptors
EXIT_CONFIG = 2  # the configuration is wrong: file, key, value


class GconnError(Exception):
    """Base of every error gconn raises on purpose."""


class ConfigError(GconnError):
    """A setting is wrong: names where it came from, the key, the value and what is allowed."""

    def __init__(self, message, source=None, key=None, section=None):
        self.source = source  # "path:line", "flag --name", "env GCONN_NAME" or a path
        self.key = key
        self.section = section
        super().__init__(message)

    def __str__(self):
        where = [part for part in (self.source, f"[{self.section}]" if self.section else None,
                                   self.key) if part]
        prefix = ": ".join(where)
        message = super().__str__()
        return f"{prefix}: {message}" if prefix else message


class StartupError(GconnError):
    """The environment refused something at start: an address in use, a missing permission."""


class ResourceExhausted(GconnError):
    """This process ran out of descriptors or memory: nobody else's fault."""


class DestinationUnavailable(GconnError):
    """A destination refused or reset the connection attempt."""


class DestinationTimeout(DestinationUnavailable):
    """A destination did not answer the connection attempt within connect-timeout."""


class Shed(GconnError):
    """A client is refused before it is forwarded, for a counted ``reason`` (admission.py's
    shed reasons: queue_timeout, no_destination, ...)."""

    def __init__(self, reason, message):
        self.reason = reason
        super().__init__(message)
