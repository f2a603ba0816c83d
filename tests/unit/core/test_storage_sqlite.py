"""A SQLite storage URL with ``uri=true`` or a secret in its query is refused (issue 28.7):
SQLite has no password, and with ``uri=true`` the query ends up in the database file's
name, password included."""

import os

import pytest
import sqlalchemy as sa

from loralens.core.errors import ConfigError
from loralens.core.redaction import resolve_storage

PW = "Zq7s3cr3tPW"


def test_the_hazard_a_uri_true_sqlite_url_writes_its_password_into_a_file_name(tmp_path):
    """Why the URL is refused: SQLAlchemy and sqlite3 as they are, without loralens."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db?uri=true&password={PW}")
    with engine.connect() as c:
        c.execute(sa.text("CREATE TABLE t (a INTEGER)"))
    engine.dispose()
    assert os.listdir(tmp_path) == [f"x.db?password={PW}"]


def test_sqlite_url_with_uri_and_password_is_refused_naming_the_safe_form():
    with pytest.raises(ConfigError) as e:
        resolve_storage(f"sqlite:////x.db?uri=true&password={PW}")
    assert str(e.value) == (
        "search.storage: sqlite:////x.db?password=***&uri=true is refused: a SQLite URL "
        "takes no 'password' or 'uri' query parameter (SQLite has no password, and with "
        "uri=true the query becomes part of the database file's name); use the plain form "
        "sqlite:////absolute/path/study.db and protect the file with its permissions")


@pytest.mark.parametrize("url, refused", [
    ("sqlite:////x.db?uri=true", "'uri'"),
    (f"sqlite:////x.db?token={PW}", "'token'"),
    (f"sqlite+pysqlite:////x.db?sslpassword={PW}", "'sslpassword'"),
])
def test_any_uri_or_secret_query_parameter_of_sqlite_is_refused(url, refused, monkeypatch):
    monkeypatch.delenv("LORALENS_STORAGE", raising=False)
    with pytest.raises(ConfigError, match=f"takes no {refused} query parameter") as e:
        resolve_storage(url)
    assert PW not in str(e.value)


def test_the_same_url_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("LORALENS_STORAGE", f"sqlite:////x.db?uri=true&password={PW}")
    with pytest.raises(ConfigError, match="sqlite:////absolute/path/study.db"):
        resolve_storage(None)


@pytest.mark.parametrize("url", [
    "sqlite:////tmp/study.db",
    "sqlite:///relative.db?timeout=30",   # a harmless query parameter stays allowed
    f"postgresql+psycopg://alice@db/study?password={PW}",  # not SQLite: redacted, not refused
])
def test_other_urls_pass_unchanged(url, monkeypatch):
    monkeypatch.delenv("LORALENS_STORAGE", raising=False)
    assert resolve_storage(url) == url
