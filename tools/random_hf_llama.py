#!/usr/bin/env python3
"""Write a Llama-shaped Hugging Face model directory with random weights (bf16
safetensors), a word-level tokenizer and a chat template: for throughput tests
of a real shape where no real model can be carried. Its answers are noise.

usage: random_hf_llama.py OUT_DIR {tiny,1b,8b} [--device cuda]
Needs torch, transformers and tokenizers (the GPU box has them).
"""

import argparse
import json
import sys
from pathlib import Path

SHAPES = {  # layers, hidden, heads, kv heads, ffn (Llama 3.2 1B and Llama 3.1 8B)
    "tiny": (2, 256, 4, 2, 512),
    "1b": (16, 2048, 32, 8, 8192),
    "8b": (32, 4096, 32, 8, 14336),
}
VOCAB = 32000


def tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bundler.bench import WORDS  # the bench's prompt words are whole tokens here

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + ["Continue", "this", "list", "of", "words:", "Say", "hello", "in", "one", "short", "sentence."]:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < VOCAB:  # filler words so random ids decode to something
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("shape", choices=SHAPES)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, d, heads, kv, ffn = SHAPES[a.shape]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                      rope_theta=500000.0, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = Path(a.out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer(out)
    print(json.dumps({"wrote": str(out), "shape": a.shape, "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
