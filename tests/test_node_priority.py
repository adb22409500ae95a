"""Priority on a node: ticketed sessions go first, bad tickets fall back to free, floods get
"busy", and ticketed work is redeemed at a real ledger.

An in-process :class:`NodeService` serves blocks 0:2 of the tiny BLOOM on a real hivemind daemon;
the test talks to it from another daemon through the raw client. Tickets are signed by a ledger
identity in the test (nodes check them offline) or bought from a real ledger server. The last
test runs ``corolla node run --ledger URL`` as a process against a real ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from hivemind.p2p import P2P, PeerID
from ledger_fixtures import earn, free_port, make_pairs, running_server, seed_identity
from swarm_fixtures import Swarm

from corolla.cli import main
from corolla.errors import NodeBusy
from corolla.ledger.api.client import AsyncLedgerClient, LedgerClient
from corolla.node.behaviour import Behaviour
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.messages import OpenSession, SessionOpened, StepMessage, StepOutput
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.stream import InferenceStream, request_forward, request_info
from corolla.node.scheduler import Priority, SchedulerConfig
from corolla.node.service import NodeService, ServiceConfig
from corolla.node.settlement import REDEEMED_PREFIX, Settlement
from corolla.node.ticket_book import TicketBook, TicketConfig
from corolla.verify.digests import GENESIS_CHAIN, tensor_digest
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity, load_identity
from corolla.verify.receipts import sign_request, verify_receipt, work_units
from corolla.verify.tickets import Ticket, issue_ticket
from corolla.version import PROTOCOL_VERSION

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

TIMEOUT = 60.0
LEDGER = seed_identity("test ledger")


@pytest.fixture(scope="module")
def span(bloom_dir) -> Span:
    return load_span(bloom_dir, 0, 2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemons():
    """Two node daemons and a client daemon that knows both."""
    first = await P2P.create(**p2p_options())
    second = await P2P.create(**p2p_options())
    try:
        maddrs = [*await first.get_visible_maddrs(), *await second.get_visible_maddrs()]
        client = await P2P.create(**p2p_options(), initial_peers=maddrs)
        try:
            yield first, second, client
        finally:
            await client.shutdown()
    finally:
        await second.shutdown()
        await first.shutdown()


@contextlib.asynccontextmanager
async def serving(p2p: P2P, span: Span, config: ServiceConfig):
    service = NodeService(span, Identity.generate(), config)
    await service.add_handlers(p2p)
    try:
        yield service
    finally:
        await service.remove_handlers(p2p)
        service.shutdown()


def trusting(ledger_key: bytes | None = LEDGER.public_key, **queue: int) -> ServiceConfig:
    return ServiceConfig(
        scheduler=SchedulerConfig(**queue), tickets=TicketConfig(ledger_key=ledger_key)
    )


def ticket_for(
    client: Identity, budget: int = 10_000, lifetime_s: float = 3600, ledger: Identity = LEDGER
) -> Ticket:
    expiry = int((time.time() + lifetime_s) * 1000)
    return issue_ticket(ledger, client.public_key, budget, 1, expiry, os.urandom(32))


class Client:
    """One session of one client on one node: signs steps, checks replies against a local span."""

    def __init__(
        self,
        span: Span,
        identity: Identity | None = None,
        ticket: Ticket | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.span = span
        self.identity = identity or Identity.generate()
        self.ticket = ticket
        self.raw_ticket = raw if raw is not None else ticket and canonical(ticket.to_value())
        self.session_id = os.urandom(16)
        self.step_index = self.position = 0
        self.chain = GENESIS_CHAIN
        self.reference = span.new_cache(1)
        self.generator = torch.Generator().manual_seed(7)
        self.notes: list[str] = []
        self.latencies: list[float] = []

    def opening(self) -> OpenSession:
        span = self.span
        key = self.identity.public_key
        return OpenSession(self.session_id, 1, 64, span.start, span.end, key, self.raw_ticket)

    def step(self, tokens: int, name_ticket: bool = True) -> StepMessage:
        hidden = torch.randn(1, tokens, self.span.hidden_size, generator=self.generator)
        request = sign_request(
            self.identity,
            protocol_version=PROTOCOL_VERSION,
            model_digest=self.span.model_digest,
            span_digest=self.span.digest,
            start=self.span.start,
            end=self.span.end,
            session_id=self.session_id,
            step=self.step_index,
            position=self.position,
            tokens=tokens,
            input_digest=tensor_digest(hidden),
            ticket_digest=self.ticket.digest() if self.ticket and name_ticket else None,
        )
        return StepMessage(request, hidden)

    async def run(
        self, stream: InferenceStream, node_key: bytes, tokens: int, name_ticket: bool = True
    ) -> StepOutput:
        """One step; its receipt and output are checked, its latency and note kept."""
        step = self.step(tokens, name_ticket)
        began = time.perf_counter()
        output = await stream.step(step, TIMEOUT)
        self.latencies.append(time.perf_counter() - began)
        verify_receipt(
            output.receipt,
            request=step.request,
            output=output.hidden,
            previous_chain=self.chain,
            node_key=node_key,
        )
        assert torch.equal(output.hidden, self.span.forward(step.hidden, self.reference))
        self.chain = output.receipt.chain_digest
        self.step_index += 1
        self.position += tokens
        if output.note:
            self.notes.append(output.note)
        return output


async def until(predicate, tries: int = 600) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never held")


@contextlib.asynccontextmanager
async def session(client_p2p: P2P, node: P2P, client: Client):
    stream = InferenceStream(client_p2p, node.peer_id)
    try:
        opened = await stream.open(client.opening(), TIMEOUT)
        yield stream, opened
    finally:
        await stream.close()


async def generate(client_p2p, node, service, client, steps: int) -> SessionOpened:
    """A prefill of 4 tokens, then ``steps`` one-token steps; every output checked."""
    async with session(client_p2p, node, client) as (stream, opened):
        key = service.identity.public_key
        await client.run(stream, key, 4)
        client.latencies.clear()
        for _ in range(steps):
            await client.run(stream, key, 1)
    return opened


async def load(client_p2p, node, span, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """A free client sending one-shot forwards of 4 x 96 tokens until ``stop``."""
    identity = Identity.generate()
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 96, span.hidden_size, generator=generator)
    while not stop.is_set():
        request = sign_request(
            identity,
            protocol_version=PROTOCOL_VERSION,
            model_digest=span.model_digest,
            span_digest=span.digest,
            start=span.start,
            end=span.end,
            session_id=os.urandom(16),
            step=0,
            position=0,
            tokens=4 * 96,
            input_digest=tensor_digest(hidden),
        )
        try:
            await request_forward(client_p2p, node.peer_id, StepMessage(request, hidden))
            counts["served"] += 1
        except NodeBusy:
            counts["busy"] += 1
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def loaded(client_p2p, node, span, clients: int):
    stop = asyncio.Event()
    counts = {"served": 0, "busy": 0}
    tasks = [
        asyncio.create_task(load(client_p2p, node, span, stop, counts)) for _ in range(clients)
    ]
    try:
        yield counts
    finally:
        stop.set()
        await asyncio.gather(*tasks)


# --------------------------------------------------------------------------- priority


async def test_a_ticketed_session_is_served_ahead_of_free_load(daemons, span):
    node, _, peer = daemons
    payer = Identity.generate()
    async with serving(node, span, trusting()) as service:
        paid = Client(span, payer, ticket_for(payer))
        free = Client(span)
        async with loaded(peer, node, span, clients=4) as counts:
            await until(lambda: counts["served"] >= 4)  # the load is flowing
            opened_paid, opened_free = await asyncio.gather(
                generate(peer, node, service, paid, steps=8),
                generate(peer, node, service, free, steps=8),
            )
        assert (opened_paid.priority, opened_free.priority) == ("high", "free")
        assert "ticket honoured" in opened_paid.note and opened_free.note == ""
        served = list(service.scheduler.served)
        high = [job for job in served if job.priority == Priority.HIGH]
        assert len(high) == 9  # the paid session's prefill and 8 steps, nothing else
        assert all(job.overtook == 0 for job in served if job.priority == Priority.FREE)
        assert sum(job.overtook for job in high) > 0  # it went past queued free work
        assert statistics.median(paid.latencies) < statistics.median(free.latencies)
        assert service.tickets.used(paid.ticket.digest()) == (4 + 8) * 2
        assert len(service.tickets.earned) == 9 and not paid.notes


class _Traced(Behaviour):
    """Honest, but it notes when each step starts and ends, and a free step's first block
    boundary waits (bounded) until a ticketed step is queued behind it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.ticketed_waiting: Callable[[], bool] = lambda: False

    def compute(self, request, span, hidden, cache, between=None):
        kind = "paid" if request.ticket_digest is not None else "free"
        first_boundary = [kind == "free"]

        def boundary() -> None:
            if first_boundary.pop() if first_boundary else False:
                deadline = time.monotonic() + TIMEOUT
                while not self.ticketed_waiting() and time.monotonic() < deadline:
                    time.sleep(0.001)
            if between is not None:
                between()

        self.events.append(f"{kind} starts")
        output = super().compute(request, span, hidden, cache, boundary)
        self.events.append(f"{kind} ends")
        return output


