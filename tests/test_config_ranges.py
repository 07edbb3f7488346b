"""Every config key has a type and a checked range, and so has every integer on the command
line: a bad value is one line on stderr and exit 2, never a traceback or a node that starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, forge_env

HUGE = str(10**30)
OUT_OF_RANGE = [("node.port", "-5", "0 and 65535"), ("node.port", "70000", "0 and 65535"),
                ("models.n_ctx", "0", "between"), ("mesh.gossip_batch", "100000", "1 and 500"),
                ("safety.breaker_errors", "-1", "between"), ("mesh.probe_s", "0", "between"),
                ("safety.per_request_cap_cu", HUGE, "between"), ("audit.every", "0", "between"),
                ("engine.lanes", "0", "1 and 256")]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a usage failure (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_every_config_key_has_a_type_and_a_range_its_default_fits():
    from forge_cli import config

    for key in config.KEYS.values():
        assert key.type in (int, str, bool, list), key.name
        if key.type is int:
            assert key.low is not None and key.high is not None, key.name
            assert key.low <= key.default <= key.high, key.name
        assert config.check_value(key.name, key.default) == key.default
        assert key.range, key.name


def test_gossip_batch_range_is_the_gossip_batch_limit():
    from forge_cli import config
    from forge_cli.mesh.gossip import MAX_BATCH

    assert config.KEYS["mesh.gossip_batch"].high == MAX_BATCH


@pytest.mark.parametrize(("key", "value", "expected"), OUT_OF_RANGE,
                         ids=[f"{k}={v[:8]}" for k, v, _ in OUT_OF_RANGE])
def test_config_set_refuses_a_value_out_of_range(run_forge, forge_home, key, value, expected):
    line = one_line_error(run_forge("config", "set", "--", key, value))
    assert key in line and expected in line
    assert not (forge_home / "config.toml").exists()
    assert run_forge("config", "set", key, "7" if key != "models.n_ctx" else "512").returncode == 0


@pytest.mark.parametrize(("key", "value", "expected"), OUT_OF_RANGE[:5],
                         ids=[f"{k}={v}" for k, v, _ in OUT_OF_RANGE[:5]])
def test_node_refuses_a_hand_edited_config_with_one_line(tmp_path: Path, tiny_gguf: Path,
                                                         key, value, expected):
    home = tmp_path / "home"
    home.mkdir()
    section, name = key.split(".")
    path = home / "config.toml"
    path.write_text(f"[{section}]\n{name} = {value}\n")
    # --port 0 keeps a node that (wrongly) starts off any real port; node.port itself is
    # only read without --port.
    port = [] if key == "node.port" else ["--port", "0"]
    try:
        done = subprocess.run([sys.executable, "-m", "forge_cli", "node", "-m", str(tiny_gguf),
                               *port], capture_output=True, text=True, cwd=REPO,
                              env=forge_env(home), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"forge node started with {key} = {value} in {path}")
    line = one_line_error(done)
    assert key in line and str(path) in line and expected in line


def test_environment_override_out_of_range_is_refused(run_forge):
    line = one_line_error(run_forge("config", "show", env={"FORGE_NODE_PORT": "70000"}))
    assert "FORGE_NODE_PORT" in line and "0 and 65535" in line


@pytest.mark.parametrize("args", [
    ("ledger", "get", HUGE),
    ("ledger", "prove", HUGE),
    ("ledger", "consistency", "1", HUGE),
    ("ledger", "causal", HUGE),
    ("ledger", "show", "--limit", HUGE),
    ("ledger", "replay", "--until", HUGE),
    ("safety", "policy", "set", "--cap", HUGE),
    ("settle", "--hours", HUGE),
    ("loan", "lend", HUGE),
    ("loan", "borrow", "10", "--term", HUGE, "--collateral", "5"),
    ("chat", "--seed", HUGE, "hi"),
    ("node", "--port", "70000"),
], ids=lambda args: "-".join(a[:6] for a in args))
def test_huge_integer_arguments_exit_2_with_one_line(run_forge, args):
    line = one_line_error(run_forge(*args))
    assert "range" in line, line


def test_every_integer_parameter_of_the_cli_has_a_range():
    import typer.main

    from forge_cli.cli.app import app

    def walk(command, path: str):  # noqa: ANN001 — click's Command, vendored by typer
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    unbounded = []
    for path, command in walk(typer.main.get_command(app), "forge"):
        for param in command.params:
            kind = param.type
            if kind.name in ("integer range", "float range"):
                if kind.min is None or kind.max is None:
                    unbounded.append(f"{path} {param.name}")
            elif kind.name in ("integer", "float"):
                unbounded.append(f"{path} {param.name}")
    assert unbounded == []
