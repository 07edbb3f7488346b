"""One model across machines, on llama.cpp's own RPC backend (ggml-rpc), driven and metered by
forge.

- `ggml`: the RPC backend's C calls, through the wheel's libllama (`llama_cpp.llama_cpp._lib`).
- `terms`: what a head and a layer peer agree and sign (rate per layer-token, layers, expiry),
  the tunnel handshake, and the dual-signed trade that pays a peer for its layers.
- `peer`: `forge rpc serve` — ggml's RPC server on 127.0.0.1 behind an authenticated tunnel.
- `tunnel`: the head's end of each tunnel (a loopback port per peer that ggml connects to).
- `split`: the head's engine — the model loaded in a child process with the peers as devices,
  so a dead peer fails a request instead of aborting the node — and the metering of peers.
"""
