"""`forge models`: the catalog, downloads and the files on disk."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from forge_cli.cli.output import print_json

if TYPE_CHECKING:
    from forge_cli.inference import catalog

app = typer.Typer(
    help="Model catalog and downloads: name:tag shorthands, hf.co/USER/REPO[:QUANT], "
    "or a path to a .gguf file.",
    no_args_is_help=True,
)


def human_size(n: int | None, exact: bool = True) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{'' if exact else '~'}{n / scale:.1f} {unit}"
    return f"{n} B"


def human_params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="One JSON array.")) -> None:
    """The catalog; ✓ marks models present on this machine."""
    from forge_cli.inference import catalog

    rows = catalog.listing()
    if as_json:
        print_json(rows)
        return
    typer.echo(f"   {'NAME':<14} {'PARAMS':>7} {'SIZE':>9}  ABOUT")
    for row in rows:
        mark = "✓" if row["present"] else " "
        size = human_size(row["size"], exact=row["path"] is not None)  # type: ignore[arg-type]
        typer.echo(f" {mark} {row['name']:<14} {human_params(row['params']):>7} {size:>9}  "  # type: ignore[arg-type]
                   f"{row['about']}")


@app.command("pull")
def pull(
    name: str = typer.Argument(..., help="e.g. qwen2.5:0.5b or hf.co/USER/REPO:Q4_K_M."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Download a model (resumes an interrupted download)."""
    from forge_cli.inference import download

    def announce(ref: catalog.ModelRef) -> None:
        typer.echo(f"pulling {download.announcement(ref)} …", err=True)

    ref, path, fresh = download.pull(name, progress=not quiet, announce=announce)
    verb = "pulled" if fresh else "already present:"
    typer.echo(f"{verb} {ref.name} → {path} ({human_size(path.stat().st_size)})")


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Model name or .gguf path."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object."),
) -> None:
    """Repo, file, size, SHA-256, parameters and chat template of a model."""
    from forge_cli.inference import catalog

    info = catalog.describe(name)
    if as_json:
        print_json(info)
        return
    template = info["chat_template"]
    rows = [
        ("name", info["name"]),
        ("source", info["source"]),
        ("repo", info["repo"] or "-"),
        ("file", info["file"] or "-"),
        ("present", "yes" if info["present"] else f"no (forge models pull {info['name']})"),
        ("path", info["path"] or "-"),
        ("size", human_size(info["size"], exact=bool(info["size_exact"]))),  # type: ignore[arg-type]
        ("sha256", info["sha256"] or "-"),
        ("params", human_params(info["params"]) if info["params"] else "?"),  # type: ignore[arg-type]
        ("arch", info["architecture"] or "-"),
        ("context", info["context_length"] or "-"),
        ("template", "-" if template is None else ("yes" if template else "no (ChatML fallback)")),
    ]
    for key, value in rows:
        typer.echo(f"{key:<9} {value}")


@app.command("rm")
def rm(name: str = typer.Argument(..., help="Model name.")) -> None:
    """Delete a downloaded model's file."""
    from forge_cli.inference import download

    for path in download.remove(name):
        typer.echo(f"deleted {path}")


@app.command("path")
def path() -> None:
    """Print the folder that downloads go to (models.dir, or the Hugging Face cache)."""
    from forge_cli.inference import catalog

    typer.echo(str(catalog.store_dir()))
