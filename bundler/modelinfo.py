"""Model facts read on the bundling side and stored in the manifest, so the box
needs no parser. GGUF headers are read with the `gguf` package."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BundlerError


# llama.cpp's split GGUF names (gguf-split): NAME-00001-of-00003.gguf
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_names(first: str) -> list[str]:
    """The other parts' names of a split GGUF whose first part is `first` ([] if it is not one)."""
    m = SPLIT_RE.match(first)
    if not m or int(m["no"]) != 1:
        return []
    n = int(m["count"])
    return [f"{m['stem']}-{i:05d}-of-{n:05d}.gguf" for i in range(2, n + 1)]


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
    vocab_size: int = 0
    bits: float = 0.0  # EXL2 bits per weight; 0 when not quantized that way
    dtype: str = ""  # safetensors torch_dtype, or the dominant GGUF tensor type
    tensor_types: tuple[tuple[str, int], ...] = ()  # GGUF: (type, count), most common first
    quantization: str = ""  # safetensors: quantization_config.quant_method (awq, gptq, fp8, compressed-tensors, ...)
    group_size: int = 0  # AWQ/GPTQ group size
    pooling: str = ""  # GGUF: the pooling an embedding model declares (mean, cls, last, rank); "" when none

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        """Upper bound: every layer keeps full-context K and V (f16 by default)."""
        return self.layers * self.kv_heads * (self.head_dim_k + self.head_dim_v) * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensor_types"] = [list(t) for t in self.tensor_types]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["tensor_types"] = tuple(tuple(t) for t in d.get("tensor_types", ()))
        return cls(**d)


POOLING = {1: "mean", 2: "cls", 3: "last", 4: "rank"}  # llama.cpp's enum llama_pooling_type (0: none)


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover
        raise BundlerError("the gguf package is missing", hint="pip install -e '.[bundle]'")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises plain ValueErrors on bad files
        raise BundlerError(f"{path}: not a readable GGUF file ({e})", hint="check the file and its sha256")


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    if isinstance(value, list):
        value = max(value) if value and isinstance(value[0], (int, float)) else value
    return value


def inspect_gguf(path: Path) -> ModelInfo:
    """A GGUF file's facts; for the first part of a split GGUF, the whole model's (its other parts
    must lie beside it, as llama-server loads them)."""

    others = [path.with_name(n) for n in split_names(path.name)]
    missing = [p.name for p in others if not p.is_file()]
    if missing:
        raise BundlerError(f"{path} is the first part of a split GGUF, and {', '.join(missing)} is not beside it",
                           hint="put every part in the same directory")
    readers = [_reader(p) for p in [path, *others]]  # the metadata is in the first part only
    r = readers[0]
    arch = _field(r, "general.architecture")
    if not arch:
        raise BundlerError(f"{path}: GGUF without general.architecture", hint="re-convert the model")
    counts: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for t in (t for rd in readers for t in rd.tensors):
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        nbytes[t.tensor_type.name] = nbytes.get(t.tensor_type.name, 0) + int(t.n_bytes)
    types = sorted(counts.items(), key=lambda kv: -nbytes[kv[0]])  # by bytes: the quant that dominates
    layers = int(_field(r, f"{arch}.block_count", 0))
    heads = int(_field(r, f"{arch}.attention.head_count", 0))
    kv_heads = int(_field(r, f"{arch}.attention.head_count_kv", heads) or heads)
    emb = int(_field(r, f"{arch}.embedding_length", 0))
    hd = emb // heads if heads else 0
    return ModelInfo(
        format="gguf",
        architecture=str(arch),
        file_size=sum(p.stat().st_size for p in [path, *others]),
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim_k=int(_field(r, f"{arch}.attention.key_length", hd) or hd),
        head_dim_v=int(_field(r, f"{arch}.attention.value_length", hd) or hd),
        context_length=int(_field(r, f"{arch}.context_length", 0)),
        sliding_window=int(_field(r, f"{arch}.attention.sliding_window", 0) or 0),
        experts=int(_field(r, f"{arch}.expert_count", 0) or 0),
        has_chat_template="tokenizer.chat_template" in r.fields,
        pooling=POOLING.get(int(_field(r, f"{arch}.pooling_type", 0) or 0), ""),
        vocab_size=int(_field(r, f"{arch}.vocab_size", 0) or len(r.fields["tokenizer.ggml.tokens"].data)
                       if "tokenizer.ggml.tokens" in r.fields else 0),
        dtype=types[0][0] if types else "",
        tensor_types=tuple(types),
    )