async def test_a_ticketed_step_runs_between_the_blocks_of_a_free_step_already_running(
    daemons, span
):
    node, _, peer = daemons
    payer = Identity.generate()
    traced = _Traced()
    service = NodeService(span, Identity.generate(), trusting(inline_seconds=0), traced)
    traced.ticketed_waiting = lambda: service.scheduler.queued(Priority.HIGH) > 0
    await service.add_handlers(node)
    try:
        paid, free = Client(span, payer, ticket_for(payer)), Client(span)
        key = service.identity.public_key
        async with (
            session(peer, node, paid) as (paid_stream, _),
            session(peer, node, free) as (free_stream, _),
        ):
            await paid.run(paid_stream, key, 4)
            traced.events.clear()
            free_step = asyncio.create_task(free.run(free_stream, key, 4))
            await until(lambda: traced.events == ["free starts"])
            await paid.run(paid_stream, key, 1)  # checked against the local span, as the free one
            await free_step
        # The paid step ran whole inside the free one, at its block boundary (2 blocks: one).
        assert traced.events == ["free starts", "paid starts", "paid ends", "free ends"]
        assert service.scheduler.preempted == 1
        assert list(service.scheduler.served)[-1] == (Priority.HIGH, 2, 1)  # past the free one
    finally:
        await service.remove_handlers(node)
        service.shutdown()


