"""The `forge` command: groups are registered here, errors become exit codes here."""

from __future__ import annotations

import sys

import typer

from forge_cli import version as forge_version
from forge_cli.cli import (
    agent_cmd,
    audit_cmd,
    chat_cmd,
    config_cmd,
    ledger_cmd,
    loan_cmd,
    mcp_cmd,
    models_cmd,
    node_cmd,
    peers_cmd,
    rpc_cmd,
    safety_cmd,
    seed_cmd,
    settle_cmd,
    tui_cmd,
    wallet_cmd,
    worker_cmd,
)
from forge_cli.cli.output import print_error
from forge_cli.errors import EXIT_USAGE, ForgeError

# Either click's exception class or typer's copy of it: both carry `exit_code`.
_ClickException: type[Exception]
try:  # typer ≥ 0.23 runs on its own copy of click, whose errors derive from this
    from typer import TyperException as _ClickException
except ImportError:  # an older typer over the click package
    from click import ClickException as _ClickException

app = typer.Typer(
    name="forge",
    help="Compute is money: local LLM inference traded in compute units (CU), "
    "recorded in a verifiable ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"forge {forge_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Exit codes: 0 ok, 1 a check failed (tamper, denied spend), 2 usage, config, I/O or lock."""


app.command("chat")(chat_cmd.chat)
app.command("node")(node_cmd.node)
app.command("seed")(seed_cmd.seed)
app.command("worker")(worker_cmd.worker)
app.command("peers")(peers_cmd.peers)
app.add_typer(models_cmd.app, name="models")
app.add_typer(wallet_cmd.app, name="wallet")
app.add_typer(ledger_cmd.app, name="ledger")
app.add_typer(safety_cmd.app, name="safety")
app.add_typer(loan_cmd.app, name="loan")
app.add_typer(settle_cmd.app, name="settle")
app.add_typer(config_cmd.app, name="config")
app.command("tui")(tui_cmd.tui)
app.add_typer(agent_cmd.app, name="agent")
app.command("mcp")(mcp_cmd.mcp)
app.add_typer(audit_cmd.app, name="audit")
app.add_typer(rpc_cmd.app, name="rpc")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app, turning expected failures into exit codes."""
    try:
        # Not standalone: click's own usage errors come here, to be printed as one line.
        code = app(args=argv, prog_name="forge", standalone_mode=False)
    except _ClickException as exc:
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one's help is already printed
            sys.stderr.write(f"forge: error: {_one_line(exc)}\n")
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except typer.Abort:  # Ctrl-D at a prompt
        sys.stderr.write("\naborted\n")
        sys.exit(1)
    except ForgeError as exc:
        print_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        # `forge ledger export | head`: the reader left; that is not an error of ours.
        sys.stderr.close()
        sys.exit(0)
    except OSError as exc:
        sys.stderr.write(f"forge: error: {exc}\n")
        sys.exit(EXIT_USAGE)
    # typer.Exit(n) comes back as n; a command that returns comes back as None.
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(exc: Exception) -> str:
    """A click usage error as one line, with where to find help (`forge ledger get -h`)."""
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)  # usage errors know their command
    if ctx is not None:
        message += f" (see `{ctx.command_path} -h`)"
    return message
