"""Shared fixtures."""

import pytest

import srmodel


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The `tiny` preset's folder, built once per test session (a ModelSource)."""
    return srmodel.ensure_tiny_model(tmp_path_factory.mktemp("tiny"))