async def test_a_flood_of_free_requests_is_refused_busy_while_the_node_stays_responsive(
    daemons, span
):
    node, _, peer = daemons
    payer = Identity.generate()
    async with serving(node, span, trusting(max_queue=6, max_free_queue=3)) as service:
        async with loaded(peer, node, span, clients=12) as counts:
            await until(lambda: counts["busy"] >= 5)
            infos = [await request_info(peer, node.peer_id) for _ in range(3)]
            paid = Client(span, payer, ticket_for(payer))
            opened = await generate(peer, node, service, paid, steps=3)
            flooded = counts["busy"]
        assert flooded >= 5 and counts["served"] > 0
        assert all(info.queued_free <= 3 and info.start == 0 for info in infos)
        assert opened.priority == "high" and len(paid.latencies) == 3
        free = Client(span)  # free use works again once the flood is over
        assert (await generate(peer, node, service, free, steps=2)).priority == "free"


async def test_with_no_room_for_free_work_free_steps_are_busy_and_ticketed_ones_run(daemons, span):
    node, _, peer = daemons
    async with serving(node, span, trusting(max_queue=1, max_free_queue=0)) as service:
        free = Client(span)
        async with session(peer, node, free) as (stream, opened):
            for _ in range(2):  # the stream stays usable after a busy refusal
                with pytest.raises(NodeBusy, match="requests with a ticket go ahead"):
                    await free.run(stream, service.identity.public_key, 4)
        assert opened.priority == "free" and free.step_index == 0
        payer = Identity.generate()
        paid = Client(span, payer, ticket_for(payer))
        assert (await generate(peer, node, service, paid, steps=2)).priority == "high"


