"""Shared fixtures for the unit tests (CPU, no network)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The locally trained byte-level BPE (vocab 4096; eos id 0, pad id 1), built once per session."""
    from accel_tp.corpus import build_default_tokenizer

    return build_default_tokenizer(tmp_path_factory.mktemp("default-tokenizer"))
