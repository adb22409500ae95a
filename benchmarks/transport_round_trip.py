"""Round trip of one decode step's message through a persistent libp2p stream and over TCP.

    python benchmarks/transport_round_trip.py [--messages 1000] [--hidden 256] [--gaps-ms 0 2]

An inference step sends one message (a hidden state of ``hidden`` float32 values plus a signed
request, framed as the node's streams frame it) and gets one of the same size back. This echoes
such a message from another process, as a node would answer, over a persistent stream between
two hivemind daemons on 127.0.0.1 (the swarm's transport) and over a plain loopback TCP
connection, in one run. Each round trip can follow an idle gap: in a swarm a node waits while
the other nodes compute, and waking sleeping processes is part of the price. Printed: median and
p90 round trip of each, what two hops pay, and the ratio of the two transports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from rich.console import Console
from rich.table import Table

from corolla.node.protocol.framing import pack_parts
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.tensors import serialize_tensor
from corolla.simulations.scenes import latency_ms

ECHO = "corolla-benchmark-echo"
REQUEST_BYTES = 600
"""About what a signed step request adds to the tensor (metadata, signature, digests)."""


def step_message(hidden: int) -> bytes:
    """A framed message the size of a decode step's: [1, 1, hidden] float32 and a request."""
    part = runtime_pb2.ExpertRequest(
        metadata=bytes(REQUEST_BYTES), tensors=[serialize_tensor(torch.randn(1, 1, hidden))]
    )
    return pack_parts([part])


# --------------------------------------------------------------------------- the echo process


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


async def serve(transport: str) -> None:
    """Echo on `transport` until stdin closes; first print how to reach it."""
    if transport == "tcp":
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    else:
        p2p = await P2P.create(**p2p_options())
        await p2p.add_binary_stream_handler(ECHO, lambda _info, r, w: echo(r, w))
        addresses = " ".join(str(address) for address in await p2p.get_visible_maddrs())
        print(f"ready {p2p.peer_id.to_base58()} {addresses}", flush=True)
    await asyncio.to_thread(sys.stdin.read)


@contextlib.contextmanager
def echo_process(transport: str) -> Iterator[list[str]]:
    """An echo server in a child process; yields what its ready line says."""
    command = [sys.executable, __file__, "--serve", transport]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith("ready"):
            raise RuntimeError(f"the {transport} echo process did not start")
        yield line.split()[1:]
    finally:
        if process.stdin:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------- measuring


async def round_trips(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    message: bytes,
    count: int,
    gap: float,
) -> list[float]:
    for _ in range(50):  # warm-up
        writer.write(message)
        await reader.readexactly(len(message))
    times = []
    for _ in range(count):
        await asyncio.sleep(gap)
        began = time.perf_counter()
        writer.write(message)
        await writer.drain()
        await reader.readexactly(len(message))
        times.append(time.perf_counter() - began)
    writer.close()
    return times


async def through_libp2p(ready: list[str], message: bytes, count: int, gap: float) -> list[float]:
    peer, *addresses = ready
    client = await P2P.create(**p2p_options(), initial_peers=addresses)
    try:
        _, reader, writer = await client.call_binary_stream_handler(PeerID.from_base58(peer), ECHO)
        return await round_trips(reader, writer, message, count, gap)
    finally:
        await client.shutdown()


async def through_tcp(ready: list[str], message: bytes, count: int, gap: float) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(ready[0]))
    return await round_trips(reader, writer, message, count, gap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--gaps-ms", type=float, nargs="+", default=[0.0, 2.0],
        help="Idle time before each round trip (a node waits this long while others compute).",
    )  # fmt: skip
    parser.add_argument("--serve", choices=("tcp", "libp2p"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    console = Console()
    message = step_message(args.hidden)
    medians: dict[tuple[str, float], float] = {}
    table = Table(title=f"round trip of a {len(message)}-byte message, {args.messages} times")
    for column in ("transport", "idle before each, ms", "median ms", "p90 ms", "2 hops, ms"):
        table.add_column(column)
    transports = (("libp2p stream", "libp2p", through_libp2p), ("loopback TCP", "tcp", through_tcp))
    for gap_ms in args.gaps_ms:
        for name, transport, measure in transports:
            with (
                console.status(f"{args.messages} round trips through {name}, {gap_ms} ms apart"),
                echo_process(transport) as ready,
            ):
                times = asyncio.run(measure(ready, message, args.messages, gap_ms / 1000))
            median, p90 = latency_ms(times)
            medians[name, gap_ms] = median
            table.add_row(name, f"{gap_ms:g}", f"{median:.3f}", f"{p90:.3f}", f"{2 * median:.2f}")
    console.print(table)
    for gap_ms in args.gaps_ms:
        ratio = medians["libp2p stream", gap_ms] / medians["loopback TCP", gap_ms]
        console.print(f"{gap_ms:g} ms apart: a libp2p stream round trip is {ratio:.1f}x a TCP one")


if __name__ == "__main__":
    main()