def inspect_hf(path: Path) -> ModelInfo:
    """An HF model directory: config.json plus safetensors sizes (or the index's total_size,
    so a directory holding only config.json and model.safetensors.index.json can be planned)."""
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise BundlerError(f"{path}: no config.json", hint="point at a Hugging Face model directory")
    except ValueError as e:
        raise BundlerError(f"{cfg_path}: not valid JSON ({e})", hint="copy the file again")
    text = cfg.get("text_config", cfg)  # multimodal configs nest the language model
    heads = int(text.get("num_attention_heads", 0))
    if not heads or "num_hidden_layers" not in text:
        raise BundlerError(f"{cfg_path}: lacks num_hidden_layers/num_attention_heads",
                           hint="is this a transformer language model's config.json?")
    hidden = int(text.get("hidden_size", 0))
    head_dim = int(text.get("head_dim") or (hidden // heads))
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    index = path / "model.safetensors.index.json"
    if not size and index.is_file():
        size = int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0))
    if not size:
        raise BundlerError(f"{path}: no *.safetensors files and no model.safetensors.index.json total_size",
                           hint="the directory must hold the weights or their index")
    q = cfg.get("quantization_config") or {}
    fmt, bits = "safetensors", 0.0
    method = str(q.get("quant_method") or "").lower()
    if method in ("exl2", "exl3") or "bits" in q and "exl2" in str(q).lower():
        fmt, bits = (method or "exl2"), float(q.get("bits", 0))
    elif method:
        bits = float(q.get("bits") or q.get("w_bit") or (8 if method == "fp8" else 0))
    return ModelInfo(
        format=fmt,
        architecture=(cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        file_size=size,
        layers=int(text["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        context_length=int(text.get("max_position_embeddings", 0)),
        sliding_window=int(text.get("sliding_window") or 0),
        experts=int(text.get("num_local_experts") or text.get("num_experts") or 0),
        has_chat_template=(path / "chat_template.jinja").is_file() or (path / "tokenizer_config.json").is_file()
        and "chat_template" in (path / "tokenizer_config.json").read_text(),
        vocab_size=int(text.get("vocab_size", 0)),
        bits=bits,
        dtype=str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype") or ""),
        quantization="" if fmt in ("exl2", "exl3") else method,
        group_size=int(q.get("group_size") or q.get("q_group_size") or 0),
    )


def inspect(path: Path) -> ModelInfo:
    """A GGUF file, an HF/EXL2 model directory, or a JSON file as `bundler inspect` prints."""
    path = Path(path)
    if not path.exists():
        raise BundlerError(f"{path}: no such model file or directory", hint="check the path")
    if path.is_dir():
        return inspect_hf(path)
    if path.suffix == ".json":
        try:
            return ModelInfo.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise BundlerError(f"{path}: not a model description ({e})",
                               hint="write it with `bundler inspect MODEL > FILE.json`")
    return inspect_gguf(path)


# llama.cpp's built-in chat templates for GGUF files that carry none
# (names from `llama-server --help`, --chat-template).
BUILTIN_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama3",
                     "qwen2": "chatml", "qwen3": "chatml", "phi3": "phi3", "mistral": "mistral-v7"}


def fallback_template(info: ModelInfo) -> str:
    """The built-in template to use when the GGUF has none ("" when it has one or none is known)."""
    if info.has_chat_template:
        return ""
    return BUILTIN_TEMPLATES.get(info.architecture, "")
