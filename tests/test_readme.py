"""The commands of the README and the docs work as written (in the manner of litgpt's
tests/test_readme.py).

Every command in a ```bash block of README.md and of every docs/*.md runs, and what it
prints is checked:

- ``loralens ...`` and ``curl ...`` run in a temporary working directory (so ``runs/...``
  resolves there), with the environment a user sets up: the virtual environment's
  ``bin`` first on ``PATH`` (an activated venv) and ``$LORALENS_GLUE_DIR``;
  ``pip ...`` and ``make ...`` run in the checkout.
- ``loralens serve`` starts in the background on a free loopback port (the one thing
  changed: ``--port``); the ``curl`` lines of its block go to it (``localhost:8000``
  becomes that port) and must answer HTTP 2xx with the documented keys. ``curl`` gets
  ``--write-out`` appended, to read the status code.
- Markers in the files say where a command cannot run as written: an HTML comment
  ``<!-- readme-test: ... -->`` on the line before a block applies to each of its
  commands, ``readme-test: ...`` in a command's trailing ``#`` comment to that command.
  ``micro``: run it on the micro preset (``--preset micro`` for any preset, ``runs/micro``
  for ``runs/<preset>``); ``skip (reason)``: skip it with that reason; ``run``: as written.

All commands share one micro run directory (a module fixture), in file order (README.md,
then docs/*.md by name) and within a file in order. The README's ```python blocks run too
(its library examples), and every docs/*.md is linked from the README, every relative link
resolving.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The files whose commands are tested: the README first, then the docs by name.
FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent

MARKER = re.compile(r"readme-test:\s*(?P<kind>[\w-]+)\s*(?:\((?P<reason>[^)]*)\))?")
BLOCK_MARKER = re.compile(r"^<!--\s*(readme-test:.*?)\s*-->\s*$")
KINDS = ("run", "micro", "skip")
README_PORT = "8000"

# What a command must print (a regex searched line by line in stdout + stderr): the exit
# code alone would pass a command that did nothing.
EXPECT = {
    "run": r"^study finished in \d+ s; run directory runs/",
    "run --dry-run": r"^total\s+\d+\s.*\s(\d+ s|\d+ min|\d+ h \d+ min)(\s|$)",
    "sanity": r"^sanity: \d+/\d+ passed",
    "search": r"^search \w+/\w+: best \w+ [\d.]+ \(trial \d+\)",
    "hpo": r"^search \w+/\w+: best \w+ [\d.]+ \(trial \d+\)",
    "train": r"^(skipped: )?\w+/\w+/seed\d+: accuracy [\d.]+",
    "extract": r"^extract \w+/[\w-]+: \d+ examples -> ",
    "drift": r"^drift \w+ \(1 - (debiased )?CKA over states \d+(–\d+)?[^,]*, \d+ examples",
    "bench": r"^(checks: \d+/\d+ passed|bench: results exist in )",
    "weights": r"^weights \w+: intruders \(eps 0\.5\) LoRA ",
    "report": r"^report: \S*report\.html$",
    "serve": r"^listening on http://",
    "loadtest": r"^results in \S*loadtest",
    "upgrade": r"^upgraded \S+: ",
    "export": r"^exported \d+ model\(s\) to ",
    "predict": r'^\{"rows": \d+, ',
    "models": r"^smollm2-135m\s",
    "presets": r"^micro$",
    "pip": r"^Successfully installed .*loralens|^Requirement already satisfied",
}

# Keys of the JSON answer of each endpoint (checked in this order: first match wins).
CURL_KEYS = (
    # vLLM's and SGLang's clients (docs/serving.md): the model list, and vLLM's classify
    # answer on both paths for a body naming "model" (today's body keeps today's answer)
    (r"/v1/models\b", {"object", "data"}),
    (r"""classify -d '\{"model":""", {"id", "object", "created", "model", "data", "usage"}),
    (r"/v1/classify", {"adapter", "labels", "label_names", "probabilities"}),
    (r"-X DELETE .*/v1/adapters/", {"removed"}),
    (r"/v1/adapters -d ", {"name", "num_labels", "label_names"}),
    (r"/v1/adapters\b", {"adapters"}),
    (r"/health\b", {"status", "adapters"}),
)


