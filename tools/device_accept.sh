#!/bin/sh
# GPU acceptance runs on the device box (docs/BENCHMARKS.md). Phases, one per call:
#   sh tools/device_accept.sh receive          copy this call's carried bundle files into /tmp/b
#   sh tools/device_accept.sh models           make the random-weight models (GGUF now, HF in the background)
#   sh tools/device_accept.sh gguf             install the bundle (CUDA llama-server as planned) and bench it,
#                                              then the -np 4 default-like baseline
#   sh tools/device_accept.sh vllm             install the HF model with vLLM as planned and bench it
#   sh tools/device_accept.sh vllm_tp2         the alternative: tensor parallel 2 (no data parallel)
# Results land in $OUT. The box has no network; nothing here needs one.
set -eu

B=/tmp/b/gpu-box
MODELS=/tmp/models
BENCH="--concurrency 1,50 --prompt-tokens 400 --max-tokens 512"

info() { printf '[device] %s\n' "$*" >&2; }

receive() {
    mkdir -p /tmp/b
    for d in .carry/x*; do [ -d "$d" ] && cp -a "$d"/. /tmp/b/ && rm -rf "$d"; done
    info "bundle files here: $(find /tmp/b -type f | wc -l), $(du -sh /tmp/b | cut -f1)"
}

models() {
    mkdir -p "$MODELS"
    if [ ! -f "$MODELS/llama-8b-f16.gguf" ]; then
        python3 tools/synthetic_gguf.py .carry/gguf-tools/gguf-py .carry/gguf-tools/ggml-vocab-llama-bpe.gguf \
            "$MODELS/llama-8b-f16.gguf" 8b
    fi
    PYTHONPATH=.carry/gguf-tools/gguf-py python3 -m bundler.cli inspect "$MODELS/llama-8b-f16.gguf" \
        > "$MODELS/llama-8b-f16.json"
    cat "$MODELS/llama-8b-f16.json"
    if [ ! -f "$MODELS/llama-8b-hf/config.json" ]; then
        setsid python3 tools/random_hf_llama.py "$MODELS/llama-8b-hf" 8b > /tmp/hf-model.log 2>&1 < /dev/null &
        info "HF model being written in the background (log /tmp/hf-model.log)"
    fi
}

bench() {  # bench NAME PORT KEYFILE MODEL
    PYTHONUNBUFFERED=1 python3 -m bundler.cli bench --url "http://127.0.0.1:$2/v1" --model "$4" \
        --api-key-file "$3" $BENCH --label "$1" --json "$OUT/$1.json" 2>&1 | tail -n 8
}

gguf() {
    sh "$B/install.sh" --prefix /tmp/pfx --model-facts "$MODELS/llama-8b-f16.json" --json > "$OUT/install-gguf.json"
    cp /tmp/pfx/current/plan.json "$OUT/plan-gguf.json"
    bench llama-planned 8080 /tmp/pfx/etc/gpu-box.env llama-8b-synthetic
    grep -E "offloaded|CUDA0 (model|KV|compute) buffer|n_ctx_seq|n_slots" /tmp/pfx/log/gpu-box.log | head -20 > "$OUT/llama-buffers.txt" || true
    sh "$B/install.sh" --prefix /tmp/pfx --model-facts "$MODELS/llama-8b-f16.json" --concurrency 4 --no-smoke \
        --json > "$OUT/install-gguf-np4.json"
    bench llama-np4 8080 /tmp/pfx/etc/gpu-box.env llama-8b-synthetic
    /tmp/pfx/current/bin/ctl stop
}

vllm() {
    while [ ! -f "$MODELS/llama-8b-hf/tokenizer_config.json" ]; do sleep 2; done
    sh "$B/install.sh" --prefix /tmp/pfx-vllm --port 8081 --model "$MODELS/llama-8b-hf" \
        --model-name llama-8b-hf --json > "$OUT/install-vllm.json" || { tail -n 60 /tmp/pfx-vllm/log/gpu-box.log; exit 1; }
    cp /tmp/pfx-vllm/current/plan.json "$OUT/plan-vllm.json"
    grep -iE "KV cache|Maximum concurrency|loading took|weights took" /tmp/pfx-vllm/log/gpu-box.log | head -12 > "$OUT/vllm-kv.txt" || true
    bench vllm-planned 8081 /tmp/pfx-vllm/etc/gpu-box.env llama-8b-hf
    /tmp/pfx-vllm/current/bin/ctl stop
}

hfmodel() {
    mkdir -p "$MODELS"
    [ -f "$MODELS/llama-8b-hf/tokenizer_config.json" ] || python3 tools/random_hf_llama.py "$MODELS/llama-8b-hf" 8b
}

vllm_tp2() {
    hfmodel
    sh "$B/install.sh" --prefix /tmp/pfx-tp2 --port 8082 --model "$MODELS/llama-8b-hf" --model-name llama-8b-hf \
        --tensor-parallel 2 --data-parallel 1 --json > "$OUT/install-vllm-tp2.json" \
        || { tail -n 80 /tmp/pfx-tp2/log/gpu-box.log; exit 1; }
    cp /tmp/pfx-tp2/current/plan.json "$OUT/plan-vllm-tp2.json"
    bench vllm-tp2 8082 /tmp/pfx-tp2/etc/gpu-box.env llama-8b-hf
    /tmp/pfx-tp2/current/bin/ctl stop
}

"$@"
