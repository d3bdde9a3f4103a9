from __future__ import annotations

import gc
from pathlib import Path

import pytest

from wsgate.cli import tune_gc
from wsgate.config import effective, load_settings
from wsgate.errors import ConfigError

SECRET = "a-secret-that-is-long-enough-for-hs256!"


def test_defaults_start_in_dev_mode() -> None:
    settings = load_settings(env={})
    assert settings.dev_mode
    assert settings.server.port == 8765
    assert settings.server.host == "127.0.0.1"


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nport = 1111\nhost = "0.0.0.0"\nhandshake_timeout = 3\n')
    settings = load_settings(config, env={"WSGATE_SERVER__PORT": "2222", "WSGATE_SERVER__HOST": "::1"})
    assert (settings.server.port, settings.server.host, settings.server.handshake_timeout) == (
        2222,
        "::1",
        3.0,
    )
    flagged = load_settings(config, env={"WSGATE_SERVER__PORT": "2222"}, overrides={"server.port": 3333})
    assert flagged.server.port == 3333
    assert flagged.server.host == "0.0.0.0"


def test_configured_key_turns_dev_mode_off() -> None:
    settings = load_settings(env={"WSGATE_AUTH__HMAC_SECRET": SECRET})
    assert not settings.dev_mode


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"WSGATE_SERVER__PORT": "70000"}, "server.port: must be between 0 and 65535 (got '70000')"),
        ({"WSGATE_SERVER__PORT": "eighty"}, "server.port: must be an integer (got 'eighty')"),
        ({"WSGATE_SERVER__PROT": "1"}, "server.prot: unknown setting"),
        ({"WSGATE_SERVER__HANDSHAKE_TIMEOUT": "0"}, "server.handshake_timeout: must be greater than 0"),
        ({"WSGATE_AUTH__HEADER": "maybe"}, "auth.header: must be true or false"),
        ({"WSGATE_AUTH__LEEWAY": "-1"}, "auth.leeway: must be between 0 and 300"),
        ({"WSGATE_AGENT__NAME": "gpt"}, "agent.name: must be one of demo, echo, noop"),
        ({"WSGATE_AUTH__HMAC_SECRET": "short"}, "auth.hmac_secret: must be at least 32 bytes"),
        (
            {"WSGATE_ENVIRONMENT": "production", "WSGATE_DEV__ENABLED": "1"},
            "dev.enabled: dev mode is refused when environment is production",
        ),
        ({"WSGATE_ENVIRONMENT": "production"}, "auth.keys: no verification key configured"),
        (
            {"WSGATE_DEV__ENABLED": "false"},
            "auth.keys: no verification key configured",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_setting(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"WSGATE_SERVER__PORT": "-1", "WSGATE_AUTH__LEEWAY": "x"})
    assert len(caught.value.problems) == 2


def test_key_tables_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[auth.keys]]\nkind = "public"\npem_file = "k.pem"\nalgorithms = ["HS256"]\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    assert "auth.keys[0].algorithms: a public key may not be used with HMAC or none" in caught.value.problems


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config: cannot read"):
        load_settings(tmp_path / "missing.toml", env={})


def test_effective_masks_secrets() -> None:
    rows = dict(effective(load_settings(env={"WSGATE_AUTH__HMAC_SECRET": SECRET})))
    assert rows["auth.hmac_secret"] == "***"
    assert SECRET not in str(rows)


def test_tune_gc_sets_the_young_threshold_and_zero_leaves_it_alone() -> None:
    before = gc.get_threshold()
    try:
        assert tune_gc(12345) == before
        assert gc.get_threshold() == (12345, before[1], before[2])
        tune_gc(0)
        assert gc.get_threshold()[0] == 12345
    finally:
        gc.set_threshold(*before)
    assert load_settings(None, env={}).server.gc_threshold == 10_000