# --------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Command:
    text: str        # as written, continuation lines joined, the comment removed
    comment: str     # the trailing comment, "" if none
    kind: str        # run | micro | skip
    reason: str      # why it is skipped
    block: int       # which ```bash block of its file (0-based)
    line: int        # line number in its file
    file: str = "README.md"  # the file, relative to the checkout

    @property
    def program(self) -> str:
        return self.text.split()[0]

    @property
    def subcommand(self) -> str:
        words = self.text.split()
        return words[1] if self.program == "loralens" and len(words) > 1 else self.program

    @property
    def id(self) -> str:
        return f"{self.file}:L{self.line}:{re.sub(r'[^A-Za-z0-9_.,:/=-]+', '_', self.text)[:70]}"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def split_comment(line: str) -> tuple[str, str]:
    """``(code, comment)``: the first ``#`` outside quotes that starts a word begins a
    comment, as in the shell."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _directive(text: str, where: str) -> tuple[str, str] | None:
    m = MARKER.search(text)
    if m is None:
        return None
    kind, reason = m.group("kind"), (m.group("reason") or "").strip()
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown readme-test marker {kind!r}; known: {KINDS}")
    if kind == "skip" and not reason:
        raise ValueError(f"{where}: 'readme-test: skip' needs a reason: skip (why)")
    return kind, reason


def parse_readme(text: str, name: str = "README.md") -> list[Command]:
    """Every command of every ```bash block of one file (``name``, for messages), with its
    marker."""
    commands: list[Command] = []
    lines = text.splitlines()
    block = -1
    pending: tuple[str, str] | None = None  # a block marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        m = BLOCK_MARKER.match(line.strip())
        if m:
            pending = _directive(m.group(1), f"{name}:{i + 1}")
            nxt = next((ln for ln in lines[i + 1:] if ln.strip()), "")
            if nxt.strip() != "```bash":
                raise ValueError(f"{name}:{i + 1}: a block marker must come right before "
                                 "a ```bash block")
            i += 1
            continue
        if line.strip() != "```bash":
            i += 1
            continue
        block += 1
        block_kind = pending or ("run", "")
        pending = None
        i += 1
        start, logical = None, ""
        while i < len(lines) and lines[i].strip() != "```":
            raw = lines[i]
            i += 1
            if start is None:
                if "readme-test:" in raw and raw.lstrip().startswith("#"):
                    raise ValueError(f"{name}:{i}: a readme-test marker belongs in a "
                                     "command's trailing comment or before the block")
                if not raw.strip() or raw.lstrip().startswith("#"):
                    continue
                start = i
            code, comment = split_comment(raw)
            if code.endswith("\\") and not comment:
                logical += code[:-1].rstrip() + " "
                continue
            text_ = " ".join((logical + code).split())
            where = f"{name}:{start}"
            kind, reason = _directive(comment, where) or block_kind
            commands.append(Command(text_, comment, kind, reason, block, start, name))
            start, logical = None, ""
        if logical:
            raise ValueError(f"{name}:{start}: a command ends with a line continuation")
        i += 1
    return commands


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


COMMANDS_BY_FILE = {relative(f): parse_readme(f.read_text(), relative(f)) for f in FILES}
COMMANDS = [c for commands in COMMANDS_BY_FILE.values() for c in commands]


def presets() -> list[str]:
    return sorted(p.stem for p in (ROOT / "src" / "loralens" / "presets").glob("*.yaml"))


