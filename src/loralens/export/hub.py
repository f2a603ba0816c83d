"""``loralens export RUN_DIR OUT_DIR --push-to-hub ORG/NAME``: the exported artifacts uploaded
to the Hugging Face Hub through ``huggingface_hub`` (``HfApi.create_repo`` then one
``create_commit`` per artifact).

One artifact goes to ``ORG/NAME``; several (tasks, methods, seeds) go one repository each,
``ORG/NAME-<task>-<method>-seed<seed>``, since the Hub reads one model card (and PEFT one
adapter) per repository root. The token comes from the environment (``HF_TOKEN``, or the
login ``huggingface_hub`` itself keeps) and is passed to ``huggingface_hub`` only: it is
never written to ``export.json``, a log or a card. ``HF_ENDPOINT`` (read by
``huggingface_hub`` when it is imported) points the upload at another Hub, a mirror or a
test stand-in.

Files go through ``create_commit`` rather than ``upload_folder``: with ``hf_xet`` installed
``upload_folder`` takes a multi-commit pipeline; one commit per artifact keeps an artifact's
files together. The card's loading snippet names the repository instead of the local
directory in the uploaded README.md (the local file is left as it is).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from loralens.core.errors import RunDirError
from loralens.core.files import atomic_write_json, read_json

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HubError(ValueError):
    """A bad repository name, a missing token or a refused upload (the message says which)."""


def repo_ids(repo: str, artifacts: list[dict]) -> list[str]:
    """The repository of each artifact: ``repo`` for a single one, else ``repo`` suffixed
    ``-<task>-<method>-seed<seed>``."""
    if not REPO_ID.match(repo or ""):
        raise HubError(f"--push-to-hub {repo!r}: expected ORG/NAME (letters, digits, '-', '_' "
                       "and '.')")
    if len(artifacts) == 1:
        return [repo]
    return [f"{repo}-{a['task']}-{a['method']}-seed{a['seed']}"
            for a in artifacts]


def hub_token() -> str:
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise HubError("--push-to-hub needs a Hugging Face token: set HF_TOKEN (a write token) "
                       "in the environment")
    return token


def _operations(folder: Path, repo_id: str) -> list:
    from huggingface_hub import CommitOperationAdd

    ops = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == "README.md":  # the snippet loads from the repository, not the local folder
            text = path.read_text(encoding="utf-8").replace(f'"{folder}"', f'"{repo_id}"')
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=text.encode()))
        else:
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    return ops


def push_export(out_dir: str | Path, repo: str, private: bool | None = None,
                progress=print) -> list[dict]:
    """Upload every artifact listed in ``out_dir/export.json``; records each repository and
    commit there (under ``hub``) and returns those rows."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    out = Path(out_dir)
    manifest_path = out / "export.json"
    if not manifest_path.is_file():
        raise RunDirError(f"{out}: no export.json to push")
    manifest = read_json(manifest_path)
    artifacts = manifest.get("artifacts") or []
    ids = repo_ids(repo, artifacts)
    token = hub_token()
    api = HfApi(token=token)
    pushed = []
    for art, repo_id in zip(artifacts, ids):
        folder = Path(art["path"])
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.create_commit(
                repo_id, _operations(folder, repo_id),
                commit_message=f"loralens export: {art['task']}/{art['method']}/"
                               f"seed{art['seed']} ({art['kind']})")
        except HfHubHTTPError as e:
            raise HubError(f"pushing {folder} to {repo_id} on {api.endpoint}: "
                           f"{str(e).splitlines()[0]}") from None
        pushed.append({"repo_id": repo_id, "url": str(url), "commit": info.oid,
                       "path": str(folder)})
        progress(f"pushed {art['task']}/{art['method']}/seed{art['seed']} -> {url} "
                 f"(commit {info.oid})")
    manifest["hub"] = {"endpoint": api.endpoint, "repositories": pushed}
    atomic_write_json(manifest_path, manifest)
    return pushed
