"""`forge config`: where the config lives and what it says."""

from __future__ import annotations

import json

import typer

from forge_cli import config
from forge_cli.cli.output import print_json

app = typer.Typer(
    help="Read and change config.toml (keys are checked; FORGE_<SECTION>_<KEY> overrides).",
    no_args_is_help=True,
)


@app.command("path")
def path() -> None:
    """Print the path of config.toml."""
    typer.echo(str(config.config_path()))


@app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Every key with its effective value (default < config.toml < environment)."""
    values = config.load()
    if as_json:
        print_json(values)
        return
    for name in sorted(values):
        typer.echo(f"{name} = {json.dumps(values[name])}")


@app.command("get")
def get(key: str = typer.Argument(..., help="Dotted key, e.g. node.port.")) -> None:
    """Print one key's effective value."""
    value = config.get(key)
    typer.echo(json.dumps(value) if not isinstance(value, str) else value)


@app.command("set")
def set_(
    key: str = typer.Argument(..., help="Dotted key, e.g. node.port."),
    value: str = typer.Argument(..., help="New value; lists are comma-separated."),
) -> None:
    """Check (type and range) and write one key to config.toml."""
    typed = config.set_value(key, value)
    typer.echo(f"{key} = {json.dumps(typed)}")


@app.command("keys")
def keys(as_json: bool = typer.Option(False, "--json", help="A JSON list.")) -> None:
    """List every known key with its type, range, default and meaning."""
    if as_json:
        print_json([{"key": k.name, "type": k.type.__name__, "default": k.default,
                     "choices": list(k.choices), "min": k.low, "max": k.high, "range": k.range,
                     "env": k.env, "help": k.help}
                    for k in config.KEYS.values()])
        return
    for key in config.KEYS.values():
        typer.echo(f"{key.name}  [{key.type.__name__} {key.range}, default "
                   f"{json.dumps(key.default)}]  {key.help}")
