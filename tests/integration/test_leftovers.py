"""A writer killed with SIGKILL (another process) leaves a temporary file that the next command
removes; a live writer's, or another machine's, are left alone
(tests/unit/core/test_leftovers.py: the names that make this possible)."""

import signal
import socket
import subprocess
import sys

from loralens.core.leftovers import remove_stale_temporaries, temp_prefix
from loralens.core.run_dir import RunDir


def test_a_sigkilled_writer_leaves_a_temporary_that_the_next_command_removes(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from loralens.core.files import atomic_path\n"
            f"with atomic_path({str(run / 'x' / 'big.npy')!r}, suffix='.npy') as t:\n"
            "    t.write_bytes(b'half'); print('writing', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = list((run / "x").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".big.npy.tmp-")  # the kill's litter
    live = run / "x" / f"{temp_prefix('live.json')}abcd1234"   # this process: still writing
    other = run / f".y.json.tmp-{socket.gethostname()}x-{p.pid}-abcd1234"  # another host
    live.write_text("in progress")
    other.write_text("another machine's")
    from loralens.study.config import load_config

    RunDir(run).bind_config(load_config("micro"))  # any writing command starts with this
    assert not left[0].exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(run) == []
