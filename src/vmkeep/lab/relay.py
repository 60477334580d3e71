"""A TCP-to-unix-socket relay: host 1 of the two-host lab is the machine's own libvirtd, which
listens on its unix socket only; this relay makes it reachable at ``qemu+tcp://ADDRESS/system``
without restarting it. Run as ``python -m vmkeep.lab.relay ADDRESS PORT SOCKET`` (started and
stopped by ``vmkeep.lab.hosts``). Each TCP connection gets its own unix connection, so a
libvirtd restarted meanwhile is simply reached again by the next connection."""

from __future__ import annotations

import asyncio
import contextlib
import sys

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _serve(address: str, port: int, socket_path: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            unix_reader, unix_writer = await asyncio.open_unix_connection(socket_path)
        except OSError as err:
            print(f"relay: {socket_path}: {err}", file=sys.stderr, flush=True)
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, unix_writer), _pipe(unix_reader, writer), return_exceptions=True
        )

    server = await asyncio.start_server(handle, address, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m vmkeep.lab.relay ADDRESS PORT SOCKET", file=sys.stderr)
        return 2
    address, port, socket_path = argv
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(address, int(port), socket_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
