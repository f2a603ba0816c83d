"""Fixtures shared by the serving unit tests."""

from __future__ import annotations

import argparse

import pytest

from loralens.serving import add_serve_arguments, server


@pytest.fixture
def serve_until(monkeypatch):
    """``serve_until(attr, pick, **stubs)`` is a function that runs ``loralens serve ARGV``
    up to ``server.<attr>``, which is replaced by a stub that records ``pick(*args, **kw)``
    of its call and stops there (``stubs``: other ``server`` attributes replaced on the way);
    it returns what was recorded."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)

    def make(attr, pick, **stubs):
        seen = []

        def stop(*args, **kw):
            seen.append(pick(*args, **kw))
            raise RuntimeError("stop here")

        for name, stub in {**stubs, attr: stop}.items():
            monkeypatch.setattr(server, name, stub)

        def run(*argv):
            with pytest.raises(RuntimeError, match="stop here"):
                server.cli_command(parser.parse_args([str(a) for a in argv]))
            return seen[-1]
        return run
    return make


@pytest.fixture
def serve(serve_until):
    """Runs ``loralens serve ARGS`` up to loading the base; returns the base's ModelConfig."""
    return serve_until("load_base", lambda mc: mc)
