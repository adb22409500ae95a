"""The public surface: what `corolla` exports is real, typed where it should be, and light to
import (the verification layer does not load torch or hivemind through the root package)."""

from __future__ import annotations

import subprocess
import sys

import corolla


def test_every_exported_name_resolves_to_the_object_its_module_defines():
    from corolla.client.model import DistributedModelForCausalLM
    from corolla.ledger.api.client import ClientConfig as LedgerClientConfig
    from corolla.ledger.api.client import LedgerClient

    for name in corolla.__all__:
        assert getattr(corolla, name) is not None, name
    assert corolla.DistributedModelForCausalLM is DistributedModelForCausalLM
    assert corolla.LedgerClient is LedgerClient
    assert corolla.LedgerClientConfig is LedgerClientConfig
    assert issubclass(corolla.RouteUnavailable, corolla.CorollaError)
    assert set(corolla.__all__) <= set(dir(corolla))


def test_an_unknown_name_is_an_attribute_error():
    try:
        corolla.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("corolla.no_such_name resolved")


def test_importing_the_verification_layer_loads_neither_torch_nor_hivemind():
    """The ledger reads thresholds, calibrations, verdicts and assignments without torch."""
    code = (
        "import sys, corolla, corolla.verify.receipts, corolla.ledger.api.envelope\n"
        "import corolla.verify.tolerance, corolla.verify.assignment, corolla.verify.verdicts\n"
        "print(sorted(m for m in ('torch', 'hivemind') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_no_package_with_users_has_an_empty_all():
    import corolla.client
    import corolla.verify

    for package in (corolla, corolla.client, corolla.verify):
        assert package.__all__, package.__name__
