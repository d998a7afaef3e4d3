"""TLS termination, written as a protocol step: contexts from a route's settings, the
handshake in the connection's greenlet, and the client end the pump forwards through.

TLS runs on an ``ssl.SSLObject`` over two memory BIOs (sans-I/O, like h11): gconn moves the
raw bytes itself on the plain non-blocking socket, so the pump keeps its own watchers and
backpressure, and a half-close is a close_notify after which the other direction still flows
(TLS 1.3 allows it; OpenSSL keeps reading after its own close_notify).  ``TlsEnd`` looks like
a socket to the pump: ``recv_into`` gives plaintext (BlockingIOError when a record is still
coming), ``send`` encrypts and keeps at most one chunk of ciphertext the client has not taken
(``unsent``), ``pending`` says plaintext is decrypted but not yet read.  The certificate
checks run at config load (``check_files``), so a broken pair is an exit-2 error at start
and a refused reload (the old workers keep serving) on HUP.
"""

import _ssl
import ssl
import time

from cryptography import x509

from gconn.errors import DestinationUnavailable, GconnError
from gconn.protocols.sni import ServerNames
from gconn.sockets import receive_within, send_within

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
RAW_CHUNK = 64 * 1024  # ciphertext bytes read from the socket at a time
FLUSH_TIMEOUT = 5.0  # seconds a close_notify and the ciphertext before it may take to go out


class TlsError(GconnError):
    """The TLS handshake failed (OpenSSL's reason), timed out, or the client left."""


def server_context(certs, keys, client_ca, min_version, ciphers):
    """The SSLContext of a terminating route: ``certs`` are PEM files, ``keys`` their keys in
    the same order (empty: the keys are in the cert files); with several, the client's server
    name picks the pair whose certificate names it, as sni.ServerNames picks a route (the
    first pair otherwise).  ValueError naming the file and OpenSSL's reason on any problem."""
    contexts = [_context(cert, key, client_ca, min_version, ciphers)
                for cert, key in zip(certs, keys or ("",) * len(certs), strict=True)]
    names = ServerNames([(certificate_names(cert), context)
                         for cert, context in zip(certs, contexts, strict=True)]
                        if len(contexts) > 1 else [])

    def pick(ssl_object, server_name, _context):
        ssl_object.sni = server_name
        chosen = names.route_for(server_name.lower() if server_name else None)
        if chosen is not None:
            ssl_object.context = chosen

    # set through the C type's own slot: gevent's SSLContext wraps the callback for its
    # SSLSocket, while TLS here runs on SSLObjects over memory BIOs (no socket to wait on)
    _ssl._SSLContext.sni_callback.__set__(contexts[0], pick)  # noqa: SLF001
    return contexts[0]


def client_context(ca, cert, key):
    """The SSLContext for connecting to TLS destinations: verify them against ``ca`` (the
    system store when empty) and their name; present ``cert``/``key`` when given.
    ValueError naming the file and OpenSSL's reason on any problem."""
    try:
        context = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"{ca}: {getattr(error, 'reason', None) or error.strerror or error}"
                         ) from None
    if cert:
        load_pair(context, cert, key)
    return context


def load_pair(context, cert, key):
    """Load a certificate (with its chain) and its key into ``context``; ValueError naming
    the file and OpenSSL's reason."""
    try:
        context.load_cert_chain(cert, key or None)
    except FileNotFoundError as error:
        raise ValueError(f"{error.filename}: no such file") from None
    except PermissionError as error:
        raise ValueError(f"{error.filename}: permission denied") from None
    except ssl.SSLError as error:
        raise ValueError(f"{cert}{' / ' + key if key else ''}: {error.reason or error} (is "
                         f"the key the certificate's, both PEM?)") from None


