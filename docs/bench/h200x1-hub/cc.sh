#!/bin/sh
# The C compiler Triton uses for the launcher it builds at the first use of each kernel
# (Zig clang, from the bundle, with the bundle's Python headers).
exec /opt/airgap-llm/engines/vllm-0.26.0-bbfa0ebb9c100393/site/ziglang/zig cc -I/opt/airgap-llm/gpu-hub/releases/8efc4028500f/include/python3.12 -I/opt/airgap-llm/gpu-hub/releases/8efc4028500f/include "$@"
