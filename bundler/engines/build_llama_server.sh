#!/bin/sh
# Build llama-server from the llama.cpp sources vendored in a llama-cpp-python sdist.
# usage: build_llama_server.sh SDIST OUTDIR BACKEND(cpu|cuda) [CUDA_ARCHS] [JOBS] [CUBLAS_ROOT] [CMAKE_ARGS]
#   CUBLAS_ROOT: a directory with include/cublas_v2.h and lib/libcublas.so* (from the
#   nvidia-cublas wheel) when the CUDA toolkit here has no cuBLAS.
#   CMAKE_ARGS: more -D options (space-separated), e.g. -DGGML_CUDA_NO_VMM=ON.
# Writes OUTDIR/bin/llama-server with its shared libraries beside it ($ORIGIN run path: runs from
# any directory). The CPU side is built once per x86 instruction-set level (GGML_CPU_ALL_VARIANTS:
# SSE4.2, AVX, AVX2+FMA, AVX-512, AVX-VNNI, AMX, ...) as libggml-cpu-VARIANT.so, and ggml loads the
# best one this CPU runs at start, as llama.cpp's own release builds do. Called by
# bundler/engines/llama_cpp.py, which caches OUTDIR by a key over every input,
# this script included. Never run on the offline box.
set -eu

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
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$work/build" $gen \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=OFF \
        -DGGML_BACKEND_DL=ON \
        -DGGML_CPU_ALL_VARIANTS=ON \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
        -DCMAKE_INSTALL_RPATH='$ORIGIN' \
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
        $extra $more
    # the CPU variants are loaded at run time, not linked: name them as targets too
    backends=$(cmake --build "$work/build" --target help | sed -n 's/^\([a-z0-9_.-]*ggml-cpu[a-z0-9_.-]*\):.*/\1/p; s/^\.\.\. \([a-z0-9_.-]*ggml-cpu[a-z0-9_.-]*\).*/\1/p' | sort -u)
    # shellcheck disable=SC2086
    cmake --build "$work/build" --target llama-server $backends -j "$jobs"
    mkdir -p "$out/bin"
    for lib in "$work"/build/bin/lib*.so*; do
        cp -P "$lib" "$out/bin/"
    done
    for f in "$out"/bin/*.so*; do
        [ -L "$f" ] || strip --strip-unneeded "$f" 2>/dev/null || true
    done
    cp "$work/build/bin/llama-server" "$out/bin/llama-server.tmp"
    strip "$out/bin/llama-server.tmp" 2>/dev/null || true
    mv "$out/bin/llama-server.tmp" "$out/bin/llama-server"
}

main "$@"
