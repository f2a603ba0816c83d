"""A killed writer's temporary files are removed by the next command; a live writer's, or
another machine's, are left alone: the names that tell them apart (the kill itself, another
process, is in tests/integration/test_leftovers.py)."""

import os
import socket

from loralens.core.leftovers import temp_prefix
from loralens.core.files import atomic_dir, atomic_path


def test_temporary_names_carry_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "a.json") as tmp:
        assert tmp.name.startswith(f".a.json.tmp-{socket.gethostname()}-{os.getpid()}-")
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "d") as tmp:
        assert tmp.name.startswith(temp_prefix("d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


