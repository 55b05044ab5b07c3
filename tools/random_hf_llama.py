#!/usr/bin/env python3
"""Write a Llama-shaped Hugging Face model directory with random weights (bf16
safetensors), a word-level tokenizer and a chat template: for throughput tests
of a real shape where no real model can be carried. Its answers are noise.

usage: random_hf_llama.py OUT_DIR {tiny,exl2-tiny,0.5b,1b,8b,7b-kv4,70b} [--vocab N] [--jobs N] [--bpe TEXT]

--bpe TEXT: a byte-level BPE tokenizer trained on TEXT (tokenizers only, no transformers), which
ExLlamaV2's converter calibrates with (exl2-tiny --vocab 1024 --bpe its c4.utf8: issue #14).

The safetensors files are written directly (no model is built in memory, so a
70B shape needs no GPU and no 140 GB of RAM): each shard process fills its
tensors from one random block of normal(0, 0.02) values at shifting offsets.
Needs numpy, and transformers + tokenizers for the tokenizer (the GPU box has them).
"""

import argparse
import json
import os
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHAPES = {  # layers, hidden, heads, kv heads, ffn (Llama 3.2 1B, Llama 3.1 8B and 70B)
    "tiny": (2, 256, 4, 2, 512),
    "exl2-tiny": (2, 512, 8, 8, 1536),  # ExLlamaV2's converter quantizes it in about a minute on one GPU
    "0.5b": (24, 896, 14, 2, 4864),  # Qwen2.5-0.5B's layers (~0.95 GB in bf16 with --vocab 64000)
    "1b": (16, 2048, 32, 8, 8192),
    "8b": (32, 4096, 32, 8, 14336),
    "7b-kv4": (28, 3584, 28, 4, 18944),  # Qwen2-7B's shape (few KV heads; use --vocab 152064), no qkv bias
    "70b": (80, 8192, 64, 8, 28672),
}
SHARD_BYTES = 5 << 30
BLOCK = 1 << 26  # random bf16 values per writer process (128 MiB)
ONE_BF16 = 0x3F80


def tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bundler.bench import WORDS  # the bench's prompt words are whole tokens here

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + ["Continue", "this", "list", "of", "words:", "Say", "hello", "in", "one", "short", "sentence."]:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < vocab_size:  # filler words so random ids decode to something
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)


def bpe_tokenizer(out: Path, vocab_size: int, text: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}"}, indent=1) + "\n")


def tensors(shape: str, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    layers, d, heads, kv, ffn = SHAPES[shape]
    hd = d // heads
    out = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (heads * hd, d)),
                (p + "self_attn.k_proj.weight", (kv * hd, d)),
                (p + "self_attn.v_proj.weight", (kv * hd, d)),
                (p + "self_attn.o_proj.weight", (d, heads * hd)),
                (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (ffn, d)),
                (p + "mlp.up_proj.weight", (ffn, d)),
                (p + "mlp.down_proj.weight", (d, ffn))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shards(items: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in items:
        b = _numel(shape) * 2
        if groups[-1] and size + b > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += b
    return groups


def write_shard(path: str, items: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    import numpy as np

    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(BLOCK, dtype=np.float32) * 0.02).view(np.uint32)
    block = (block >> 16).astype(np.uint16)  # bf16: the top half of a float32
    twice = np.concatenate([block, block])  # any window of BLOCK values is one slice
    header, offset = {}, 0
    for name, shape in items:
        n = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _name, shape in items:
            left = _numel(shape)
            if len(shape) == 1:  # RMSNorm weights: ones
                f.write(np.full(left, ONE_BF16, dtype=np.uint16).tobytes())
                continue
            start = int(rng.integers(0, BLOCK))
            while left:
                take = min(left, BLOCK)
                f.write(memoryview(twice[start:start + take]))
                left -= take
                start = (start + 7919) % BLOCK
    os.replace(tmp, path)
    return offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("shape", choices=SHAPES)
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3's 128,256 by default)")
    ap.add_argument("--bpe", type=Path, help="train a byte-level BPE tokenizer on this text file")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="shards written at once")
    a = ap.parse_args()
    layers, d, heads, kv, ffn = SHAPES[a.shape]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    groups = shards(tensors(a.shape, a.vocab))
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        sizes = list(ex.map(write_shard, [str(out / n) for n in names], groups, range(len(groups))))
    weight_map = {name: names[i] for i, g in enumerate(groups) for name, _ in g}
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=1))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab, "hidden_size": d,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": d // heads, "hidden_act": "silu", "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    if a.bpe:
        bpe_tokenizer(out, a.vocab, a.bpe)
    else:
        tokenizer(out, a.vocab)
    params = sum(_numel(s) for g in groups for _, s in g)
    print(json.dumps({"wrote": str(out), "shape": a.shape, "params": params, "bytes": sum(sizes),
                      "shards": len(groups), "seconds": round(time.monotonic() - t0, 1)}))


if __name__ == "__main__":
    main()
