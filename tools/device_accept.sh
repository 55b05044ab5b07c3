#!/bin/sh
# GPU acceptance runs on the device box (docs/BENCHMARKS.md). Phases, one per call:
#   sh tools/device_accept.sh receive          copy this call's carried bundle files into /tmp/b
#   sh tools/device_accept.sh models           make the random-weight models (GGUF now, HF in the background)
#   sh tools/device_accept.sh gguf             install the bundle (CUDA llama-server as planned) and bench it,
#                                              then the -np 4 default-like baseline
#   sh tools/device_accept.sh vllm             install the HF model with vLLM as planned and bench it
#   sh tools/device_accept.sh vllm_tp2         the alternative: tensor parallel 2 (no data parallel)
# Issue #14: receive the bundles of docs/device/gpu-box-exl2.toml and gpu-box-exl3.toml (PART_SIZE=28M),
# then `exl2`, `exl3` (it installs after exl2 ends) and `wait_for /tmp/exl2 N`, `wait_for /tmp/exl3 N`.
# Issue #6, 4 GPUs (the vLLM-only bundle of docs/device/gpu-box-vllm.toml):
#   sh tools/device_accept.sh start4           probe the box; write the 8B and 70B models in the background
#   sh tools/device_accept.sh serve4 LABEL MODEL [install.sh options]
#                                              install (upgrade) the service for MODEL (8b or 70b) with those
#                                              options, bench it at 1/50/200, keep plan, log and figures
#   sh tools/device_accept.sh alt70            the 70B alternative to the planner's choice (TP 4 ↔ TP 2 × DP 2)
#   sh tools/device_accept.sh pack             everything measured so far → $OUT/res.tgz
# Results land in $OUT. The box has no network; nothing here needs one.
set -eu

B=/tmp/b/gpu-box
MODELS=/tmp/models
BENCH="--concurrency 1,50 --prompt-tokens 400 --max-tokens 512"

info() { printf '[device] %s\n' "$*" >&2; }

