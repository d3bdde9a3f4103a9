from __future__ import annotations

import gc
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wsgate
from wsgate.config import Settings
from wsgate.configfile import example_toml, load_settings, setting_names, to_toml
from wsgate.errors import ConfigError
from wsgate.runner import tune_gc

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
        (
            {"WSGATE_SERVER__PROT": "1"},
            "WSGATE_SERVER__PROT: unknown setting (did you mean WSGATE_SERVER__PORT?)",
        ),
        ({"WSGATE_SERVER__HANDSHAKE_TIMEOUT": "0"}, "server.handshake_timeout: must be greater than 0"),
        ({"WSGATE_AUTH__HEADER": "maybe"}, "auth.header: must be true or false"),
        ({"WSGATE_AUTH__LEEWAY": "-1"}, "auth.leeway: must be between 0 and 300"),
        ({"WSGATE_AGENT__APP": "gpt"}, "agent.app: must be demo, echo, noop or a module:attribute reference"),
        ({"WSGATE_AUTH__HMAC_SECRET": "short"}, "auth.hmac_secret: must be at least 32 bytes"),
        (
            {"WSGATE_AGENT__UPSTREAM_URL": "http://agent:9000/runs"},
            "agent.upstream_secret: needed to sign the gateway's tokens to the upstream (HS256)",
        ),
        (
            {"WSGATE_AGENT__UPSTREAM_URL": "agent:9000", "WSGATE_AGENT__UPSTREAM_SECRET": "x" * 32},
            "agent.upstream_url: must be an http:// or https:// URL",
        ),
        (
            {"WSGATE_AGENT__UPSTREAM_URL": "http://a/r", "WSGATE_AGENT__UPSTREAM_SECRET": "short"},
            "agent.upstream_secret: must be at least 32 bytes",
        ),
        (
            {"WSGATE_AGENT__UPSTREAM_URL": "http://a/r", "WSGATE_AGENT__UPSTREAM_ALGORITHM": "ES256"},
            "agent.upstream_key_file: needed for upstream_algorithm = ES256",
        ),
        (
            {
                "WSGATE_AGENT__UPSTREAM_URL": "http://a/r",
                "WSGATE_AGENT__UPSTREAM_SECRET": "x" * 32,
                "WSGATE_AGENT__APP": "noop",
            },
            "agent.app: noop and agent.upstream_url both say what serves runs; set one",
        ),
        ({"WSGATE_AGENT__UPSTREAM_TOKEN_TTL": "3600"}, "agent.upstream_token_ttl: must be between 1 and 300"),
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


def test_printed_settings_mask_secrets() -> None:
    printed = to_toml(load_settings(env={"WSGATE_AUTH__HMAC_SECRET": SECRET}))
    assert '# hmac_secret = "***"  (set; masked)' in printed
    assert SECRET not in printed


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


def test_check_config_prints_toml_that_reads_back_to_the_same_settings(tmp_path: Path) -> None:
    config = tmp_path / "in.toml"
    config.write_text(
        '[server]\nport = 9000\nhandshake_timeout = 3.5\n[auth]\nhmac_secret = "' + "s" * 40 + '"\n'
        'issuer = "https://id.example.com/"\nallowed_origins = ["https://a.example", "https://b.example"]\n'
        '[[auth.keys]]\nkind = "public"\npem = "PEM"\nalgorithms = ["RS256"]\nkid = "k1"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "wsgate", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "()" not in out and "None" not in out  # no Python reprs
    assert '# hmac_secret = "***"' in out and "s" * 40 not in out  # masked, and left out
    printed = tmp_path / "out.toml"
    printed.write_text(out)
    # Read back: the same settings, the masked secret given again (it is never printed).
    again = load_settings(printed, env={}, overrides={"auth.hmac_secret": "s" * 40})
    assert again == load_settings(config, env={})


def test_an_unknown_environment_variable_is_named_with_the_nearest_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={"WSGATE_SERVR__PORT": "1", "WSGATE_AUTH__POLCY": "strict"})
    assert caught.value.problems == [
        "WSGATE_SERVR__PORT: unknown setting (did you mean WSGATE_SERVER__PORT?)",
        "WSGATE_AUTH__POLCY: unknown setting (did you mean WSGATE_AUTH__POLICY?)",
    ]


def test_an_unknown_file_setting_suggests_the_nearest(tmp_path: Path) -> None:
    config = tmp_path / "wsgate.toml"
    config.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    assert caught.value.problems == ["server.prot: unknown setting (did you mean server.port?)"]


EXAMPLE = Path(wsgate.__file__).with_name("wsgate.example.toml")


def test_the_shipped_example_has_every_setting_and_its_default() -> None:
    text = EXAMPLE.read_text()
    assert text == example_toml(), "regenerate: python -c 'from wsgate.configfile import example_toml; ...'"
    for name in setting_names(Settings):
        assert f"# {name.rsplit('.', 1)[-1]} =" in text, name
    assert load_settings(EXAMPLE, env={}) == Settings()  # all commented: the defaults


def test_every_default_in_the_example_is_the_default(tmp_path: Path) -> None:
    uncommented = tmp_path / "all.toml"
    uncommented.write_text(
        "\n".join(
            line[2:] if line.startswith("# ") and " = " in line and "(not set)" not in line else line
            for line in EXAMPLE.read_text().splitlines()
        )
    )
    assert load_settings(uncommented, env={}) == Settings()


def test_wsgate_check_config_accepts_the_shipped_example() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsgate", "check-config", "--config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_in_operations_md_verifies(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    unit = text.split("```ini\n", 1)[1].split("```", 1)[0]
    # The unit names /opt/wsgate/.venv/bin/wsgate: verify it against an executable there.
    unit = unit.replace("/opt/wsgate/.venv/bin/wsgate", sys.executable + " -m wsgate")
    unit = unit.replace("User=wsgate", "User=root").replace("EnvironmentFile=", "EnvironmentFile=-")
    path = tmp_path / "wsgate.service"
    path.write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in result.stderr.splitlines() if "wsgate.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
