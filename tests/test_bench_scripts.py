"""The bench scripts start and refuse cleanly: engine_bench's usage, and gpu_check.sh on a machine
without an NVIDIA GPU or CUDA toolkit (exit 2 and one line saying why; nothing is built)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

GPU_CHECK = REPO / "bench" / "gpu_check.sh"
ENGINE_BENCH = REPO / "bench" / "engine_bench.py"


def test_engine_bench_help_names_its_options():
    done = subprocess.run([sys.executable, str(ENGINE_BENCH), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--model", "--tokens", "--runs", "--buyers", "--json", "--no-server"):
        assert option in done.stdout


def test_engine_bench_refuses_a_model_it_has_no_chat_format_for():
    done = subprocess.run([sys.executable, str(ENGINE_BENCH), "--model", "llama3:8b"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice: 'llama3:8b'" in done.stderr


def test_rpc_bench_help_names_its_options_and_refuses_bad_ones():
    bench = REPO / "bench" / "rpc_bench.py"
    done = subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--model", "--tokens", "--runs", "--peer-threads", "--json"):
        assert option in done.stdout
    done = subprocess.run([sys.executable, str(bench), "--tokens", "1"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--tokens must be at least 3" in done.stderr


def test_engine_bench_refuses_bad_buyers_before_loading_anything():
    done = subprocess.run([sys.executable, str(ENGINE_BENCH), "--buyers", "four"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--buyers takes counts like 1,4,8, found 'four'" in done.stderr
    assert "Traceback" not in done.stderr


def _bin(tmp_path: Path, **scripts: str) -> Path:
    """A PATH folder with only what gpu_check.sh needs before it builds, plus fake tools."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("dirname",):
        found = shutil.which(tool)
        assert found, tool
        (folder / tool).symlink_to(found)
    for name, body in scripts.items():
        script = folder / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return folder


def _gpu_check(folder: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(folder), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "VENV": str(tmp_path / "no-venv"), "CUDA_HOME": str(tmp_path / "no-cuda")}
    return subprocess.run([shutil.which("bash") or "/bin/bash", str(GPU_CHECK), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_gpu_check_is_executable_and_parses():
    assert os.access(GPU_CHECK, os.X_OK)
    done = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_check_without_nvidia_smi_exits_2_saying_there_is_no_gpu(tmp_path):
    done = _gpu_check(_bin(tmp_path), tmp_path)
    assert done.returncode == 2
    assert done.stderr == ("gpu_check: no NVIDIA GPU here (nvidia-smi is not on PATH); "
                           "nothing to check\n")
    assert done.stdout == ""


def test_gpu_check_with_a_failing_nvidia_smi_exits_2_with_its_message(tmp_path):
    failing = "echo \"NVIDIA-SMI has failed because it couldn't communicate with the driver\"; exit 9"
    done = _gpu_check(_bin(tmp_path, **{"nvidia-smi": failing}), tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("gpu_check: no NVIDIA GPU here (nvidia-smi failed: NVIDIA-SMI "
                                  "has failed because it couldn't communicate with the driver)")


def test_gpu_check_with_a_gpu_but_no_cuda_toolkit_exits_2(tmp_path):
    done = _gpu_check(_bin(tmp_path, **{"nvidia-smi": "echo 'NVIDIA H100, 550.54'"}), tmp_path)
    assert done.returncode == 2
    assert (f"the CUDA toolkit is missing (no nvcc on PATH or in {tmp_path / 'no-cuda'}/bin)"
            in done.stderr)


def test_gpu_check_without_the_venv_exits_2_before_building(tmp_path):
    folder = _bin(tmp_path, **{"nvidia-smi": "echo 'NVIDIA H100, 550.54'", "nvcc": "exit 0"})
    done = _gpu_check(folder, tmp_path)
    assert done.returncode == 2
    assert done.stderr == (f"gpu_check: no {tmp_path / 'no-venv'}/bin/python: run `make demo` "
                           "first (or set VENV)\n")
    assert not list(tmp_path.glob("forge-gpu-check-*"))  # no work folder, nothing built


def test_gpu_check_refuses_a_bad_token_count(tmp_path):
    done = _gpu_check(_bin(tmp_path), tmp_path, "--tokens", "many")
    assert done.returncode == 2
    assert "--tokens must be a whole number in 2..4096, found 'many'" in done.stderr


def test_audit_bench_refuses_bad_counts_before_loading_anything():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "audit_bench.py"),
                           "--replies", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--replies, --tokens, --rounds and --cheats must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_grammar_bench_help_names_its_options_and_refuses_bad_counts():
    bench = REPO / "bench" / "grammar_bench.py"
    done = subprocess.run([sys.executable, str(bench), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--tokens", "--rounds", "--json"):
        assert option in done.stdout
    done = subprocess.run([sys.executable, str(bench), "--tokens", "2"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "--tokens must be at least 8 and --rounds at least 1" in done.stderr
    assert "Traceback" not in done.stderr


LEDGER_BENCH = REPO / "bench" / "ledger_bench.py"
SMALL = ["-n", "300", "--durable", "20", "--callers", "2", "--batch", "50", "--raw", "300",
         "--rounds", "1", "--json"]


def test_a_bench_run_leaves_no_scratch_folder_behind(tmp_path):
    done = subprocess.run([sys.executable, str(LEDGER_BENCH), *SMALL, "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert '"n": 300' in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_bench_stopped_by_sigterm_removes_its_scratch_folder(tmp_path):
    import signal
    import time

    args = [*SMALL, "-n", "2000000", "--dir", str(tmp_path)]  # far longer than this test waits
    proc = subprocess.Popen([sys.executable, str(LEDGER_BENCH), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any((p / "ledger.db").exists() for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # what `timeout` sends
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp_path.iterdir()) == []
