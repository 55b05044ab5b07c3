"""The toy engine's server: OpenAI's chat and completion routes, streamed or not, behind the key in
LLAMA_API_KEY (the env file's), /health open. python -m bundler.engines.toy.server MODEL NAME HOST PORT
[--cluster RANK HEAD PORT NODES]: over several servers, as vLLM's own multi-node runs: the head (rank 0)
listens on HEAD:PORT and serves only once NODES-1 workers have joined, and exits when one leaves; a worker
joins the head from its TOY_HOST_IP (retrying until the head is up), serves nothing, and exits when the
head goes away."""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer(answers: dict[str, str], text: str) -> str:
    low = text.lower()
    return next((a for q, a in answers.items() if q and q in low), answers.get("", "Hello."))


def join_head(rank: int, head: str, port: int) -> None:
    """A worker: join the head, then stay until it goes away (its exit makes the service restart it)."""
    import socket

    while True:
        try:
            c = socket.create_connection((head, port), timeout=5, source_address=(os.environ["TOY_HOST_IP"], 0))
            break
        except OSError:
            time.sleep(1)
    c.sendall(f"{rank}\n".encode())
    c.settimeout(None)
    print(f"toy: worker {rank} joined the head at {head}:{port}", file=sys.stderr, flush=True)
    while c.recv(1024):
        pass
    sys.exit(f"toy: the head at {head}:{port} went away")


def gather_workers(head: str, port: int, nodes: int) -> None:
    """The head: wait for every worker, then exit the whole engine as soon as one leaves."""
    import socket
    import threading

    s = socket.create_server((head, port))
    joined = []
    while len(joined) < nodes - 1:
        c, addr = s.accept()
        rank = c.recv(64).decode().strip()
        print(f"toy: worker {rank} joined from {addr[0]}", file=sys.stderr, flush=True)
        joined.append((rank, c))

    def watch(rank: str, c) -> None:
        while c.recv(1024):
            pass
        print(f"toy: worker {rank} left; the engine stops", file=sys.stderr, flush=True)
        os._exit(1)

    for rank, c in joined:
        threading.Thread(target=watch, args=(rank, c), daemon=True).start()


def serve(model: str, name: str, host: str, port: int, nodes: int = 1) -> None:
    with open(model) as f:
        answers = json.load(f)
    key = os.environ.get("LLAMA_API_KEY", "")
    if not key:
        sys.exit("toy: no API key in LLAMA_API_KEY; refusing to serve without one")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def send(self, code: int, doc: object) -> None:
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def allowed(self) -> bool:
            if self.headers.get("Authorization", "") == f"Bearer {key}":
                return True
            self.send(401, {"error": {"message": "invalid api key", "type": "authentication_error"}})
            return False

        def do_GET(self) -> None:
            if self.path == "/health":
                return self.send(200, {"status": "ok"})
            if not self.allowed():
                return
            if self.path == "/v1/models":
                return self.send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            self.send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.allowed():
                return
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                return self.send(400, {"error": {"message": "not JSON"}})
            if self.path == "/v1/chat/completions":
                text = " ".join(str(m.get("content", "")) for m in req.get("messages") or [] if m.get("role") == "user")
            elif self.path == "/v1/completions":
                text = str(req.get("prompt", ""))
            else:
                return self.send(404, {"error": {"message": "not found"}})
            if not req.get("messages") and not req.get("prompt"):
                return self.send(400, {"error": {"message": "no messages or prompt"}})
            words = answer(answers, text).split() + ([f"[{nodes} servers]"] if nodes > 1 else [])
            n = int(req.get("max_tokens") or 16)
            if req.get("ignore_eos"):  # exactly max_tokens, as bench asks
                words = (words * (n // max(1, len(words)) + 1))[:n]
            words = words[:n]
            chat = self.path == "/v1/chat/completions"
            usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(words),
                     "total_tokens": len(text.split()) + len(words)}
            if not req.get("stream"):
                out = " ".join(words)
                choice = {"index": 0, "finish_reason": "length" if len(words) == n else "stop",
                          **({"message": {"role": "assistant", "content": out}} if chat else {"text": out})}
                return self.send(200, {"id": "toy", "object": "chat.completion" if chat else "text_completion",
                                       "created": int(time.time()), "model": name, "choices": [choice],
                                       "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, w in enumerate(words):
                piece = (" " if i else "") + w
                choice = {"index": 0, **({"delta": {"content": piece}} if chat else {"text": piece})}
                self.wfile.write(f"data: {json.dumps({'id': 'toy', 'model': name, 'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
            if (req.get("stream_options") or {}).get("include_usage"):
                self.wfile.write(f"data: {json.dumps({'id': 'toy', 'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    class Server(ThreadingHTTPServer):
        def server_bind(self) -> None:  # http.server's asks the resolver for the host's name: none here
            import socketserver

            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

    server = Server((host, port), Handler)
    print(f"toy: serving {name} from {model} on {host}:{port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    n = 1
    if "--cluster" in sys.argv:
        i = sys.argv.index("--cluster")
        rank, head, cport, n = int(sys.argv[i + 1]), sys.argv[i + 2], int(sys.argv[i + 3]), int(sys.argv[i + 4])
        if rank:
            join_head(rank, head, cport)
        gather_workers(head, cport, n)
    serve(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), n)
