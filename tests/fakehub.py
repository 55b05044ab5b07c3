"""A local hub for tests: the HTTP endpoints huggingface_hub and our downloader use on Hugging
Face (model info with siblings and LFS metadata, resolve with a redirect to where the bytes are,
Range requests), and ModelScope's (revisions, the file tree with sha256, file downloads), over
repositories held in memory. Faults can be planted: a connection cut mid-file, wrong bytes.
It never reaches beyond loopback; it stands in for the hubs, which this machine cannot reach."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    lfs: set[str]  # paths stored with LFS (the hub gives their sha256)
    branches: dict[str, str] = field(default_factory=dict)  # branch or tag → commit

    @classmethod
    def from_dir(cls, path, commit: str) -> Repo:
        """A model directory as a repository on branch main: its weights stored with LFS."""
        from pathlib import Path

        files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}
        return cls(commit=commit, files=files, lfs={p for p in files if p.endswith((".safetensors", ".gguf"))},
                   branches={"main": commit})


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path → bytes sent before the first GET is cut
    corrupt: set[str] = field(default_factory=set)  # paths whose bytes are served wrong
    downloads: dict[str, int] = field(default_factory=dict)  # path → byte requests served
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def commit_of(self, repo: str, revision: str) -> str | None:
        r = self.repos.get(repo)
        if r is None:
            return None
        if revision == r.commit:
            return r.commit
        return r.branches.get(revision)

    def start(self) -> Hub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _json(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _bytes(self, path: str, data: bytes):
                if path in hub.corrupt:
                    data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                hub.downloads[path] = hub.downloads.get(path, 0) + 1
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = hub.cut_after.pop(path, None)
                if cut is not None:  # send part of it, then drop the connection
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                u = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(u.query))
                parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]
                # Hugging Face: /api/models/ORG/REPO/revision/REV
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                    return self._hf_info(f"{parts[2]}/{parts[3]}", parts[5])
                # ModelScope: /api/v1/models/ORG/REPO/...
                if parts[:3] == ["api", "v1", "models"] and len(parts) >= 5:
                    return self._ms(f"{parts[3]}/{parts[4]}", parts[5:], q)
                # Hugging Face: /ORG/REPO/resolve/REV/PATH → redirect to the bytes
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, path = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                    commit = hub.commit_of(repo, parts[3])
                    if commit is None or path not in hub.repos[repo].files:
                        return self._json({"error": "Entry not found"}, 404)
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{repo}/{commit}/{urllib.parse.quote(path)}")
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if parts[:1] == ["cdn"] and len(parts) >= 5:
                    repo, path = f"{parts[1]}/{parts[2]}", "/".join(parts[4:])
                    return self._bytes(path, hub.repos[repo].files[path])
                return self._json({"error": f"no route {u.path}"}, 404)

            def _hf_info(self, repo: str, revision: str):
                commit = hub.commit_of(repo, revision)
                if commit is None:
                    return self._json({"error": "Repository not found"}, 404)
                r = hub.repos[repo]
                siblings = []
                for path, data in sorted(r.files.items()):
                    s = {"rfilename": path, "size": len(data),
                         "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                    if path in r.lfs:
                        s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                    siblings.append(s)
                return self._json({"id": repo, "modelId": repo, "sha": commit, "siblings": siblings, "private": False,
                                   "tags": [], "downloads": 0, "likes": 0})

            def _ms(self, repo: str, rest: list[str], q: dict[str, str]):
                r = hub.repos.get(repo)
                if r is None:
                    return self._json({"Code": 10010205001, "Message": "model not found"}, 404)
                if rest == ["revisions"]:
                    return self._json({"Code": 200, "Data": {"RevisionMap": {
                        "Branches": [{"Revision": b, "CommitId": c} for b, c in r.branches.items()], "Tags": []}}})
                commit = hub.commit_of(repo, q.get("Revision", "master"))
                if commit is None:
                    return self._json({"Code": 404, "Message": "revision not found"}, 404)
                if rest == ["repo", "files"]:
                    return self._json({"Code": 200, "Data": {"Files": [
                        {"Path": p, "Name": p.rsplit("/", 1)[-1], "Size": len(d), "Type": "blob",
                         "Sha256": hashlib.sha256(d).hexdigest() if p in r.lfs else "", "IsLFS": p in r.lfs}
                        for p, d in sorted(r.files.items())]}})
                if rest == ["repo"]:
                    path = q.get("FilePath", "")
                    if path not in r.files:
                        return self._json({"Code": 404, "Message": "file not found"}, 404)
                    return self._bytes(path, r.files[path])
                return self._json({"Code": 404}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def safetensors(tensors: dict[str, tuple[tuple[int, ...], bytes]]) -> bytes:
    """A safetensors file of bf16 tensors: name → (shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (shape, raw) in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(blobs)


def tiny_llama_repo(commit: str = "c0ffee" + "0" * 34) -> Repo:
    """A tiny model in the real layout: config, tokenizer files, two safetensors shards and their index."""
    import random

    rng = random.Random(7)
    layers, d, heads, kv, ffn, vocab = 2, 64, 4, 2, 128, 256

    def t(*shape):
        n = 1
        for s in shape:
            n *= s
        return shape, bytes(rng.getrandbits(8) & 0x3F for _ in range(2 * n))

    shards: list[dict] = [{"model.embed_tokens.weight": t(vocab, d)}, {"lm_head.weight": t(vocab, d),
                                                                       "model.norm.weight": t(d)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        kv_dim = d // heads * kv
        shards[i % 2].update({p + "self_attn.q_proj.weight": t(d, d), p + "self_attn.k_proj.weight": t(kv_dim, d),
                              p + "self_attn.v_proj.weight": t(kv_dim, d), p + "self_attn.o_proj.weight": t(d, d),
                              p + "mlp.gate_proj.weight": t(ffn, d), p + "mlp.up_proj.weight": t(ffn, d),
                              p + "mlp.down_proj.weight": t(d, ffn), p + "input_layernorm.weight": t(d),
                              p + "post_attention_layernorm.weight": t(d)})
    files: dict[str, bytes] = {}
    weight_map = {}
    total = 0
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files[name] = safetensors(sh)
        total += sum(len(raw) for _, raw in sh.values())
        weight_map.update({k: name for k in sh})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=1).encode()
    files["config.json"] = json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 2048, "vocab_size": vocab, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}, indent=1).encode()
    files["tokenizer_config.json"] = json.dumps({"chat_template": "{% for m in messages %}{{ m['content'] }}"
                                                                   "{% endfor %}", "eos_token": "</s>"}).encode()
    files["README.md"] = b"# tiny\nA tiny Llama-shaped model with random weights, for tests.\n"
    return Repo(commit=commit, files=files, lfs={p for p in files if p.endswith(".safetensors")},
                branches={"main": commit, "master": commit})
