"""Secrets never written down: database URLs are redacted wherever they are stored or shown.

A storage URL (``search.storage``, ``--storage``, ``$LORALENS_STORAGE``) may carry a
password in its user-info part (``postgresql://user:pw@host/db``) or a token in its query
(``...?password=pw``, ``?sslpassword=``, ``?token=``). The run directory's config.yaml is
copied, shared and published with the results, so it stores the URL redacted
(SQLAlchemy's own ``hide_password`` rendering, plus sensitive query values); a resumed run
gets the secret back from ``--storage`` or ``$LORALENS_STORAGE`` (for PostgreSQL, better
still: no password in the URL at all, libpq reads ``PGPASSWORD`` or ``~/.pgpass``).
"""

from __future__ import annotations

import os
import re

from loralens.core.errors import ConfigError

STORAGE_ENV = "LORALENS_STORAGE"
MASK = "***"  # what SQLAlchemy's render_as_string(hide_password=True) writes

# query parameters whose values are secrets (password, sslpassword, token, api_key, ...)
SENSITIVE = re.compile(r"pass|pwd|token|secret|key|auth|cred|sig", re.I)
_USERINFO = re.compile(r"(?P<head>://[^/?#@:]*:)(?P<pw>[^/?#@]*)(?=@)")
_QUERY = re.compile(r"(?P<head>[?&;](?P<key>[^=&;#]+)=)(?P<value>[^&;#]*)")


def redact_url(url: str) -> str:
    """``url`` with its password and sensitive query values replaced by ``***``.

    Parsed by SQLAlchemy where it can be (the form SQLAlchemy itself shows), else by
    pattern: an unparseable string is still never shown with its secret.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return _redact_text(str(url))
    query = {k: (MASK if SENSITIVE.search(k) else v) for k, v in u.query.items()}
    # SQLAlchemy percent-encodes the mask in a query; show it as it shows a password
    return u.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", MASK)


def _redact_text(text: str) -> str:
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _QUERY.sub(lambda m: m["head"] + (MASK if SENSITIVE.search(m["key"])
                                             else m["value"]), text)


def secrets_in(url: str) -> list[str]:
    """The secret substrings of ``url`` (its password, sensitive query values): what
    must appear in no file or output."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return []
    out = [u.password] if u.password else []
    for k, v in u.query.items():
        if SENSITIVE.search(k):
            out += [v] if isinstance(v, str) else list(v)
    return [s for s in out if s and s != MASK]


def is_redacted(url: str) -> bool:
    """Whether ``url`` was redacted (a password or sensitive query value is ``***``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return False
    return u.password == MASK or any(v == MASK or (not isinstance(v, str) and MASK in v)
                                     for k, v in u.query.items() if SENSITIVE.search(k))


def resolve_storage(url: str | None) -> str | None:
    """The storage URL to connect with: ``url`` (``search.storage``), else
    ``$LORALENS_STORAGE``, else None (SQLite files in the run directory).

    A URL stored redacted (config.yaml keeps no secret) is replaced by
    ``$LORALENS_STORAGE`` when that is the same URL with its secrets; otherwise the run
    cannot connect, and says how to give the secret. Raises :class:`ConfigError` for a
    string SQLAlchemy cannot parse (shown redacted: its own error would print it whole).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    env = os.environ.get(STORAGE_ENV) or None
    url = url or env
    if not url:
        return None
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise ConfigError(f"search.storage: {redact_url(url)!r} is not a SQLAlchemy URL "
                          "(e.g. postgresql+psycopg://user@host/db)", "search.storage") from None
    _refuse_sqlite_query(parsed, url)
    if is_redacted(url):
        if env and redact_url(env) == url:
            return env
        raise ConfigError(
            f"search.storage: {url} is stored with its secrets hidden (a run directory "
            f"keeps no password); give the full URL with --storage or ${STORAGE_ENV}, or "
            "for PostgreSQL leave the password out of the URL and let libpq read "
            "PGPASSWORD or ~/.pgpass", "search.storage")
    return url


SQLITE_SAFE = "sqlite:////absolute/path/study.db"


def _refuse_sqlite_query(parsed, url: str) -> None:
    """A SQLite URL with ``uri=true`` or a secret in its query is refused: SQLite has no
    password, and with ``uri=true`` pysqlite hands ``PATH?QUERY`` to sqlite3 as a URI whose
    path has no ``file:`` scheme, so SQLite creates a file whose *name* holds the query
    (``sqlite:////x.db?uri=true&password=pw`` writes ``/x.db?password=pw``), the password
    included. The safe form is a plain path, protected by the file's permissions."""
    if parsed.get_backend_name() != "sqlite":
        return
    bad = sorted(k for k in parsed.query if k == "uri" or SENSITIVE.search(k))
    if bad:
        raise ConfigError(
            f"search.storage: {redact_url(url)} is refused: a SQLite URL takes no "
            f"{' or '.join(repr(k) for k in bad)} query parameter (SQLite has no password, "
            "and with uri=true the query becomes part of the database file's name); use "
            f"the plain form {SQLITE_SAFE} and protect the file with its permissions",
            "search.storage")


def without_secrets(data: dict) -> dict:
    """A config dict as stored: ``search.storage`` redacted (no password or token)."""
    search = data.get("search") if isinstance(data, dict) else None
    if not isinstance(search, dict) or not isinstance(search.get("storage"), str):
        return data
    return {**data, "search": {**search, "storage": redact_url(search["storage"])}}


def redact_config_file(path) -> None:
    """Rewrite a stored config.yaml that holds a secret (written by a version before
    redaction) without it, the rest unchanged."""
    import yaml

    from loralens.core.files import atomic_write_text

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    clean = without_secrets(data)
    if clean != data:
        atomic_write_text(path, yaml.safe_dump(clean, sort_keys=False))
