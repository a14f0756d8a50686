"""The fakes are real Runners: same methods, same signatures, so they cannot drift."""

from __future__ import annotations

import inspect

import pytest
from fakes import FakeRunner

from cldpd_magic.engines.protocol import Runner

PROTOCOL_METHODS = sorted(
    name for name, value in vars(Runner).items() if inspect.isfunction(value) and name[0] != "_"
)


def test_the_fake_is_a_runner():
    assert isinstance(FakeRunner(), Runner)
    assert "start" in PROTOCOL_METHODS and len(PROTOCOL_METHODS) >= 10


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_each_method_has_the_protocol_signature(name):
    expected = inspect.signature(getattr(Runner, name))
    actual = inspect.signature(getattr(FakeRunner, name))
    assert list(actual.parameters) == list(expected.parameters)
    assert actual.return_annotation == expected.return_annotation
    for param, want in expected.parameters.items():
        got = actual.parameters[param]
        assert (got.kind, got.default, got.annotation) == (want.kind, want.default, want.annotation)