receive() {
    mkdir -p /tmp/b
    for d in .carry/*/; do [ -d "$d" ] && cp -a "$d"/. /tmp/b/ && rm -rf "$d"; done
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
    cp /tmp/pfx/gpu-box/current/plan.json "$OUT/plan-gguf.json"
    bench llama-planned 8080 /tmp/pfx/etc/gpu-box.env llama-8b-synthetic
    grep -E "offloaded|CUDA0 (model|KV|compute) buffer|n_ctx_seq|n_slots" /tmp/pfx/gpu-box/log/gpu-box.log | head -20 > "$OUT/llama-buffers.txt" || true
    sh "$B/install.sh" --prefix /tmp/pfx --model-facts "$MODELS/llama-8b-f16.json" --concurrency 4 --no-smoke \
        --json > "$OUT/install-gguf-np4.json"
    bench llama-np4 8080 /tmp/pfx/etc/gpu-box.env llama-8b-synthetic
    /tmp/pfx/gpu-box/current/bin/ctl stop
}

vllm() {
    while [ ! -f "$MODELS/llama-8b-hf/tokenizer_config.json" ]; do sleep 2; done
    sh "$B/install.sh" --prefix /tmp/pfx-vllm --port 8081 --model "$MODELS/llama-8b-hf" \
        --model-name llama-8b-hf --json > "$OUT/install-vllm.json" || { tail -n 60 /tmp/pfx-vllm/gpu-box/log/gpu-box.log; exit 1; }
    cp /tmp/pfx-vllm/gpu-box/current/plan.json "$OUT/plan-vllm.json"
    grep -iE "KV cache|Maximum concurrency|loading took|weights took" /tmp/pfx-vllm/gpu-box/log/gpu-box.log | head -12 > "$OUT/vllm-kv.txt" || true
    bench vllm-planned 8081 /tmp/pfx-vllm/etc/gpu-box.env llama-8b-hf
    /tmp/pfx-vllm/gpu-box/current/bin/ctl stop
}

hfmodel() {
    mkdir -p "$MODELS"
    [ -f "$MODELS/llama-8b-hf/tokenizer_config.json" ] || python3 tools/random_hf_llama.py "$MODELS/llama-8b-hf" 8b
}

vllm_tp2() {
    hfmodel
    sh "$B/install.sh" --prefix /tmp/pfx-tp2 --port 8082 --model "$MODELS/llama-8b-hf" --model-name llama-8b-hf \
        --tensor-parallel 2 --data-parallel 1 --json > "$OUT/install-vllm-tp2.json" \
        || { tail -n 80 /tmp/pfx-tp2/gpu-box/log/gpu-box.log; exit 1; }
    cp /tmp/pfx-tp2/gpu-box/current/plan.json "$OUT/plan-vllm-tp2.json"
    bench vllm-tp2 8082 /tmp/pfx-tp2/etc/gpu-box.env llama-8b-hf
    /tmp/pfx-tp2/gpu-box/current/bin/ctl stop
}

RES=/tmp/res
P4=/tmp/pfx4

start4() {
    mkdir -p "$RES"
    nvidia-smi > "$RES/nvidia-smi.txt" 2>&1 || true
    nvidia-smi topo -m > "$RES/nvidia-smi-topo.txt" 2>&1 || true
    python3 -m bundler.cli probe --prefix /tmp > "$RES/probe.json"
    df -h /dev/shm /tmp > "$RES/df.txt" 2>&1 || true
    shm_gib=$(df -k --output=avail /dev/shm 2>/dev/null | tail -n 1 | awk '{print int($1 / 1048576)}')
    if [ "${shm_gib:-0}" -ge 170 ]; then mkdir -p /dev/shm/models && ln -sfn /dev/shm/models "$MODELS"; else mkdir -p "$MODELS"; fi
    info "models go to $(readlink -f "$MODELS") (/dev/shm has ${shm_gib:-0} GiB free)"
    rm -rf /tmp/gen && mkdir -p /tmp/gen && cp -a tools bundler /tmp/gen/  # the tree here is replaced by each call
    setsid sh -c "cd /tmp/gen && python3 tools/random_hf_llama.py $MODELS/llama-8b-hf 8b && \
        python3 tools/random_hf_llama.py $MODELS/llama-70b-hf 70b --jobs 32" > "$RES/models.log" 2>&1 < /dev/null &
    info "models being written in the background ($RES/models.log)"
}

serve4() {  # serve4 LABEL 8b|70b [install.sh options]
    label=$1 size=$2
    shift 2
    dir="$MODELS/llama-$size-hf"
    while [ ! -f "$dir/tokenizer_config.json" ]; do sleep 2; done
    while pgrep -f random_hf_llama > /dev/null; do sleep 2; done  # no model writing beside a bench
    for c in 50 200; do
        [ -f "$RES/plan-$size-c$c.json" ] || python3 -m bundler.cli plan --model "$dir" --box "$RES/probe.json" \
            --concurrency "$c" --json > "$RES/plan-$size-c$c.json" || true
    done
    log=$P4/gpu-box/log/gpu-box.log
    from=$( [ -f "$log" ] && wc -c < "$log" || echo 0)
    t0=$(date +%s)
    rc=0
    sh "$B/install.sh" --prefix "$P4" --trust /tmp/b/signing-key.pub --model "$dir" --model-name "llama-$size" \
        --concurrency 200 --json "$@" > "$RES/$label-install.json" 2> "$RES/$label-install.err" || rc=$?
    echo "{\"label\": \"$label\", \"install_rc\": $rc, \"install_s\": $(( $(date +%s) - t0 ))}" > "$RES/$label-time.json"
    tail -c +$((from + 1)) "$log" > "$RES/$label.log" 2>/dev/null || true
    tail -n 6 "$RES/$label-install.err" >&2
    [ "$rc" = 0 ] || { grep -E "Error|error|failed" "$RES/$label.log" | tail -n 15 >&2; return 1; }
    cp "$P4/gpu-box/current/plan.json" "$RES/$label-plan.json"
    PYTHONUNBUFFERED=1 python3 -m bundler.cli bench --url http://127.0.0.1:8080/v1 --model "llama-$size" \
        --api-key-file "$P4/etc/gpu-box.env" --concurrency 1,50,200 --min-requests 2 --prompt-tokens 400 \
        --max-tokens 512 --label "$label" --json "$RES/$label.json" 2>&1 | tail -n 6
    grep -iE "KV cache|Maximum concurrency|loading took|weights took|torch.compile|graph capturing|autotun|warm" \
        "$RES/$label.log" | head -40 > "$RES/$label-kv.txt" || true
}

alt70() {  # the 70B alternative to what the planner chose: TP 4 ↔ TP 2 × DP 2
    tp=$(python3 -c "import json; print(json.load(open('$RES/70b-planned-plan.json'))['tensor_parallel'])")
    if [ "$tp" = 4 ]; then serve4 70b-tp2-dp2 70b --tensor-parallel 2 --data-parallel 2
    else serve4 70b-tp4 70b --tensor-parallel 4 --data-parallel 1; fi
}

llama_gpu() {  # issues #12 and #16: the CUDA llama-server bundle alone (docs/device/gpu-box-llama.toml) on an
    # 8B F16 GGUF, the README's root install with the bundle's defaults, --bench --baseline at 1, 4 and 50
    # (the plan against `llama-server -m MODEL` on the same port), and the CPU level its log names
    mkdir -p "$MODELS"
    [ -f "$MODELS/llama-8b-f16.gguf" ] || python3 tools/synthetic_gguf.py .carry/gguf-tools/gguf-py \
        .carry/gguf-tools/ggml-vocab-llama-bpe.gguf "$MODELS/llama-8b-f16.gguf" 8b
    PYTHONPATH=.carry/gguf-tools/gguf-py python3 -m bundler.cli inspect "$MODELS/llama-8b-f16.gguf" \
        > "$MODELS/llama-8b-f16.json"
    sh /tmp/b/gpu-box-llama/install.sh --trust /tmp/b/signing-key.pub --model-facts "$MODELS/llama-8b-f16.json" \
        --smoke-any-answer --bench --baseline --bench-levels 1,4,50 --json > "$OUT/llama-gpu.json" \
        2> "$OUT/llama-gpu.log" || { tail -n 30 "$OUT/llama-gpu.log"; tail -n 40 /opt/airgap-llm/gpu-box-llama/log/*.log; exit 1; }
    tr '\r' '\n' < "$OUT/llama-gpu.log" | grep -vE "waiting for the engine|concurrency [0-9]+:" | tail -n 25
    grep -E "system_info|CPU :|offloaded|n_slots|kv_unified" /opt/airgap-llm/gpu-box-llama/log/*.log | head -8 \
        | tee "$OUT/llama-gpu-engine.txt"
    /opt/airgap-llm/gpu-box-llama/current/bin/ctl stop
}

tune7b() {  # issue #12, one GPU, in the background (poll with `wait_for /tmp/tune7b SECONDS`): the README's root
    # install of the bundle as it is (its target load), with --tune: the plan, `vllm serve MODEL` and the
    # alternatives, each benched at 1, 50 and 200 concurrent requests; a Qwen2-7B shape (4 KV heads)
    mkdir -p "$MODELS" /tmp/tune7b
    setsid sh -c '
        [ -f /tmp/models/q7/config.json ] || python3 tools/random_hf_llama.py /tmp/models/q7 7b-kv4 --vocab 152064 \
            > /tmp/tune7b/model.log 2>&1
        sh /tmp/b/gpu-box/install.sh --trust /tmp/b/signing-key.pub --model /tmp/models/q7 --model-name qwen7b-shape \
            --smoke-any-answer --tune --tune-budget 15m --bench-levels 1,50,200 --json \
            > /tmp/tune7b/install.json 2> /tmp/tune7b/install.log
        echo $? > /tmp/tune7b/rc' < /dev/null > /dev/null 2>&1 &
    info "tune7b started in the background"
}

wait_for() {  # wait_for DIR SECONDS: until DIR/rc appears (or SECONDS pass); then DIR's files go to $OUT
    i=0
    while [ ! -f "$1/rc" ] && [ "$i" -lt "$2" ]; do sleep 5; i=$((i + 5)); done
    tr '\r' '\n' < "$1/install.log" | grep -vE "waiting for the engine|concurrency [0-9]+:" | tail -n 40
    tar czf "$OUT/$(basename "$1").tgz" -C "$1" . 2>/dev/null || true
    [ -f "$1/rc" ] && info "exit status $(cat "$1/rc")" || info "still running after ${2}s"
}

routes() {  # vLLM from the bundle, a tiny random model: every route without the key → 401 (issue #11)
    mkdir -p "$MODELS" "$OUT"
    [ -f "$MODELS/tiny-hf/config.json" ] || python3 tools/random_hf_llama.py "$MODELS/tiny-hf" tiny > /dev/null
    t0=$(date +%s)
    sh "$B/install.sh" --prefix /tmp/pfx-r --trust /tmp/b/signing-key.pub --model "$MODELS/tiny-hf" \
        --model-name tiny --concurrency 8 --context 1024 --json > "$OUT/install-routes.json" 2> "$OUT/install-routes.log" \
        || { tail -n 40 "$OUT/install-routes.log"; tail -n 60 /tmp/pfx-r/gpu-box/log/gpu-box.log; exit 1; }
    info "installed and answering after $(( $(date +%s) - t0 ))s"
    grep -E "unpacked|wheels in|healthy after|first answer" "$OUT/install-routes.log" >&2 || true
    python3 tools/dev/route_sweep.py /tmp/pfx-r/etc/gpu-box.env http://127.0.0.1:8080 "$OUT/routes.json"
    /tmp/pfx-r/gpu-box/current/bin/ctl stop
}

HIDE_DIRS="/opt/gcc /usr/local/cuda /usr/local/cuda-13 /usr/local/cuda-13.0 /usr/include/python3.12 \
/usr/include/x86_64-linux-gnu/python3.12"

bare() {  # bare CMD…: CMD in a mount namespace where every C compiler, nvcc, the CUDA toolkit and the
    # Python headers are hidden (issue #15): the box most intranet GPU servers are
    unshare -m sh -c '
        for d in '"$HIDE_DIRS"'; do [ -e "$d" ] && mount -t tmpfs -o ro,size=1m none "$d"; done
        for f in /usr/bin/cc /usr/bin/c++ /usr/bin/gcc* /usr/bin/g++* /usr/bin/c89-gcc /usr/bin/c99-gcc \
                 /usr/bin/clang* /usr/bin/x86_64-linux-gnu-gcc* /usr/bin/x86_64-linux-gnu-g++* /usr/bin/mpicc \
                 /usr/bin/tcc /usr/local/bin/nvcc; do
            [ -e "$f" ] && mount --bind /dev/null "$f"
        done
        exec "$@"' sh "$@"
}

TRITON_KERNEL='
import torch, triton, triton.language as tl
@triton.jit
def add_one(x, n: tl.constexpr):
    i = tl.arange(0, n)
    tl.store(x + i, tl.load(x + i) + 1)
t = torch.zeros(16, device="cuda")
add_one[(1,)](t, 16)
print("triton kernel ran:", t.sum().item())'

unzst() {  # the models' stream (tar | zstd --long=28, split for the transfer) into /tmp/b
    cat /tmp/b/zst/models.tar.zst.* | zstd -d --long=28 | tar x -C /tmp/b
    rm -rf /tmp/b/zst
    info "bundle here: $(find /tmp/b/gpu-hub -type f | wc -l) files, $(du -sh /tmp/b/gpu-hub | cut -f1)"
}

hub() {  # issues #13 and #15, in the background (poll with `wait_for /tmp/hub SECONDS`): on the bare box,
    # first a Triton kernel as the box has it (no compiler, no headers), then the README's root install
    # of docs/device/gpu-box-hub.toml with the bundle's defaults, two models (chat + embedding), benched
    # against `vllm serve MODEL`; then the same Triton kernel with the release's compiler
    mkdir -p /tmp/hub
    export HIDE_DIRS TRITON_KERNEL
    setsid sh -c '
        DEVICE_ACCEPT_LIB=1 . tools/device_accept.sh
        set +e
        bare sh -c "command -v gcc cc g++ clang nvcc; ls /usr/include/python3.12 | wc -l" > /tmp/hub/hidden.txt 2>&1
        printf "%s\n" "$TRITON_KERNEL" > /tmp/tk.py  # @triton.jit needs its source in a file
        rm -rf ~/.triton
        bare python3 /tmp/tk.py > /tmp/hub/triton-before.txt 2>&1
        bare sh /tmp/b/gpu-hub/install.sh --trust /tmp/b/signing-key.pub --smoke-any-answer --bench --baseline             --bench-levels 1,50,200 --json > /tmp/hub/install.json 2> /tmp/hub/install.log
        echo $? > /tmp/hub/install.rc
        cp /opt/airgap-llm/gpu-hub/current/plan*.json /tmp/hub/ 2>/dev/null
        cp /opt/airgap-llm/gpu-hub/current/bin/cc /tmp/hub/cc.sh 2>/dev/null
        rm -rf ~/.triton
        CC=/opt/airgap-llm/gpu-hub/current/bin/cc ZIG_GLOBAL_CACHE_DIR=/tmp/zc ZIG_LOCAL_CACHE_DIR=/tmp/zc \
            bare python3 /tmp/tk.py > /tmp/hub/triton-after.txt 2>&1
        grep -iE "error|Triton|flashinfer|nvcc|compil" /opt/airgap-llm/gpu-hub/log/*.log | tail -40 > /tmp/hub/engine-notes.txt
        tail -n 150 /opt/airgap-llm/gpu-hub/log/*.log > /tmp/hub/engine-tail.txt
        cat /tmp/hub/install.rc > /tmp/hub/rc' < /dev/null > /tmp/hub/driver.log 2>&1 &
    info "hub started in the background"
}

q7() {  # issue #12 on one H200, in the background (poll with `wait_for /tmp/q7 SECONDS`): the hub bundle's
    # defaults (target 50, its embedding model beside) serving a Qwen2-7B shape from the box, against
    # `vllm serve MODEL`, at 1, 50 and 200; on the box as it is (compilers there: FlashInfer's sampler)
    mkdir -p /tmp/q7
    setsid sh -c '
        [ -f /tmp/models/q7/config.json ] || python3 tools/random_hf_llama.py /tmp/models/q7 7b-kv4 --vocab 152064 \
            > /tmp/q7/model.log 2>&1
        sh /tmp/b/gpu-hub/install.sh --trust /tmp/b/signing-key.pub --model /tmp/models/q7 --model-name qwen7b-shape \
            --smoke-any-answer --bench --baseline --bench-levels 1,50,200 --json > /tmp/q7/install.json 2> /tmp/q7/install.log
        echo $? > /tmp/q7/rc' < /dev/null > /dev/null 2>&1 &
    info "q7 started in the background"
}

audit_gpu() {  # issue #15: the CUDA llama-server bundle (docs/device/gpu-box-llama.toml) installed, started,
    # smoke-tested and benched under `--audit-egress` (this box has no `ip`: the unshare(2) namespace);
    # BARE=1: inside `bare` too (no compiler, no CUDA toolkit, no Python headers)
    mkdir -p "$MODELS"
    [ -f "$MODELS/llama-1b-f16.gguf" ] || python3 tools/synthetic_gguf.py .carry/gguf-tools/gguf-py \
        .carry/gguf-tools/ggml-vocab-llama-bpe.gguf "$MODELS/llama-1b-f16.gguf" 1b
    PYTHONPATH=.carry/gguf-tools/gguf-py python3 -m bundler.cli inspect "$MODELS/llama-1b-f16.gguf" \
        > "$MODELS/llama-1b-f16.json"
    command -v ip || info "no ip command on this box"
    ${BARE:+bare} sh /tmp/b/gpu-box-llama/install.sh --trust /tmp/b/signing-key.pub --model "$MODELS/llama-1b-f16.gguf" \
        --model-facts "$MODELS/llama-1b-f16.json" --smoke-any-answer --audit-egress --bench-levels 1,4 \
        --bench-max-tokens 64 --json > "$OUT/audit-gpu.json" 2> "$OUT/audit-gpu.log"
    echo "exit $?"
    tr '\r' '\n' < "$OUT/audit-gpu.log" | grep -vE "waiting for the engine|concurrency [0-9]+:|B/s\]" | tail -n 25
}

exl2_ext() {  # issue #14: ExLlamaV2's extension, built on the connected side for this box's Python, torch and
    # GPU (bundler/engines/exl_ext_build.py), imported and run inside `bare`: nothing compiles on the box
    rm -rf /tmp/exlsite && mkdir -p /tmp/exlsite
    for w in .carry/exl/*.whl; do python3 -m zipfile -e "$w" /tmp/exlsite; done
    bare env PYTHONPATH=/tmp/exlsite python3 - <<'PY'
import torch, exllamav2_ext
x = torch.randn(8, 4096, dtype=torch.half, device="cuda")
w = torch.rand(4096, dtype=torch.half, device="cuda")
y = torch.empty_like(x)
exllamav2_ext.rms_norm(x, w, y, 1e-6)
ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
print("exllamav2_ext from", exllamav2_ext.__file__, "on", torch.cuda.get_device_name(0), "torch", torch.__version__,
      "rms_norm max abs err vs torch:", (y.float() - ref).abs().max().item())
try:
    from exllamav2 import ext
    print("exllamav2 imports, its extension:", ext.exllamav2_ext.__file__)
except Exception as e:
    print("exllamav2 package import:", type(e).__name__, e)
PY
}

exl2() {  # issue #14, in the background (poll with `wait_for /tmp/exl2 SECONDS`): a real tiny EXL2 model,
    # quantized here by the bundle's own exllamav2 with its prebuilt extension inside `bare` (no compiler
    # to fall back on), then the README's root install of docs/device/gpu-box-exl2.toml serving it through
    # TabbyAPI (key, 401 on every route, smoke, bench at 1 and 8), then tensor parallel 2 where there are 2 GPUs
    mkdir -p /tmp/exl2 "$MODELS"
    export HIDE_DIRS EXL_OPTS  # EXL_OPTS: install.sh's options beside the bench (default --baseline --audit-egress)
    setsid sh -c '
        DEVICE_ACCEPT_LIB=1 . tools/device_accept.sh
        set +e
        rm -rf /tmp/exlsite
        unwheel /tmp/b/exl2-hub/engines/exllamav2/wheels /tmp/exlsite
        t0=$(date +%s)
        python3 tools/random_hf_llama.py /tmp/models/exl2-src exl2-tiny --vocab 1024             --bpe /tmp/exlsite/exllamav2/conversion/standard_cal_data/c4.utf8 > /tmp/exl2/model.log 2>&1
        bare env PYTHONPATH=/tmp/exlsite python3 -m exllamav2.conversion.convert_exl2 -i /tmp/models/exl2-src             -o /tmp/models/exl2-work -cf /tmp/models/tiny-exl2 -b 4.0 -hb 6 >> /tmp/exl2/model.log 2>&1
        echo "model: rc $? in $(( $(date +%s) - t0 ))s" > /tmp/exl2/model.rc
        bare sh /tmp/b/exl2-hub/install.sh --trust /tmp/b/signing-key.pub --model /tmp/models/tiny-exl2             --model-name tiny-exl2 --smoke-any-answer --bench --bench-levels 1,8 ${EXL_OPTS---baseline --audit-egress} --json             > /tmp/exl2/install.json 2> /tmp/exl2/install.log
        echo $? > /tmp/exl2/install.rc
        cp /opt/airgap-llm/exl2-hub/current/plan.json /opt/airgap-llm/exl2-hub/current/tabbyapi-*.json /tmp/exl2/
        tail -n 120 /opt/airgap-llm/exl2-hub/log/*.log > /tmp/exl2/engine-tail.txt
        if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
            bare sh /tmp/b/exl2-hub/install.sh --trust /tmp/b/signing-key.pub --model /tmp/models/tiny-exl2                 --model-name tiny-exl2 --tensor-parallel 2 --smoke-any-answer --bench --bench-levels 1,8 --json                 > /tmp/exl2/install-tp2.json 2> /tmp/exl2/install-tp2.log
            echo $? > /tmp/exl2/install-tp2.rc
        fi
        cat /tmp/exl2/install.rc > /tmp/exl2/rc' < /dev/null > /tmp/exl2/driver.log 2>&1 &
    info "exl2 started in the background"
}

unwheel() {  # unwheel WHEELS_DIR SITE: every wheel of a bundle's engine (parts joined) unpacked into SITE
    mkdir -p "$2"
    j=$(mktemp /tmp/joined-XXXXXX.whl)  # its own: exl2 and exl3 unpack at the same time (a shared one gave a Bus error)
    for w in "$1"/*.whl "$1"/*.whl.part000; do
        case "$w" in *ziglang*|*'*'*) continue ;; *.part000) cat "${w%.part000}".part* > "$j"; w=$j ;; esac
        python3 -m zipfile -e "$w" "$2"
    done
    rm -f "$j"
}

EXL3_CAL='
import pathlib, sys
src, dest = pathlib.Path(sys.argv[1]).read_text(), pathlib.Path(sys.argv[2])
lines = [l for l in src.splitlines() if len(l) > 60]
for name in ("c4.utf8", "multilingual.utf8"):
    (dest / name).write_text("\n".join(lines))
for name in ("code.utf8", "technical.utf8"):
    (dest / name).write_text(src)
(dest / "wiki.utf8").write_text("".join(f"<doc id=\"{i}\">\n{l}\n</doc>\n" for i, l in enumerate(lines)))
(dest / "tiny.utf8").write_text("<|endoftext|>".join(lines))'

EXL3_CONVERT='
import sys
from exllamav3.conversion.convert_model import parser, prepare, main
args, state, ok, err = prepare(parser.parse_args())
if not ok:
    sys.exit(err)
main(args, state)'

exl3() {  # issue #14, in the background (poll with `wait_for /tmp/exl3 SECONDS`): a real tiny EXL3 model,
    # quantized here by the bundle's own exllamav3 with its prebuilt extension (exl3_convert; its PyPI wheel
    # lacks the calibration texts: made from exllamav2's c4.utf8, which the exl2 bundle carries), then the
    # README's root install of docs/device/gpu-box-exl3.toml (model box:/tmp/models/tiny-exl3) serving it
    # through TabbyAPI's main, after `exl2` has finished (key, 401 on every route, smoke, bench at 1 and 8,
    # TabbyAPI's defaults beside it, egress audit), then tensor parallel 2 where there are 2 GPUs
    mkdir -p /tmp/exl3 "$MODELS"
    export HIDE_DIRS EXL3_CAL EXL3_CONVERT
    setsid sh -c '
        DEVICE_ACCEPT_LIB=1 . tools/device_accept.sh
        set +e
        S=/tmp/exl3site
        rm -rf $S /tmp/models/exl3-work /tmp/models/tiny-exl3
        unwheel /tmp/b/exl3-box/engines/exllamav3/wheels $S
        C4=/tmp/exlsite/exllamav2/conversion/standard_cal_data/c4.utf8  # unpacked by exl2, started first
        i=0; while [ ! -s $C4 ] && [ $i -lt 120 ]; do sleep 2; i=$((i + 2)); done; sleep 2
        python3 -c "$EXL3_CAL" "$C4" $S/exllamav3/conversion/standard_cal_data
        t0=$(date +%s)
        python3 tools/random_hf_llama.py /tmp/models/exl3-src exl2-tiny --vocab 1024 --bpe "$C4" > /tmp/exl3/model.log 2>&1
        exl3_convert >> /tmp/exl3/model.log 2>&1
        echo "model: rc $? in $(( $(date +%s) - t0 ))s" > /tmp/exl3/model.rc
        i=0; while [ ! -f /tmp/exl2/rc ] && [ -d /tmp/exl2 ] && [ $i -lt 900 ]; do sleep 5; i=$((i + 5)); done
        bare sh /tmp/b/exl3-box/install.sh --trust /tmp/b/signing-key.pub --smoke-any-answer --bench \
            --bench-levels 1,8 --baseline --audit-egress --json > /tmp/exl3/install.json 2> /tmp/exl3/install.log
        echo $? > /tmp/exl3/install.rc
        cp /opt/airgap-llm/exl3-box/current/plan.json /opt/airgap-llm/exl3-box/current/tabbyapi-*.json /tmp/exl3/
        tail -n 150 /opt/airgap-llm/exl3-box/log/*.log > /tmp/exl3/engine-tail.txt
        if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
            bare sh /tmp/b/exl3-box/install.sh --trust /tmp/b/signing-key.pub --tensor-parallel 2 \
                --smoke-any-answer --bench --bench-levels 1,8 --json > /tmp/exl3/install-tp2.json 2> /tmp/exl3/install-tp2.log
            echo $? > /tmp/exl3/install-tp2.rc
        fi
        cat /tmp/exl3/install.rc > /tmp/exl3/rc' < /dev/null > /tmp/exl3/driver.log 2>&1 &
    info "exl3 started in the background"
}

exl_install() {  # exl_install exl2|exl3 [WAIT_DIR]: in the background, after WAIT_DIR/rc appears, the README's root
    # install on the bare box of the delta bundle (/tmp/b/d/NAME, made with the installer's probe fix) over
    # the bundle carried first (--base), serving its box: model: key, 401s, smoke, bench at 1 and 8 with
    # TabbyAPI's own defaults beside it, all under the egress audit
    g=$1 name=exl2-hub
    [ "$g" = exl3 ] && name=exl3-box
    rm -rf "/tmp/$g-d" && mkdir -p "/tmp/$g-d"
    export HIDE_DIRS
    setsid sh -c "
        DEVICE_ACCEPT_LIB=1 . tools/device_accept.sh
        i=0; while [ -n '${2:-}' ] && [ ! -f '${2:-}/rc' ] && [ \$i -lt 900 ]; do sleep 3; i=\$((i + 3)); done
        chmod -R a+rX /tmp/models  # the engine's account reads the models (the installer refuses otherwise)
        t0=\$(date +%s)
        bare sh /tmp/b/d/$name/install.sh --base /tmp/b/$name --trust /tmp/b/signing-key.pub --smoke-any-answer \
            --bench --bench-levels 1,8 --baseline --audit-egress --json > /tmp/$g-d/install.json 2> /tmp/$g-d/install.log
        echo \$? > /tmp/$g-d/install.rc
        echo \$(( \$(date +%s) - t0 )) > /tmp/$g-d/seconds
        tail -n 200 /opt/airgap-llm/$name/log/*.log > /tmp/$g-d/engine-tail.txt 2>/dev/null
        cp /tmp/$g-d/install.rc /tmp/$g-d/rc" < /dev/null > "/tmp/$g-d/driver.log" 2>&1 &
    info "$g install started in the background"
}

exl3_convert() {  # /tmp/models/exl3-src → /tmp/models/tiny-exl3 with the exllamav3 unpacked in /tmp/exl3site, on
    # the box as it is, not `bare`: the converter's Triton kernels (fla) compile their launchers with a C
    # compiler, which `bare` hides (a Bus error and then '/opt/gcc/bin/gcc' not found there; the install
    # itself still runs bare)
    rm -rf /tmp/models/exl3-work /tmp/models/tiny-exl3
    PYTHONPATH=/tmp/exl3site python3 -c "$EXL3_CONVERT" -i /tmp/models/exl3-src -w /tmp/models/exl3-work \
        -o /tmp/models/tiny-exl3 -b 4.0 -cr 16 -cc 512
}

exl3_model() {  # exl3_convert again, in the background: /tmp/exl3-model.log, then /tmp/exl3-model.rc
    export EXL3_CONVERT
    setsid sh -c 'DEVICE_ACCEPT_LIB=1 . tools/device_accept.sh; t0=$(date +%s); exl3_convert > /tmp/exl3-model.log 2>&1
        echo "model (not bare): rc $? in $(( $(date +%s) - t0 ))s" > /tmp/exl3-model.rc' < /dev/null > /dev/null 2>&1 &
}

exl2_direct() {  # issue #14 in one short call (a session with ~4 device minutes): the bundle's ExLlamaV2
    # wheels (.carry/exlq: exllamav2, its extension built here, TabbyAPI's dependencies) unpacked; a real
    # tiny EXL2 model quantized with them inside `bare`; TabbyAPI started by the release's own wrapper
    # (tabby_run) with the plan's config; asked without and with the key; benched at 1 and 8
    S=/tmp/exlsite
    rm -rf $S /tmp/models/exl2-work /tmp/models/tiny-exl2 && mkdir -p $S /tmp/models
    for w in .carry/exlq/*.whl; do python3 -m zipfile -e "$w" $S; done
    t0=$(date +%s)
    python3 tools/random_hf_llama.py /tmp/models/exl2-src exl2-tiny --vocab 1024 \
        --bpe $S/exllamav2/conversion/standard_cal_data/c4.utf8 > "$OUT/model.log" 2>&1
    bare env PYTHONPATH=$S python3 -m exllamav2.conversion.convert_exl2 -i /tmp/models/exl2-src \
        -o /tmp/models/exl2-work -cf /tmp/models/tiny-exl2 -b 4.0 -hb 6 -r 10 -mr 4 -l 512 -ml 512 \
        >> "$OUT/model.log" 2>&1 || { tail -n 30 "$OUT/model.log"; return 1; }
    info "EXL2 model made in $(( $(date +%s) - t0 ))s: $(du -sh /tmp/models/tiny-exl2 | cut -f1)"
    PYTHONPATH=. python3 - <<'PY'
import json, types
from pathlib import Path
from bundler.engines import exllama
from bundler.engines.exllama.build import read_archive
for rel, data in read_archive(exllama.V2.tabby_archive, exllama.V2.tabby_sha256, exllama.V2).items():
    p = Path("/tmp/tabbyapi") / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
plan = types.SimpleNamespace(engine="exllamav2", engine_defaults=False, context_per_slot=2048, slots=1,
                             tensor_parallel=1, gpu_split_gib=())
json.dump(exllama.tabby_config(plan, "/tmp/models/tiny-exl2", "tiny-exl2", "127.0.0.1", 18300),
          open("/tmp/tabby.json", "w"))
PY
    KEY="k-$(date +%s%N)"
    printf 'VLLM_API_KEY=%s\n' "$KEY" > /tmp/exl-key.env
    t1=$(date +%s)
    bare env PYTHONPATH="$S:$PWD" VLLM_API_KEY="$KEY" EXLLAMA_NO_FLASH_ATTN=1 AIRGAP_LLM_RUN_DIR=/tmp/tabrun \
        HF_HUB_OFFLINE=1 python3 -m bundler.engines.tabby_run /tmp/tabbyapi /tmp/tabby.json > "$OUT/tabby.log" 2>&1 &
    pid=$!
    KEY="$KEY" python3 - "$pid" <<'PY' | tee "$OUT/answers.txt"
import json, os, sys, time, urllib.error, urllib.request as u
base, key, pid = "http://127.0.0.1:18300", os.environ["KEY"], int(sys.argv[1])
def call(path, k=None, body=None):
    r = u.Request(base + path, data=json.dumps(body).encode() if body else None,
                  headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {k}"} if k else {})})
    try:
        with u.urlopen(r, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
t0 = time.monotonic()
while True:
    try:
        if call("/health")[0] == 200:
            break
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("TabbyAPI exited")
    if time.monotonic() - t0 > 100:
        sys.exit("not healthy after 100 s")
    time.sleep(0.5)
print(f"healthy {time.monotonic() - t0:.1f}s after the wait began")
print("GET /v1/models without the key:", call("/v1/models")[0])
print("POST /v1/chat/completions without the key:", call("/v1/chat/completions", None, {"messages": []})[0])
code, text = call("/v1/chat/completions", key, {"model": "tiny-exl2", "max_tokens": 16,
                                                  "messages": [{"role": "user", "content": "Say hello"}]})
print("with the key:", code, text[:400])
PY
    info "TabbyAPI up and asked in $(( $(date +%s) - t1 ))s"
    PYTHONUNBUFFERED=1 python3 -m bundler.cli bench --url http://127.0.0.1:18300/v1 --model tiny-exl2 \
        --api-key-file /tmp/exl-key.env --concurrency 1,8 --min-requests 2 --prompt-tokens 64 --max-tokens 64 \
        --label exl2-tiny --json "$OUT/bench.json" 2>&1 | tail -n 6
    kill "$pid"; sleep 1
    grep -E "compatibility|API key is|backend|Loading|loaded|Error|error" "$OUT/tabby.log" | head -20
}

vllm_audit() {  # issue #26, in the background (poll with `wait_for /tmp/va SECONDS`), after exl3 ends: the vLLM
    # bundle of docs/device/gpu-box-vllm.toml installed on the bare box under --audit-egress (VLLM_HOST_IP set,
    # so vLLM's get_ip() looks nothing up), a tiny random model, smoke, bench at 1 and 8
    rm -rf /tmp/va && mkdir -p /tmp/va "$MODELS"
    export HIDE_DIRS VA_WAIT VA_DELTA  # VA_DELTA=1: the delta bundle /tmp/b/d/gpu-box over /tmp/b/gpu-box
    setsid sh -c '
        DEVICE_ACCEPT_LIB=1 . tools/device_accept.sh
        set +e
        [ -f /tmp/models/tiny-hf/config.json ] || python3 tools/random_hf_llama.py /tmp/models/tiny-hf tiny \
            > /tmp/va/model.log 2>&1
        W=${VA_WAIT:-/tmp/exl3}
        i=0; while [ ! -f $W/rc ] && [ -d $W ] && [ $i -lt 1500 ]; do sleep 5; i=$((i + 5)); done
        t0=$(date +%s)
        bare sh /tmp/b/${VA_DELTA:+d/}gpu-box/install.sh ${VA_DELTA:+--base /tmp/b/gpu-box} --trust /tmp/b/signing-key.pub \
            --model /tmp/models/tiny-hf --model-name tiny --concurrency 8 --context 1024 --smoke-any-answer \
            --audit-egress --bench-levels 1,8 --bench-max-tokens 64 --json > /tmp/va/install.json 2> /tmp/va/install.log
        echo $? > /tmp/va/install.rc
        echo "{\"install_s\": $(( $(date +%s) - t0 ))}" > /tmp/va/time.json
        tail -n 150 /opt/airgap-llm/gpu-box/log/*.log > /tmp/va/engine-tail.txt 2>/dev/null
        cat /tmp/va/install.rc > /tmp/va/rc' < /dev/null > /tmp/va/driver.log 2>&1 &
    info "vllm_audit started in the background"
}

gpu10() {  # session 10, one GPU: the ExLlama bundles are here (vLLM's still travelling): start exl2 and exl3,
    # one after the other, in the background; `vllm_audit` starts once vLLM's bundle is here
    [ -f /tmp/b/key/signing-key.pub ] && cp /tmp/b/key/signing-key.pub /tmp/b/signing-key.pub
    nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
    for b in exl2-hub exl3-box; do
        info "$b: $(find /tmp/b/$b -type f | wc -l) files, $(du -sh /tmp/b/$b | cut -f1)"
    done
    exl2; exl3
}

collect() {  # what the background phases have written so far → $OUT (poll: collect SECONDS)
    i=0
    while [ "$i" -lt "$1" ] && { [ ! -f /tmp/va/rc ] || [ ! -f /tmp/exl3/rc ]; }; do sleep 5; i=$((i + 5)); done
    for d in exl2 exl3 va exl2-d exl3-d; do
        [ -d /tmp/$d ] || continue
        printf '== %s: model %s, install rc %s\n' "$d" "$(cat /tmp/$d/model.rc 2>/dev/null)" "$(cat /tmp/$d/rc 2>/dev/null || echo running)"
        tr '\r' '\n' < /tmp/$d/install.log 2>/dev/null | grep -vE "waiting for the engine|concurrency [0-9]+:|B/s\]" | tail -n 14
        tar czf "$OUT/$d.tgz" -C /tmp/$d . 2>/dev/null || true
    done
}

pack() {
    tar czf "$OUT/res.tgz" -C "$RES" .
    ls "$RES" | tr '\n' ' ' >&2
}

[ "${DEVICE_ACCEPT_LIB:-}" ] || "$@"
