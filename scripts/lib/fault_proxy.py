"""An HTTP front for benchmarks that breaks one download the way real networks do.

    python fault_proxy.py UPSTREAM_HOST:PORT none|reset|stall [--min-bytes N] [--stall S]

Prints the port it listens on, then passes every request through (one per connection),
except the first object GET whose answer is at least --min-bytes long: in its middle the
connection is closed (reset) or goes silent for --stall seconds (stall). kura must resume
that read; the bench times the restore against an undisturbed one through the same front.
"""

import argparse
import asyncio
import sys

disturbed = False


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    return head


def content_length(head):
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def without_connection(head):
    lines = [l for l in head.split(b"\r\n") if l and not l.lower().startswith(b"connection:")]
    return b"\r\n".join(lines) + b"\r\nconnection: close\r\n\r\n"


async def serve(client_reader, client_writer, upstream, mode, min_bytes, stall):
    global disturbed
    try:
        head = await read_head(client_reader)
        body = await client_reader.readexactly(content_length(head))
        method, target = head.split(b" ")[:2]
        host, port = upstream.rsplit(":", 1)
        server_reader, server_writer = await asyncio.open_connection(host, int(port))
        server_writer.write(without_connection(head) + body)
        await server_writer.drain()
        answer = await read_head(server_reader)
        length = content_length(answer)
        client_writer.write(without_connection(answer))
        cut = None
        # An object GET: no query but the SDK's own `x-id=GetObject`.
        query = target.partition(b"?")[2]
        if (mode != "none" and not disturbed and method == b"GET" and query in (b"", b"x-id=GetObject")
                and answer.startswith(b"HTTP/1.1 200") and length >= min_bytes):
            disturbed = True
            cut = length // 2
            print(f"fault_proxy: {mode} at byte {cut} of {length} ({target.decode()})",
                  file=sys.stderr, flush=True)
        sent = 0
        while True:
            chunk = await server_reader.read(1 << 16)
            if not chunk:
                break
            if cut is not None and sent + len(chunk) >= cut:
                client_writer.write(chunk[: cut - sent])
                await client_writer.drain()
                if mode == "stall":
                    await asyncio.sleep(stall)
                break
            client_writer.write(chunk)
            sent += len(chunk)
            await client_writer.drain()
        server_writer.close()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        client_writer.close()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("upstream")
    parser.add_argument("mode", choices=["none", "reset", "stall"])
    parser.add_argument("--min-bytes", type=int, default=1 << 20)
    parser.add_argument("--stall", type=float, default=120.0)
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, args.upstream, args.mode, args.min_bytes, args.stall),
        "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