# --------------------------------------------------------------------------- tickets


OWNER = Identity.generate()
STRANGER = Identity.generate()


def _expired() -> Ticket:
    return ticket_for(OWNER, lifetime_s=-5)


def _forged() -> Ticket:
    return dataclasses.replace(ticket_for(OWNER, budget=10), budget=10**9)


def _foreign() -> Ticket:
    return ticket_for(STRANGER)


def _other_ledger() -> Ticket:
    return ticket_for(OWNER, ledger=Identity.generate())


BAD_TICKETS = [
    ("expired", _expired, None, "expired"),
    ("forged", _forged, None, "does not verify"),
    ("foreign", _foreign, None, "belongs to client"),
    ("other ledger", _other_ledger, None, "trusts ledger"),
    ("garbage", lambda: None, b"\x07not a ticket", "unreadable"),
]


@pytest.mark.parametrize(
    ("make", "raw", "text"), [case[1:] for case in BAD_TICKETS], ids=[c[0] for c in BAD_TICKETS]
)
async def test_a_ticket_that_is_not_honoured_opens_free_with_a_note_and_the_session_completes(
    daemons, span, make, raw, text
):
    node, _, peer = daemons
    async with serving(node, span, trusting()) as service:
        ticket = make()
        client = Client(span, OWNER, ticket, raw)
        opened = await generate(peer, node, service, client, steps=3)
        assert opened.priority == "free"
        assert text in opened.note and "free priority" in opened.note
        assert all(job.priority == Priority.FREE for job in service.scheduler.served)
        assert not service.tickets.earned


async def test_a_node_that_trusts_no_ledger_honours_no_ticket(daemons, span):
    node, _, peer = daemons
    async with serving(node, span, trusting(ledger_key=None)) as service:
        client = Client(span, OWNER, ticket_for(OWNER))
        opened = await generate(peer, node, service, client, steps=2)
        assert opened.priority == "free" and "trusts no ledger" in opened.note


async def test_an_exhausted_ticket_drops_the_session_to_free_and_later_sessions_open_free(
    daemons, span
):
    node, _, peer = daemons
    payer = Identity.generate()
    ticket = ticket_for(payer, budget=14)  # 2 blocks: a 4-token prefill and 3 one-token steps
    async with serving(node, span, trusting()) as service:
        first = Client(span, payer, ticket)
        opened = await generate(peer, node, service, first, steps=5)
        assert opened.priority == "high" and "14 of 14" in opened.note
        assert len(first.notes) == 1 and "used up" in first.notes[0]  # from step 4 on, free
        assert "free priority from now on" in first.notes[0]
        assert [job.priority for job in service.scheduler.served] == [Priority.HIGH] * 4 + [
            Priority.FREE
        ] * 2
        assert service.tickets.used(ticket.digest()) == 14 and len(service.tickets.earned) == 4
        second = Client(span, payer, ticket)
        opened = await generate(peer, node, service, second, steps=1)
        assert opened.priority == "free" and "used up on this node" in opened.note


