"""WebSocket tokens: valid for one visitor, until they expire, and only as issued."""

from __future__ import annotations

from pathlib import Path

import pytest

from personify.engine.app import app, configure
from personify.engine.config import Config


@pytest.fixture(scope="module", autouse=True)
def configured(tmp_path_factory: pytest.TempPathFactory) -> None:
    if app.personify_config is None:
        data = Path(tmp_path_factory.mktemp("auth"))
        configure(Config().replace(storage={"data_dir": str(data)}), "kafka://127.0.0.1:9")


def test_a_token_opens_one_visitor_until_it_expires() -> None:
    from personify.api.auth import make_token, verify_token

    token, expires = make_token("visitor/ü 1", 60, now=1000.0)
    assert expires == 1060
    assert verify_token(token, "visitor/ü 1", now=1059.0) is None
    assert verify_token(token, "visitor/ü 1", now=1061.0) == "the token has expired"
    assert verify_token(token, "someone-else", now=1001.0) == "the token is for another visitor"


def test_a_changed_token_is_refused() -> None:
    from personify.api.auth import make_token, verify_token

    token, _ = make_token("u", 60, now=1000.0)
    uid, expires, mac = token.split(".")
    assert verify_token(f"{uid}.{int(expires) + 3600}.{mac}", "u", now=1001.0) == "invalid token"
    other = "B" if mac.endswith("A") else "A"
    assert verify_token(f"{uid}.{expires}.{mac[:-1]}{other}", "u", now=1001.0) == "invalid token"
    assert verify_token("not a token", "u") == "malformed token"
