"""The RPC backend's C entry points, reached through the wheel's libllama.

The wheel ships more than one copy of libggml; registering a server on a copy other than the
one libllama uses silently keeps every layer local, so every call here goes through
`llama_cpp.llama_cpp._lib` (dlsym on libllama's handle searches the libggml it links).
"""

from __future__ import annotations

import ctypes
from typing import Any

from forge_cli.errors import RpcUnavailable

DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type
GPU_TYPES = (1, 2)  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU


def _lib() -> Any:
    from llama_cpp import llama_cpp as bindings

    return bindings._lib


def require_rpc() -> None:
    """RpcUnavailable unless this llama.cpp was built with GGML_RPC."""
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        raise RpcUnavailable(
            "this llama-cpp-python was built without llama.cpp's RPC backend, so a model cannot "
            "be split across machines",
            hint="rebuild it with CMAKE_ARGS=-DGGML_RPC=on (`make` does, for the project's venv)")


def _fn(name: str, restype: Any, argtypes: list[Any]) -> Any:
    fn = getattr(_lib(), name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def _rpc_proc(name: str, restype: Any, argtypes: list[Any]) -> Any:
    """A function the RPC backend exports through its registry (ggml_backend_reg_get_proc_address)."""
    require_rpc()
    reg = _fn("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])(b"RPC")
    if not reg:
        raise RpcUnavailable("llama.cpp's backend registry has no RPC backend")
    address = _fn("ggml_backend_reg_get_proc_address", ctypes.c_void_p,
                  [ctypes.c_void_p, ctypes.c_char_p])(reg, name.encode())
    if not address:
        raise RpcUnavailable(f"llama.cpp's RPC backend does not export {name}")
    # CFUNCTYPE releases the GIL for the call: a serving thread does not stop Python.
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def add_server(endpoint: str) -> None:
    """Register the ggml RPC server at `endpoint` ("host:port") as devices for later model
    loads. llama.cpp aborts the process when it cannot reach the server: call this only in a
    process that may die (the head's engine child)."""
    add = _rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    reg = add(endpoint.encode())
    if not reg:
        raise RpcUnavailable(f"the RPC server at {endpoint} offers no devices")
    _fn("ggml_backend_register", None, [ctypes.c_void_p])(reg)


def serve(endpoint: str, cache_dir: str, threads: int) -> None:
    """Run ggml's RPC server on `endpoint` with this machine's CPU as its one device and its
    tensor cache in `cache_dir`. Blocks for as long as it serves; returns if it cannot bind."""
    start = _rpc_proc("ggml_backend_rpc_start_server", None,
                      [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.POINTER(ctypes.c_void_p)])
    import llama_cpp

    llama_cpp.llama_backend_init()
    cpu = _fn("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int])(DEVICE_TYPE_CPU)
    if not cpu:
        raise RpcUnavailable("llama.cpp has no CPU device to serve")
    devices = (ctypes.c_void_p * 1)(cpu)
    start(endpoint.encode(), cache_dir.encode(), threads, 1, devices)


def gpu_devices() -> int:
    """Devices of GPU type (a real GPU, or a registered RPC server)."""
    count = _fn("ggml_backend_dev_count", ctypes.c_size_t, [])()
    get = _fn("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
    kind = _fn("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p])
    return sum(1 for i in range(count) if kind(get(i)) in GPU_TYPES)


__all__ = ["add_server", "gpu_devices", "require_rpc", "serve"]
