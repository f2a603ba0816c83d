"""No secret is written down: storage URLs are redacted where stored, restored from the
environment where needed, and an unparseable one is never echoed whole."""

import pytest
import yaml

from loralens.core.errors import ConfigError
from loralens.study.config import load_config
from loralens.core.redaction import (
    STORAGE_ENV, is_redacted, redact_url, resolve_storage, secrets_in,
)
from loralens.core.run_dir import RunDir

PW = "Zq7s3cr3tPW"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://alice:{PW}@db.example:5432/study",
     "postgresql://alice:***@db.example:5432/study"),
    (f"postgresql+psycopg://alice:{PW}@db/study?sslmode=require",
     "postgresql+psycopg://alice:***@db/study?sslmode=require"),
    (f"postgresql://alice@db/study?sslpassword={PW}&application_name=x",
     "postgresql://alice@db/study?application_name=x&sslpassword=***"),
    (f"sqlite:///file:/tmp/s.db?uri=true&password={PW}",
     "sqlite:///file%3A/tmp/s.db?password=***&uri=true"),
    (f"mysql://bob:{PW}@h/d?token={PW}&api_key={PW}", "mysql://bob:***@h/d?api_key=***&token=***"),
    ("postgresql://alice@db/study", "postgresql://alice@db/study"),  # nothing secret: as is
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_redact_url_hides_password_and_sensitive_query_values(url, shown):
    assert redact_url(url) == shown
    assert PW not in redact_url(url)
    assert redact_url(shown) == shown  # idempotent
    assert is_redacted(shown) == ("***" in shown)
    assert not is_redacted(url)


def test_percent_encoded_password_is_found_and_hidden():
    url = "postgresql://alice:p%40ss%2Fw0rd@db/study"
    assert secrets_in(url) == ["p@ss/w0rd"]
    assert redact_url(url) == "postgresql://alice:***@db/study"


def test_unparseable_url_is_redacted_by_pattern_and_error_never_echoes_it():
    bad = f"not a url://bob:{PW}@host/db?token={PW}"
    assert PW not in redact_url(bad)
    with pytest.raises(ConfigError, match="is not a SQLAlchemy URL") as e:
        resolve_storage(bad)
    assert PW not in str(e.value) and e.value.key == "search.storage"


def test_resolve_storage_env_fallback_and_redacted_restore(monkeypatch):
    url = f"postgresql://alice:{PW}@db/study"
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert resolve_storage(None) is None
    assert resolve_storage(url) == url
    monkeypatch.setenv(STORAGE_ENV, url)
    assert resolve_storage(None) == url
    assert resolve_storage(redact_url(url)) == url  # stored redacted, secret from the env
    # the env holds another database: the redacted URL cannot be completed from it
    monkeypatch.setenv(STORAGE_ENV, f"postgresql://alice:{PW}@other/study")
    with pytest.raises(ConfigError, match=r"stored with its secrets hidden.*--storage or "
                                          r"\$LORALENS_STORAGE") as e:
        resolve_storage(redact_url(url))
    assert PW not in str(e.value)
    monkeypatch.delenv(STORAGE_ENV)
    with pytest.raises(ConfigError, match="secrets hidden"):
        resolve_storage(redact_url(url))


def test_config_yaml_stores_the_url_redacted_and_rebinding_with_the_secret_passes(tmp_path):
    url = f"postgresql://alice:{PW}@db/study?token={PW}"
    cfg = load_config("micro", overrides=[f"search.storage={url}"])
    assert cfg.search.storage == url
    run = RunDir(tmp_path / "run")
    run.bind_config(cfg)
    text = run.config_path.read_text()
    assert PW not in text
    assert yaml.safe_load(text)["search"]["storage"] == "postgresql://alice:***@db/study?token=***"
    run.bind_config(cfg)  # the same settings with the real URL: no "other settings" error
    run.upgrade()
    assert PW not in run.config_path.read_text()
    assert PW not in (tmp_path / "run" / "config.yaml.bak").read_text()


def test_a_plaintext_secret_stored_by_an_older_version_is_rewritten_redacted(tmp_path):
    url = f"postgresql://alice:{PW}@db/study"
    cfg = load_config("micro", overrides=[f"search.storage={url}"])
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # old behaviour
    assert PW in run.config_path.read_text()
    run.bind_config(cfg)
    assert PW not in run.config_path.read_text()
    assert run.load_config().search.storage == "postgresql://alice:***@db/study"
