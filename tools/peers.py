"""The Python peers gconn is benchmarked against: small, fair TCP forwarders.

``asyncio`` (optionally on uvloop) and gevent's naive two-greenlet port forwarder, each
forwarding one listening port to one target with the same 64 KiB buffer, no logging, and
TCP_NODELAY on both sides.  Each prints ``listening address=HOST:PORT`` once it accepts.

    python -m gconn_tools.peers asyncio --listen 127.0.0.1:0 --target 127.0.0.1:6379 [--uvloop]
    python -m gconn_tools.peers gevent --listen 127.0.0.1:0 --target 127.0.0.1:6379
"""

import argparse
import socket
import sys

BUFFER = 64 * 1024  # bytes per read, as gconn's default buffer-size


def split(address):
    host, _, port = address.rpartition(":")
    return host, int(port)


def run_asyncio(listen, target, use_uvloop):
    """An asyncio streams forwarder, the way most asyncio proxies are written."""
    import asyncio

    async def pipe(reader, writer):
        try:
            while data := await reader.read(BUFFER):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            try:
                writer.write_eof()
            except OSError:
                pass

    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, upstream_writer):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                       socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(client_reader, upstream_writer),
                             pipe(upstream_reader, client_writer))
        client_writer.close()
        upstream_writer.close()

    async def main():
        server = await asyncio.start_server(handle, *listen, backlog=4096)
        host, port = server.sockets[0].getsockname()[:2]
        print(f"listening address={host}:{port}", flush=True)
        await server.serve_forever()

    if use_uvloop:
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())


def run_gevent(listen, target):
    """gevent's example port forwarder: two greenlets per connection, recv then sendall."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.server import StreamServer

    def forward(source, destination):
        try:
            while data := source.recv(BUFFER):
                destination.sendall(data)
        except OSError:
            pass
        finally:
            try:
                destination.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def handle(client, address):
        try:
            upstream = socket.create_connection(target)
        except OSError:
            client.close()
            return
        for connection in (client, upstream):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gevent.joinall([gevent.spawn(forward, client, upstream),
                        gevent.spawn(forward, upstream, client)])
        client.close()
        upstream.close()

    server = StreamServer(listen, handle, backlog=4096)
    server.start()
    host, port = server.address[:2]
    print(f"listening address={host}:{port}", flush=True)
    server.serve_forever()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gconn_tools.peers", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("asyncio", "gevent"))
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--uvloop", action="store_true")
    options = parser.parse_args(argv)
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if options.kind == "asyncio":
        run_asyncio(split(options.listen), split(options.target), options.uvloop)
    else:
        run_gevent(split(options.listen), split(options.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