def _context(cert, key, client_ca, min_version, ciphers):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[min_version]
    load_pair(context, cert, key)
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ValueError(f"no cipher matches {ciphers!r}") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"{client_ca}: {getattr(error, 'reason', None) or error}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def certificate_names(path):
    """The DNS names (subjectAltName, else the common name) of the first certificate in the
    PEM file ``path``, lowercased."""
    certificate = _first_certificate(path)
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [attribute.value for attribute
                 in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [name.lower() for name in names]


def expiry(path):
    """When the first certificate of ``path`` stops being valid (an aware datetime)."""
    return _first_certificate(path).not_valid_after_utc


def _first_certificate(path):
    with open(path, "rb") as stream:
        return x509.load_pem_x509_certificate(stream.read())


# the greenlet side ---------------------------------------------------------------------------

class TlsEnd:
    """The client's side of a terminated connection, as the pump sees a socket."""

    __slots__ = ("sock", "tls", "incoming", "outgoing", "unsent", "family", "ended")

    def __init__(self, sock, tls, incoming, outgoing):
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.unsent = b""  # ciphertext the client has not taken yet
        self.family = sock.family
        self.ended = False  # the peer's end came (close_notify or FIN): reads give 0 from now

    def fileno(self):
        return self.sock.fileno()

    def recv_into(self, buffer):
        """Plaintext into ``buffer``, as much as is decrypted or decryptable from what has
        come (several records): its length, 0 at the peer's end (close_notify or a bare FIN),
        BlockingIOError while not even one record has all come."""
        if self.ended:
            return 0
        view = memoryview(buffer)
        total = 0
        while total < len(view):
            try:
                got = self.tls.read(len(view) - total, view[total:])
            except ssl.SSLWantReadError:
                if total:
                    break
                data = self.sock.recv(RAW_CHUNK)  # BlockingIOError: wait for the socket
                if not data:
                    self.ended = True
                    return 0
                self.incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # the end: this call returns what came before it, the next one 0 (pending()
                # says so, since the socket will not signal it again)
                self.ended = True
                break
            if not got:  # CPython reads a received close_notify as 0 bytes, not an error
                self.ended = True
                break
            total += got
        return total

    def pending(self):
        """Whether plaintext, ciphertext or the peer's end is buffered here, which the socket
        will not signal."""
        return self.ended or self.tls.pending() or self.incoming.pending

    def send(self, data):
        """Encrypt all of ``data`` and send what the socket takes; the rest waits in
        ``unsent``.  BlockingIOError while earlier ciphertext is still unsent (then nothing
        of ``data`` is taken); ``send(b"")`` just flushes."""
        if self.unsent and not self._flush():
            raise BlockingIOError
        if data:
            self.tls.write(data)
            self.unsent = self.outgoing.read()
            self._flush()
        return len(data)

    def _flush(self):
        """Send what the socket takes of ``unsent``; True once it is all gone."""
        try:
            sent = self.sock.send(self.unsent)
        except (BlockingIOError, InterruptedError):
            return False
        self.unsent = self.unsent[sent:]
        return not self.unsent

    def shutdown(self, how):
        """Half-close towards the client: a close_notify after everything before it, then
        the socket's own shutdown; the client may still send."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:  # sent ours; theirs may come later, the read side goes on
            pass
        self.unsent += self.outgoing.read()
        if not send_within(self.sock, self.unsent, time.monotonic() + FLUSH_TIMEOUT):
            raise TimeoutError("the client did not take the close_notify in time")
        self.unsent = b""
        self.sock.shutdown(how)


def handshake(sock, context, timeout):
    """Run the server side of a TLS handshake on the non-blocking ``sock`` in this greenlet
    within ``timeout``: the TlsEnd to forward through.  TlsError (OpenSSL's reason, a
    timeout, the client leaving) otherwise; the caller owns and closes ``sock``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    return _handshake(sock, tls, incoming, outgoing, timeout, "client")


def client_handshake(sock, context, server_name, timeout):
    """The client side of a TLS handshake with a destination on the freshly connected
    ``sock``, verifying it as ``server_name``: the TlsEnd to forward through, or TlsError
    (OpenSSL's reason, such as CERTIFICATE_VERIFY_FAILED, or a timeout)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    return _handshake(sock, tls, incoming, outgoing, timeout, "destination")


def connect_destination(sock, context, config, destination):
    """The TLS handshake of route ``config`` with ``destination`` on the freshly connected
    ``sock``, verified as destination-tls-server-name or its host, within connect-timeout:
    the end to forward to.  DestinationUnavailable when it fails (sessions fail over, checks
    count it)."""
    name = config.destination_tls_server_name or destination.address.host
    try:
        return client_handshake(sock, context, name, config.connect_timeout)
    except TlsError as error:
        raise DestinationUnavailable(f"{destination.name}: TLS: {error}") from None


def _handshake(sock, tls, incoming, outgoing, timeout, peer):
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if not send_within(sock, outgoing.read(), deadline):
                    raise TlsError(f"no TLS handshake within {timeout:g}s") from None
                data = receive_within(sock, RAW_CHUNK, deadline)
                if data is None:
                    raise TlsError(f"no TLS handshake within {timeout:g}s") from None
                if not data:
                    raise TlsError(f"{peer} closed during the TLS handshake") from None
                incoming.write(data)
            except ssl.SSLError as error:
                try:  # the alert that tells the client why
                    send_within(sock, outgoing.read(), time.monotonic())
                except OSError:
                    pass
                reason = error.reason or str(error)
                detail = getattr(error, "verify_message", None)
                raise TlsError(f"{reason} ({detail})" if detail else reason) from None
        if not send_within(sock, outgoing.read(), deadline):
            raise TlsError(f"no TLS handshake within {timeout:g}s")
    except OSError as error:
        raise TlsError(f"{peer} failed during the TLS handshake: "
                       f"{error.strerror or error}") from None
    return TlsEnd(sock, tls, incoming, outgoing)
