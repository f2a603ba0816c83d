"""Fixtures shared by the serving unit tests."""

from __future__ import annotations

import argparse

import pytest

from loralens.serving import add_serve_arguments, server


@pytest.fixture
def serve(monkeypatch):
    """Runs ``loralens serve ARGS`` up to loading the base (``server.load_base`` replaced by a
    stub that stops there); returns the base's ModelConfig."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    seen = []

    def fake_load_base(mc):
        seen.append(mc)
        raise RuntimeError("stop here")

    monkeypatch.setattr(server, "load_base", fake_load_base)

    def run(*argv):
        with pytest.raises(RuntimeError, match="stop here"):
            server.cli_command(parser.parse_args([str(a) for a in argv]))
        return seen[-1]
    return run