async def test_a_step_that_does_not_name_the_sessions_ticket_runs_free_with_a_note(daemons, span):
    node, _, peer = daemons
    payer = Identity.generate()
    async with serving(node, span, trusting()) as service:
        client = Client(span, payer, ticket_for(payer))
        async with session(peer, node, client) as (stream, opened):
            key = service.identity.public_key
            await client.run(stream, key, 4)
            unnamed = await client.run(stream, key, 1, name_ticket=False)
            await client.run(stream, key, 1)
        assert opened.priority == "high" and "does not name" in unnamed.note
        priorities = [job.priority for job in service.scheduler.served]
        assert priorities == [Priority.HIGH, Priority.FREE, Priority.HIGH]
        assert service.tickets.used(client.ticket.digest()) == (4 + 1) * 2


async def test_a_ticket_that_expires_mid_session_drops_it_to_free(daemons, span):
    node, _, peer = daemons
    payer = Identity.generate()
    ticket = ticket_for(payer, lifetime_s=600)
    async with serving(node, span, trusting()) as service:
        client = Client(span, payer, ticket)
        async with session(peer, node, client) as (stream, opened):
            key = service.identity.public_key
            await client.run(stream, key, 4)
            service.tickets.clock = lambda: time.time() + 601  # the node's clock passes expiry
            late = await client.run(stream, key, 1)
            await client.run(stream, key, 1)
        assert opened.priority == "high" and "expired" in late.note
        priorities = [job.priority for job in service.scheduler.served]
        assert priorities == [Priority.HIGH, Priority.FREE, Priority.FREE]
        assert len(service.tickets.earned) == 1


async def test_the_ticket_book_keeps_a_bounded_backlog_dropping_the_oldest():
    payer = Identity.generate()
    book = TicketBook(TicketConfig(ledger_key=LEDGER.public_key, max_earned=3))
    admission = book.admit(canonical(ticket_for(payer).to_value()), payer.public_key)
    assert admission.ticket is not None and admission.priority == "high"
    pairs = make_pairs(payer, Identity.generate(), steps=5, ticket=admission.ticket.digest)
    for request, receipt in pairs:
        assert book.charge(admission.ticket, work_units(request)) is None
        book.record(admission.ticket, request, receipt)
    assert [item.request.step for item in book.earned] == [2, 3, 4] and book.dropped == 2
    taken = book.take(2)
    book.put_back(taken)
    assert [item.request.step for item in book.earned] == [2, 3, 4]
    assert book.used(admission.ticket.digest) == (5 + 4) * 4


# --------------------------------------------------------------------------- settlement


def _fund(url: str, client: Identity) -> None:
    """``client`` earns 28 points serving someone else, checked by a verifier."""
    earn(url, Identity.generate(), client, steps=3, prefill=5)


def _bought(url: str, client: Identity, budget: int) -> Ticket:
    _fund(url, client)
    with LedgerClient(url, client) as ledger:
        return ledger.buy_ticket(budget, 600)


async def _settle(url: str, service: NodeService, out: io.StringIO):
    settlement = Settlement(url, service.identity, service.tickets, period=60, out=out)
    async with settlement.client() as ledger:
        return await settlement.settle(ledger)


