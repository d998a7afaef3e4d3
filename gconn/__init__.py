"""gconn: a TCP connection router daemon on gevent greenlets."""

__version__ = "0.1.0"
