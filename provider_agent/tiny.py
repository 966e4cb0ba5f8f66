"""A tiny real engine, made on the spot: llama.cpp's server with a model written at run time.

Nothing is downloaded. :func:`make_model` writes a llama-architecture GGUF file with
random weights (2 layers, width 64: about 170,000 parameters, under 1 MB), a small
SentencePiece-style vocabulary with the 256 byte-fallback tokens (so any UTF-8 input
tokenizes) and a chat template in its metadata. Its output is gibberish, but the
tokenization, the template rendering, the streaming, the slots and the cancellation
are llama.cpp's own. :func:`serve_model` serves it with llama.cpp's native HTTP server
(``xllamacpp``, a prebuilt wheel: ``pip install 'trio-inference-coordinator[engine]'``).

``provider-agent tiny-engine`` runs both; the tests and the benchmark use them too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

# ChatML, as many models ship it; tools are listed in the system turn.
CHATML = (
    "{%- if tools %}<|im_start|>system\nTools:{% for tool in tools %} "
    "{{ tool.function.name }}({% for name, p in tool.function.parameters.properties.items() %}"
    "{{ name }}: {{ p.type }}{% if not loop.last %}, {% endif %}{% endfor %}){% endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- elif message.content %}{% for part in message.content %}"
    "{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{%- endif %}"
    "<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# The same, but it calls a string method on each parameter's ``nullable`` flag: fine for
# tool schemas without one, a crash on a nullable parameter (the seed's incident was a
# string method applied to a list-typed ``type``).
BREAKS_ON_NULLABLE = CHATML.replace(
    "{{ name }}: {{ p.type }}",
    "{{ name }}: {{ p.type }}{% if p.nullable is defined %}{{ p.nullable.lower() }}{% endif %}")

_WORDS = (
    "the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on",
    "are", "with", "as", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had",
    "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said",
    "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up",
    "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make",
    "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number",
    "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil",
    "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part",
    "hello", "world", "model", "answer", "question",
)


def make_model(path: Path | str, *, chat_template: str = CHATML, n_ctx: int = 4096,
               width: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny llama-architecture GGUF model to ``path``; its path.

    ``width`` and ``layers`` set its size (and so its speed: the default decodes a few
    thousand tokens a second on one core)."""
    import gguf
    import numpy as np

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581" + w for w in _WORDS] + list(_WORDS) + [
        "\u2581", "<|", "|>", "im", "_start", "_end", "\n"]
    for piece in dict.fromkeys(pieces):  # once each, in order
        tokens.append(piece.encode())
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    n_vocab, n_embd, n_head, n_ff, n_layer = len(tokens), width, 4, 2 * width, layers

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(chat_template)

    def weight(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def serve_model(model: Path | str, *, alias: str, port: int, host: str = "127.0.0.1",
                slots: int = 2, threads: int = 1, n_ctx: int = 2048) -> Any:
    """Start llama.cpp's HTTP server for ``model`` in this process; the running server.

    It listens until the process ends (llama.cpp's listener runs in its own threads).
    ``n_ctx`` is shared by the ``slots``.
    """
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.model_alias = {alias}
    params.hostnames = [host]
    params.port = port
    params.n_ctx = n_ctx
    params.n_parallel = slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.endpoint_slots = True
    params.endpoint_metrics = True
    params.endpoint_props = True
    params.use_jinja = True
    params.warmup = False
    return xllamacpp.Server(params)


def main(argv: list[str] | None = None) -> None:
    """``provider-agent tiny-engine``: make a tiny model and serve it until interrupted."""
    import argparse
    import signal
    import tempfile

    parser = argparse.ArgumentParser(
        prog="provider-agent tiny-engine",
        description="Make a tiny random-weight model and serve it with llama.cpp's own HTTP "
        "server (needs the [engine] extra). Its answers are gibberish; everything else is "
        "the real engine's.")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    parser.add_argument("--model-name", default="tiny-chatml",
                        help="the model's name in /v1/models (default: tiny-chatml)")
    parser.add_argument("--slots", type=int, default=2, help="parallel slots (default: 2)")
    parser.add_argument("--broken-template", action="store_true",
                        help="a chat template that crashes on a nullable tool parameter")
    parser.add_argument("--width", type=int, default=64,
                        help="embedding width: 64 decodes thousands of tokens a second on one "
                        "core, 512 (with --layers 8) a couple of hundred (default: 64)")
    parser.add_argument("--layers", type=int, default=2, help="layers (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(os.path.join(tmp, "tiny.gguf"), chat_template=(
            BREAKS_ON_NULLABLE if args.broken_template else CHATML),
            width=args.width, layers=args.layers)
        server = serve_model(model, alias=args.model_name, port=args.port, slots=args.slots,
                    threads=args.threads)
        print(f"llama.cpp serving {args.model_name} on http://127.0.0.1:{args.port} "
              "(Ctrl-C to stop)", flush=True)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to sigwait, not a handler
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait(stop)
        del server  # stops llama.cpp's listener
