#!/bin/sh
# On a box (e.g. the GPU machine through the device tool): which CPU level the plan picks for
# this CPU, and that binary serving a small GGUF. Writes probe/plan/log to OUT (default /tmp).
# usage: tools/cpu_level_check.sh DIR_WITH_llama-server-LEVEL_BINARIES MODEL.gguf
set -eu

main() {
    bins=$1 model=$2 out=${OUT:-/tmp}
    here=$(cd "$(dirname "$0")/.." && pwd)
    levels=$(cd "$bins" && ls llama-server-* | sed 's/^llama-server-//' | tr '\n' ' ')
    level=$(PYTHONPATH=$here python3 -c '
import json, sys
from pathlib import Path
from bundler import probe
from bundler.engines.llama_cpp import best_cpu_variant
hw = probe.probe(Path("/tmp"))
levels = tuple(sys.argv[1].split())
json.dump({"cpu_flags": hw.cpu_flags, "cpus": hw.cpus, "levels_carried": levels}, open(sys.argv[2], "w"))
print(best_cpu_variant(hw.cpu_flags, levels))' "$levels" "$out/probe.json")
    echo "plan: llama-server-$level of: $levels"
    grep -m1 "model name" /proc/cpuinfo
    "$bins/llama-server-$level" -m "$model" --host 127.0.0.1 --port 18555 -t 4 -np 2 -c 1024 >"$out/server.log" 2>&1 &
    pid=$!
    i=0
    until python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:18555/health", timeout=2)' 2>/dev/null; do
        i=$((i + 1)); [ $i -lt 120 ] || { tail -20 "$out/server.log"; kill $pid; exit 1; }; sleep 0.5
    done
    python3 -c 'import json, urllib.request as u; r = u.Request("http://127.0.0.1:18555/v1/completions", data=json.dumps({"prompt": "Hello", "max_tokens": 8}).encode(), headers={"Content-Type": "application/json"}); print("completion:", json.load(u.urlopen(r, timeout=60))["choices"][0]["text"][:40])'
    kill $pid
    grep -m1 "system_info" "$out/server.log" || true
}

main "$@"
