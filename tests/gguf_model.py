"""A tiny random-weight llama model written as a real GGUF file with the `gguf` package.

Two layers of width 64 over a byte-level GPT-2 style vocabulary (256 byte tokens, one merge,
BOS/EOS): about 500 KB that real llama.cpp loads and runs in milliseconds. The output rows
of every token but printable ASCII and newline are zero, so greedy decoding (temperature 0)
always emits printable ASCII, and re-tokenizing the text gives back exactly one token per
byte: token counts in tests can be checked against the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_LAYER = 2
N_CTX = 2048

BOS, EOS = 257, 258
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(visible, chars, strict=True)}


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the byte-level vocabulary."""
    import gguf

    table = _byte_to_unicode()
    tokens = [table[b] for b in range(256)]
    # llama.cpp wants at least one merge; merge two control bytes greedy decoding never emits.
    merges = [f"{table[1]} {table[2]}"]
    tokens.append(table[1] + table[2])
    tokens += ["<s>", "</s>"]
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    types = [normal] * 257 + [control, control]
    return tokens, [int(t) for t in types], merges


def write_tiny_llama(
    path: Path, *, seed: int = 1234, chat_template: str | None = CHAT_TEMPLATE
) -> Path:
    """Write the tiny model to `path` and return it."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, types, merges = vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    def weights(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("forge-tiny-test")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    embeddings = rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32)
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32)
    printable = [b for b in range(256) if 0x20 <= b < 0x7F or b == 0x0A]
    mask = np.zeros(n_vocab, dtype=bool)
    mask[printable] = True
    output[~mask] = 0.0  # logit 0 can never beat the best of ~96 random printable logits
    writer.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(p + "attn_k.weight", weights(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(p + "attn_v.weight", weights(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(p + "attn_output.weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_down.weight", weights(N_EMBD, N_FF))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":  # python tests/gguf_model.py OUT.gguf
    import sys

    print(write_tiny_llama(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