async def test_nodes_redeem_ticketed_work_and_the_ledger_refuses_overspending_and_replays(
    daemons, span, tmp_path: Path
):
    node_a, node_b, peer = daemons
    payer = Identity.generate()
    with running_server(tmp_path / "ledger.db", tmp_path / "ledger.key") as server:
        ticket = await asyncio.to_thread(_bought, server.url, payer, 24)
        config = trusting(ledger_key=load_identity(server.key).public_key)
        async with serving(node_a, span, config) as a, serving(node_b, span, config) as b:
            # Each node may spend 16 of the 24 block-tokens by its own count.
            for node, service in ((node_a, a), (node_b, b)):
                client = Client(span, payer, ticket)
                assert (await generate(peer, node, service, client, steps=4)).priority == "high"
            earned_a = list(a.tickets.earned)
            out = io.StringIO()
            down = await _settle(f"http://127.0.0.1:{free_port()}", a, out)
            assert (down.units, down.kept, len(a.tickets.earned)) == (0, 5, 5)
            assert "unreachable" in out.getvalue() and "kept for the next round" in out.getvalue()

            out = io.StringIO()
            paid = await _settle(server.url, a, out)
            assert (paid.units, paid.points, paid.tickets, paid.refused) == (16, 16, 1, 0)
            assert out.getvalue().splitlines() == [
                f"{REDEEMED_PREFIX}16 block-tokens from 1 ticket(s): +16 points"
            ]
            out = io.StringIO()
            over = await _settle(server.url, b, out)  # the ledger has 8 block-tokens left
            assert (over.units, over.refused) == (8, 4) and not b.tickets.earned
            lines = out.getvalue().splitlines()
            assert "refused 4 of 5" in lines[0] and "over the ticket's budget" in lines[0]
            assert lines[1] == f"{REDEEMED_PREFIX}8 block-tokens from 1 ticket(s): +8 points"

            a.tickets.put_back(earned_a)  # the same receipts, once more
            out = io.StringIO()
            again = await _settle(server.url, a, out)
            assert (again.units, again.refused) == (0, 5) and not a.tickets.earned
            assert "already redeemed" in out.getvalue()
        async with AsyncLedgerClient(server.url) as ledger:
            assert await ledger.balance(a.identity.public_key) == 16
            assert await ledger.balance(b.identity.public_key) == 8
            assert (await ledger.ticket(ticket.digest()))[1] == 24


# --------------------------------------------------------------------------- the process


def _wait_for_line(node, predicate, tries: int = 600) -> str:
    for _ in range(tries):
        found = [line for line in list(node.lines) if predicate(line)]
        if found:
            return found[-1]
        if node.process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no such line; the node's output:\n{node.output}")


async def test_a_node_process_honours_tickets_of_its_ledger_and_redeems_them(
    bloom_dir, span, tmp_path: Path
):
    payer = Identity.generate()
    with (
        running_server(tmp_path / "ledger.db", tmp_path / "ledger.key") as server,
        Swarm(tmp_path / "swarm") as swarm,
    ):
        ticket = await asyncio.to_thread(_bought, server.url, payer, 20)
        node = swarm.start(
            bloom_dir,
            blocks="0:2",
            refresh_period=0.5,
            extra_args=["--ledger", server.url, "--max-queue", "8", "--max-free-queue", "4"],
        )
        ledger_name = load_identity(server.key).peer_name
        tickets = await asyncio.to_thread(
            _wait_for_line, node, lambda line: line.startswith("tickets: ")
        )
        assert tickets == f"tickets: honoured when signed by ledger {ledger_name}"
        p2p = await P2P.create(**p2p_options(), initial_peers=[node.maddr])
        try:
            client = Client(span, payer, ticket)
            stream = InferenceStream(p2p, PeerID.from_base58(node.peer_id))
            try:
                opened = await stream.open(client.opening(), TIMEOUT)
                key = load_identity(node.identity).public_key
                await client.run(stream, key, 4)
                await client.run(stream, key, 1)
            finally:
                await stream.close()
        finally:
            await p2p.shutdown()
        assert opened.priority == "high"
        line = await asyncio.to_thread(
            _wait_for_line, node, lambda line: line.startswith(REDEEMED_PREFIX)
        )
        assert line == f"{REDEEMED_PREFIX}10 block-tokens from 1 ticket(s): +10 points"
        assert node.stop() == 0


@pytest.mark.parametrize(
    ("options", "text"),
    [
        (["--max-queue", "4", "--max-free-queue", "5"], "--max-free-queue"),
        (["--ledger-key", "abc"], "--ledger-key must be"),
    ],
)
async def test_bad_queue_or_ledger_key_options_are_one_line_errors(
    bloom_dir, tmp_path, capsys, options, text
):
    argv = ["node", "run", "--model", str(bloom_dir), "--identity", str(tmp_path / "k")]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--blocks", "0:2", *options])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert text in stderr and "Traceback" not in stderr
