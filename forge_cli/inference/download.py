"""Fetching and deleting model files: `forge models pull`, `forge models rm`, and the pull
on first use that `forge chat`, `forge node` and `forge seed` do for a model they lack.

Downloads go through huggingface_hub (its cache, or models.dir when set), with its progress
bar and resume of interrupted transfers, and are checked against the catalog's sha256. Being
offline is reported in one line that says what to do, and leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from forge_cli.errors import ModelError, OfflineError
from forge_cli.inference import catalog
from forge_cli.inference.catalog import ModelRef


def _offline_hint(ref: ModelRef) -> str:
    hint = (f"connect to the network (and unset HF_HUB_OFFLINE) and run "
            f"`forge models pull {ref.name}` again, or pass a local .gguf path with -m")
    installed = catalog.embedded_names(installed=True)
    if installed:
        return hint + f"; {_and(installed)} work{'s' if len(installed) == 1 else ''} offline here"
    names = catalog.embedded_names(installed=False)
    return hint + f"; {_and(names)} work offline after `{catalog.EMBEDDED_EXTRA}`"


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _is_connection_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or name in (
            "ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError", "Timeout",
            "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ProxyError", "NetworkError",
        ):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why `endpoint` cannot be reached (None if a TCP connection opens).

    huggingface_hub retries a refused connection with backoff for ~25 s; one quick connect
    tells the same in a moment. Behind a proxy the probe proves nothing, so it is skipped.
    """
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"cannot resolve {host}"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def _pick_file(files: list[str], ref: ModelRef) -> str:
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "/" not in f]
    wanted = [f for f in ggufs if catalog.matches_quant(f, ref.quant or "")]
    whole = [f for f in wanted if "-of-0" not in f]
    if whole:
        return whole[0]
    if wanted:
        raise ModelError(f"{ref.repo} has {ref.quant} only as a split GGUF ({wanted[0]}, …); "
                         "forge loads single-file models")
    quants = sorted({f.rsplit("-", 1)[-1].removesuffix(".gguf") for f in ggufs})
    raise ModelError(f"{ref.repo} has no {ref.quant} GGUF file",
                     hint=f"files there end in: {', '.join(quants) or 'no .gguf at all'}")


def pull(name: str, *, progress: bool = True,
         announce: Callable[[ModelRef], None] | None = None) -> tuple[ModelRef, Path, bool]:
    """Download `name` unless present; returns (ref, path, downloaded_now). `announce` is
    told just before a download starts (after the checks that it can).

    >>> pull("smollm2:135m")          # doctest: +SKIP
    (ModelRef(name='smollm2:135m', …), PosixPath('…/SmolLM2-135M-Instruct-Q4_K_M.gguf'), True)
    """
    ref = catalog.resolve(name)
    if ref.kind == "path":
        raise ModelError(f"{ref.name} is a local file; there is nothing to pull")
    present = catalog.local_file(ref, prepare=True)
    if present is not None:
        return ref, present, False
    assert ref.repo is not None

    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub import constants

    where = f"{ref.repo}/{ref.file or ref.quant}"
    if constants.HF_HUB_OFFLINE:
        raise OfflineError(f"cannot download {ref.name} ({where}): HF_HUB_OFFLINE is set",
                           hint=_offline_hint(ref))

    reason = _unreachable(constants.ENDPOINT)
    if reason:
        raise OfflineError(f"cannot download {ref.name} ({where}): Hugging Face is not reachable "
                           f"({reason})", hint=_offline_hint(ref))

    if announce is not None:
        announce(ref)
    local_dir = catalog.repo_local_dir(ref.repo) if catalog.models_dir() else None
    created = local_dir is not None and not local_dir.exists()
    try:
        path = _download(ref, local_dir)
    except BaseException as exc:
        if created and local_dir is not None:
            _remove_if_empty_of_data(local_dir)
        if isinstance(exc, ModelError):
            raise
        if isinstance(exc, KeyboardInterrupt):
            raise
        if _is_connection_error(exc):
            raise OfflineError(
                f"cannot download {ref.name} ({where}): Hugging Face is not reachable",
                hint=_offline_hint(ref),
            ) from exc
        raise _translate(exc, ref) from exc
    if ref.entry is not None and ref.entry.sha256:
        _verify(ref, path)
    return ref, path, True