def substitute(cmd: Command) -> str:
    """The command as the test runs it: the micro preset where the marker says so."""
    text = cmd.text
    if cmd.kind == "micro":
        names = "|".join(map(re.escape, presets() + ["default"]))
        text = re.sub(r"--preset(\s+|=)\S+", r"--preset\1micro", text)
        text = re.sub(rf"\bruns/({names})\b", "runs/micro", text)
    return text


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def env(glue_dir) -> dict:
    """The environment a user has after `make install`, `. .venv/bin/activate` and
    `export LORALENS_GLUE_DIR=...` (plus the test session's model cache)."""
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    e["LORALENS_GLUE_DIR"] = str(glue_dir)
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e["PYTHONUNBUFFERED"] = "1"
    return e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, env) -> Path:
    """A working directory holding one micro run (``runs/micro``), shared by the commands."""
    wd = tmp_path_factory.mktemp("readme")
    out = subprocess.run(["loralens", "run", "--preset", "micro", "--no-progress",
                          "--stages", "sanity,search,train,extract,drift,bench"],
                         cwd=wd, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (wd / "runs" / "micro" / "bench" / "serving.json").is_file()
    return wd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``loralens serve`` command of the README, started in the background."""

    def __init__(self, text: str, cwd: Path, env: dict, timeout: float = 300.0):
        self.port = free_port()
        if re.search(r"--port(\s+|=)\d+", text):
            text = re.sub(r"--port(\s+|=)\d+", rf"--port\g<1>{self.port}", text)
        else:
            text += f" --port {self.port}"
        self.text = text
        self.lines: list[str] = []
        self.proc = subprocess.Popen(["bash", "-c", text], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not any(ln.startswith("listening on http://") for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"`{text}` did not start:\n" + "".join(self.lines[-40:]))
            time.sleep(0.2)

    def _read(self) -> None:
        for ln in self.proc.stdout:
            self.lines.append(ln)

    def get(self, path: str) -> tuple[int, dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return r.status, json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this test started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(workdir, env):
    """``servers(cmd)``: the running server of a ``serve`` command (started once per file)."""
    started: dict[tuple[str, str], Server] = {}

    def get(cmd: Command) -> Server:
        key = (cmd.file, cmd.text)
        if key not in started:
            started[key] = Server(substitute(cmd), workdir, env)
        return started[key]

    yield get
    for s in started.values():
        s.stop()


# --------------------------------------------------------------------------- the tests

def test_readme_and_docs_have_commands():
    """The README has commands, and together the files show every kind the tests run."""
    assert COMMANDS_BY_FILE["README.md"], "no ```bash commands found in README.md"
    assert len(FILES) > 1, "no docs/*.md found"
    programs = {c.program for c in COMMANDS}
    assert {"loralens", "curl", "make", "pip"} <= programs, programs


@pytest.mark.parametrize("name", list(COMMANDS_BY_FILE))
def test_readme_markers(name: str):
    """A file parses (at import), every marker is known, every command is checkable."""
    commands = COMMANDS_BY_FILE[name]
    for c in commands:
        assert c.kind in KINDS
        assert c.kind != "skip" or c.reason, c
        if c.kind != "skip" and c.program in ("loralens", "pip"):
            assert c.subcommand in EXPECT, f"{c.where}: add an EXPECT entry for {c.text}"
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
    for c in commands:
        if c.program == "make":  # skipped or not, a make line names a real target
            named = [w for w in c.text.split()[1:] if not w.startswith("-") and "=" not in w]
            assert set(named) <= targets, f"{c.where}: no Makefile target {named}"
        if c.program == "curl":
            assert any(s.subcommand == "serve" and s.block == c.block and s.line < c.line
                       for s in commands), f"{c.where}: curl without a serve before it"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", FILES, ids=[relative(f) for f in FILES])
def test_docs_links(path: Path):
    """Every relative link of the README and the docs resolves (file and heading), and the
    README links every docs/*.md."""
    text = path.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.is_file(), f"{relative(path)}: link to a missing file {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text()), \
                f"{relative(path)}: link to a missing heading {target}"
    if path == README:
        linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(text)}
        missing = [relative(f) for f in FILES[1:] if f.resolve() not in linked]
        assert not missing, f"README.md links none of {missing}"


def test_readme_python_blocks():
    """The README's ```python blocks (its library examples) run as written."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)
    assert blocks, "no ```python block in README.md"
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, f"{code}\nexited {out.returncode}:\n{out.stderr[-4000:]}"


def test_substitute():
    c = Command("loralens extract --run-dir runs/quick --preset=smoke", "", "micro", "", 0, 1)
    assert substitute(c) == "loralens extract --run-dir runs/micro --preset=micro"
    c = Command("loralens search --preset quick --run-dir runs/rte-lora", "", "micro", "", 0, 1)
    assert substitute(c) == "loralens search --preset micro --run-dir runs/rte-lora"
    assert substitute(Command("pip install -e .", "", "run", "", 0, 1)) == "pip install -e ."
    assert split_comment("""curl -d '{"a": "#x"}'  # note""") == ("""curl -d '{"a": "#x"}'""",
                                                                    "note")


def _check_output(cmd: Command, text: str, output: str) -> None:
    dry = cmd.subcommand == "run" and "--dry-run" in text.split()
    pattern = EXPECT.get("run --dry-run" if dry else cmd.subcommand)
    if pattern is None:
        return
    assert any(re.search(pattern, ln.strip()) for ln in output.splitlines()), (
        f"`{text}` printed no line matching {pattern!r}:\n{output[-4000:]}")
    if cmd.subcommand == "train" and "--overwrite" in text and "--no-search" not in text:
        assert "hyperparameters of the search's best trial" in output, output[-4000:]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command(cmd: Command, request):
    if cmd.kind == "skip":
        pytest.skip(cmd.reason)
    workdir = request.getfixturevalue("workdir")
    env = request.getfixturevalue("env")
    text = substitute(cmd)

    if cmd.subcommand == "serve":
        server = request.getfixturevalue("servers")(cmd)
        _check_output(cmd, server.text, "".join(server.lines))
        status, body = server.get("/health")
        assert status == 200 and body["status"] == "ok" and body["adapters"] > 0, body
        return

    if cmd.program == "curl":
        serve = next(s for s in reversed(COMMANDS_BY_FILE[cmd.file]) if s.subcommand == "serve"
                     and s.block == cmd.block and s.line < cmd.line)
        server = request.getfixturevalue("servers")(serve)
        text = text.replace(f"localhost:{README_PORT}", f"localhost:{server.port}")
        out = subprocess.run(["bash", "-c", text + " --write-out '\\n%{http_code}'"],
                             cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (text, out.stdout, out.stderr)
        body, _, status = out.stdout.rpartition("\n")
        assert 200 <= int(status) < 300, f"`{text}` answered HTTP {status}: {body}"
        if "/metrics" in text:  # Prometheus text, not JSON
            assert "loralens_http_requests_total{" in body, body[:2000]
            return
        answer = json.loads(body)
        keys = next(k for pattern, k in CURL_KEYS if re.search(pattern, text))
        assert keys <= set(answer), f"`{text}` answered without {keys - set(answer)}: {answer}"
        if "probabilities" in answer:
            n = len(answer["labels"])
            assert n >= 1 and len(answer["probabilities"]) == n == len(answer["label_names"])
            assert all(abs(sum(p) - 1) < 1e-4 for p in answer["probabilities"]), answer
        if answer.get("object") == "list" and "usage" in answer:  # vLLM's classify shape
            items = answer["data"]
            assert items and [d["index"] for d in items] == list(range(len(items))), answer
            assert all(len(d["probs"]) == d["num_classes"] and abs(sum(d["probs"]) - 1) < 1e-4
                       for d in items), answer
        if answer.get("object") == "list" and "usage" not in answer:  # GET /v1/models
            assert answer["data"] and all(m["object"] == "model" for m in answer["data"]), answer
        return

    cwd = ROOT if cmd.program in ("pip", "make") else workdir
    out = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=1200)
    output = out.stdout + out.stderr
    assert out.returncode == 0, f"`{text}` exited {out.returncode}:\n{output[-6000:]}"
    _check_output(cmd, text, output)
