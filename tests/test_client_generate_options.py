"""`corolla generate`'s options as one value: the configs they imply, and every mistake caught
before anything is loaded (the model directory here does not even exist)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corolla.client.generate_options import GenerateOptions
from corolla.errors import InvalidInput

NOWHERE = Path("/nonexistent/model")
PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWJkUvqiYwfD2JqTCbGtRFNokLQEohUkV2xe7UX9rZALbU"


def test_sampling_options_imply_sampling_and_greedy_is_the_default():
    assert not GenerateOptions("hi", NOWHERE, local=True).generation.do_sample
    for option in ({"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.9}, {"sample": True}):
        options = GenerateOptions("hi", NOWHERE, local=True, **option)
        assert options.generation.do_sample
    options = GenerateOptions("hi", NOWHERE, local=True, no_eos=True, seed=3, top_k=7)
    assert (options.generation.stop_at_eos, options.generation.seed) == (False, 3)
    assert options.generation.top_k == 7


def test_initial_peers_may_be_repeated_or_separated_by_commas():
    options = GenerateOptions("hi", NOWHERE, initial_peers=(f"{PEER},{PEER}x", "", "third"))
    assert options.peers == (PEER, PEER + "x", "third")
    assert options.client.initial_peers == options.peers


def test_the_swarm_configs_follow_the_options():
    options = GenerateOptions(
        "hi",
        NOWHERE,
        initial_peers=(PEER,),
        allow=("a", "b"),
        block=("c",),
        step_timeout=7.0,
        check_rate=0.5,
    )
    client = options.client
    assert (client.allow, client.block, client.step_timeout) == ({"a", "b"}, {"c"}, 7.0)
    assert client.verify_receipts  # no option turns the receipt check off
    assert options.checks is not None and options.checks.rate == 0.5
    assert options.paid is None
    assert GenerateOptions("hi", NOWHERE, initial_peers=(PEER,), check_rate=0).checks is None


def test_priority_high_buys_a_ticket_and_raises_the_check_rate():
    options = GenerateOptions(
        "hi",
        NOWHERE,
        initial_peers=(PEER,),
        priority="high",
        ledger="http://127.0.0.1:1",
        ticket_budget=300,
        check_rate=0.0,
    )
    paid = options.paid
    assert paid is not None
    assert (paid.ledger_url, paid.budget, paid.min_budget_left) == ("http://127.0.0.1:1", 300, 300)
    assert options.checks is not None and options.checks.rate == paid.check_rate


def test_local_splits_come_from_splits_or_from_even_spans():
    assert GenerateOptions("hi", NOWHERE, local=True, spans=2).local_splits(4) == [(0, 2), (2, 4)]
    options = GenerateOptions("hi", NOWHERE, local=True, splits="0:1,1:4")
    assert options.local_splits(4) == [(0, 1), (1, 4)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": "", "local": True}, "prompt is empty"),
        ({}, "either --local or --initial-peers"),
        ({"local": True, "initial_peers": (PEER,)}, "either --local or --initial-peers"),
        ({"initial_peers": (PEER,), "priority": "urgent"}, "free or high"),
        ({"initial_peers": (PEER,), "priority": "high"}, "needs --ledger"),
        ({"local": True, "receipts": Path("r.jsonl")}, "--receipts needs the swarm"),
        ({"local": True, "top_p": 1.5}, "top-p"),
        ({"local": True, "max_new_tokens": 0}, "max-new-tokens"),
        ({"local": True, "splits": "x"}, "START:END"),
        ({"initial_peers": (PEER,), "check_rate": 2.0}, "spot-check rate"),
        ({"initial_peers": (PEER,), "step_timeout": 0.0}, "step_timeout"),
        (
            {
                "initial_peers": (PEER,),
                "priority": "high",
                "ledger": "http://x",
                "ticket_budget": 0,
            },
            "positive budget",
        ),
    ],
)
def test_a_bad_combination_of_options_fails_before_anything_loads(options, message):
    given = {"prompt": "hi", "model": NOWHERE, **options}
    with pytest.raises(InvalidInput, match=message):
        GenerateOptions(**given)