def _verify(ref: ModelRef, path: Path) -> None:
    """Keep a download only if it hashes to the catalog's sha256; otherwise delete it."""
    from forge_cli.inference import identity

    assert ref.entry is not None
    found = identity.sha256_file(path)
    if found != ref.entry.sha256:
        _delete(path)
        raise ModelError(f"the download of {ref.name} ({ref.repo}/{ref.file}) is not the "
                         f"catalog's file: its sha256 is {found[:16]}…, expected "
                         f"{(ref.entry.sha256 or '')[:16]}…; it was deleted",
                         hint="the repository may have changed; pull it again later, or pass "
                         "a .gguf path you trust with -m")


def ensure_local(name: str, *, may_pull: bool = True,
                 err: TextIO | None = None) -> tuple[ModelRef, Path]:
    """`name`'s GGUF file, pulled first when it is a catalog or hf.co model not on disk.

    The pull shows huggingface_hub's progress bar when `err` is a terminal and one line
    otherwise; without `may_pull` a missing model is the ModelError of `find_model_file`.
    """
    ref = catalog.resolve(name)
    if ref.kind == "path" or not may_pull or catalog.embedded_present(ref) or \
            catalog.local_file(ref) is not None:
        return catalog.find_model_file(name)
    out = err or sys.stderr

    def announce(ref: ModelRef) -> None:
        out.write(f"pulling {announcement(ref)} …\n")
        out.flush()

    ref, path, _ = pull(name, progress=out.isatty(), announce=announce)
    return ref, path


def announcement(ref: ModelRef) -> str:
    """What a pull fetches, in words: `smollm2:135m from QuantFactory/…-GGUF (~98 MB)`."""
    size = f" (~{ref.entry.size / 1e6:.0f} MB)" if ref.entry and ref.entry.size else ""
    return f"{ref.name} from {ref.repo}{size}"


def _download(ref: ModelRef, local_dir: Path | None) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    if ref.repo is None:
        raise ModelError(f"{ref.name} names no Hugging Face repository to download from")
    filename = ref.file
    if filename is None:
        filename = _pick_file(HfApi().list_repo_files(ref.repo), ref)
    return Path(hf_hub_download(repo_id=ref.repo, filename=filename,
                                local_dir=None if local_dir is None else str(local_dir)))


def _translate(exc: BaseException, ref: ModelRef) -> ModelError:
    name = type(exc).__name__
    if name == "GatedRepoError":
        return ModelError(f"{ref.repo} is gated on Hugging Face; accept its licence there and "
                          "log in with `hf auth login`")
    if name == "RepositoryNotFoundError":
        return ModelError(f"Hugging Face has no repository {ref.repo} (or it is private)")
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return ModelError(f"{ref.repo} has no file {ref.file}")
    if isinstance(exc, OSError):
        return ModelError(f"cannot write the download of {ref.name}: {exc}")
    return ModelError(f"download of {ref.name} failed: {name}: {exc}")


def _remove_if_empty_of_data(folder: Path) -> None:
    """Drop a folder this pull created if it holds no model bytes (only lock/metadata files)."""
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and (
            path.suffix in (".gguf", ".incomplete")
        ):
            return
    shutil.rmtree(folder, ignore_errors=True)


def remove(name: str) -> list[Path]:
    """Delete a pulled model's file(s); returns what was deleted (ModelError if none)."""
    ref = catalog.resolve(name)
    if ref.kind == "path":
        raise ModelError(f"{ref.name} is a file you named yourself; forge will not delete it")
    deleted: list[Path] = []
    while True:  # a model may be present in more than one place (embedded, models.dir, cache)
        path = catalog.made_file(ref)
        if path is None or path in deleted:
            break
        deleted += _delete(path)
    if not deleted:
        if catalog.embedded_present(ref) and ref.entry and ref.entry.in_place:
            package = (ref.entry.embedded or "").replace("_", "-")
            raise ModelError(f"model {ref.name} comes with the {package} package; forge will "
                             f"not delete a file inside it", hint=f"pip uninstall {package}")
        raise ModelError(f"model {ref.name} is not downloaded; nothing to remove")
    return deleted


def _delete(path: Path) -> list[Path]:
    removed = []
    try:
        if path.is_symlink():
            blob = path.resolve()
            path.unlink()
            removed.append(path)
            if blob.exists() and not _blob_referenced(blob):
                blob.unlink()
                removed.append(blob)
        else:
            path.unlink()
            removed.append(path)
    except OSError as exc:
        raise ModelError(f"cannot delete {path}: {exc.strerror}") from exc
    return removed


def _blob_referenced(blob: Path) -> bool:
    snapshots = blob.parent.parent / "snapshots"
    if not snapshots.is_dir():
        return False
    return any(link.is_symlink() and link.resolve() == blob for link in snapshots.rglob("*"))
