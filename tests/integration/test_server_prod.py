"""``loralens serve`` as its own process on the tiny model: the API key from the environment,
never on the command line or in the output; SIGTERM answers the requests in flight
(in-process tests: tests/unit/serving/test_server_prod.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx

from loralens.serving.auth import API_KEY_ENV
from tests.helpers.serving import KEY


def _start(args, env, out):
    """``loralens serve ARGS`` on the tiny model, a free port; (process, base URL)."""
    cmd = [sys.executable, "-m", "loralens.cli", "serve", *args, "--model", "tiny-random",
           "--port", "0", "--max-length", "32"]
    proc = subprocess.Popen(cmd, env=env, stdout=out.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while True:
        assert proc.poll() is None and time.time() < deadline, out.read_text()
        time.sleep(0.2)
        for line in out.read_text().splitlines():
            if line.startswith("listening on "):
                return proc, line.split()[2]


def test_serve_takes_the_key_from_the_environment_and_never_prints_it(adapter_dir, tmp_path):
    """The real command: the key is in its environment, not its command line (``ps``),
    and in none of its output, at the most verbose log level."""
    # (a NAME=DIR source would be taken for a key=value override by cli.main)
    proc, url = _start([str(adapter_dir / "a"), "--log-level", "debug"],
                       {**os.environ, API_KEY_ENV: KEY}, tmp_path / "out")
    try:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read()
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/v1/adapters").status_code == 401
            assert c.get("/v1/adapters", headers={"Authorization": "Bearer nope"}
                         ).status_code == 401
            auth = {"Authorization": f"Bearer {KEY}"}
            [name] = [a["name"] for a in c.get("/v1/adapters", headers=auth).json()["adapters"]]
            r = c.post("/v1/classify", headers=auth, json={"adapter": name, "texts": ["hello"]})
            assert r.status_code == 200, r.text
            m = c.get("/metrics", headers=auth).text
            assert 'loralens_http_requests_total{endpoint="/v1/adapters",method="GET",' \
                   'status="401"} 2.0' in m
            assert f'loralens_adapter_requests_total{{adapter="{name}"}} 1.0' in m
    finally:
        proc.terminate()
        proc.wait(30)
    text = (tmp_path / "out").read_text()
    assert "listening on" in text and KEY not in text


def test_sigterm_answers_the_requests_in_flight(adapter_dir, tmp_path):
    """SIGTERM while 32 requests wait in the batching window: the server stops accepting,
    answers all 32, and exits 0."""
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    proc, url = _start([str(adapter_dir / "a"), "--max-wait-ms", "1500", "--max-batch", "64"],
                       env, tmp_path / "out")

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as c:
            [name] = [a["name"] for a in (await c.get("/v1/adapters")).json()["adapters"]]
            sent = [asyncio.create_task(c.post("/v1/classify", json={
                "adapter": name, "texts": [f"request {i}"]})) for i in range(32)]
            async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
                while True:  # all 32 in flight (the probe's own request is the 33rd)
                    m = (await probe.get("/metrics")).text
                    if "loralens_http_requests_in_progress 33.0" in m:
                        break
                    await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sent)

    try:
        answers = asyncio.run(load())
        assert proc.wait(30) == 0, (tmp_path / "out").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in answers] == [200] * 32
    assert all(len(r.json()["labels"]) == 1 for r in answers)
