"""Model facts read on the bundling side and stored in the manifest, so the box
needs no parser. GGUF headers are read with the `gguf` package."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BundlerError


@dataclass(frozen=True)
class ModelInfo:
    """What the planner needs to know of a model (stored in the bundle's manifest)."""

    format: str
    architecture: str
    file_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim_k: int
    head_dim_v: int
    context_length: int
    sliding_window: int = 0
    experts: int = 0
    has_chat_template: bool = False

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        """Upper bound: every layer keeps full-context K and V (f16 by default)."""
        return self.layers * self.kv_heads * (self.head_dim_k + self.head_dim_v) * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    if isinstance(value, list):
        value = max(value) if value and isinstance(value[0], (int, float)) else value
    return value


def inspect_gguf(path: Path) -> ModelInfo:
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover
        raise BundlerError("the gguf package is missing", hint="pip install -e '.[bundle]'")
    try:
        r = GGUFReader(str(path))
    except Exception as e:  # the reader raises plain ValueErrors on bad files
        raise BundlerError(f"{path}: not a readable GGUF file ({e})", hint="check the file and its sha256")
    arch = _field(r, "general.architecture")
    if not arch:
        raise BundlerError(f"{path}: GGUF without general.architecture", hint="re-convert the model")
    layers = int(_field(r, f"{arch}.block_count", 0))
    heads = int(_field(r, f"{arch}.attention.head_count", 0))
    kv_heads = int(_field(r, f"{arch}.attention.head_count_kv", heads) or heads)
    emb = int(_field(r, f"{arch}.embedding_length", 0))
    hd = emb // heads if heads else 0
    return ModelInfo(
        format="gguf",
        architecture=str(arch),
        file_size=path.stat().st_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim_k=int(_field(r, f"{arch}.attention.key_length", hd) or hd),
        head_dim_v=int(_field(r, f"{arch}.attention.value_length", hd) or hd),
        context_length=int(_field(r, f"{arch}.context_length", 0)),
        sliding_window=int(_field(r, f"{arch}.attention.sliding_window", 0) or 0),
        experts=int(_field(r, f"{arch}.expert_count", 0) or 0),
        has_chat_template="tokenizer.chat_template" in r.fields,
    )


# llama.cpp's built-in chat templates for GGUF files that carry none
# (names from `llama-server --help`, --chat-template).
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama3",
                     "qwen2": "chatml", "qwen3": "chatml", "phi3": "phi3", "mistral": "mistral-v7"}


def fallback_template(info: ModelInfo) -> str:
    """The built-in template to use when the GGUF has none ("" when it has one or none is known)."""
    if info.has_chat_template:
        return ""
    return BUILTIN_TEMPLATES.get(info.architecture, "")
