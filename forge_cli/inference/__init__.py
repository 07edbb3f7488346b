"""Local inference: the model catalog, downloads, GGUF metadata and the llama.cpp engine.

Nothing here imports llama_cpp or huggingface_hub at import time; the engine and the download
functions import them when called, so `forge --help` stays fast.
"""
