"""Run on a box (a chroot or a systemd container) after install.sh --json: what a user would see.
Standard library only (the box has nothing else). Prints one JSON object.

    python3 box_check.py INSTALL_JSON     chat with the key, without it, and the engines running
    python3 box_check.py --engines        only the engines running
"""

import json
import os
import sys
import urllib.error
import urllib.request


def call(url, body=None, key=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def engines():
    """Every llama-server process: its uid and its --parallel."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        if not args or not os.path.basename(args[0]).startswith("llama-server"):
            continue
        uid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))
        parallel = int(args[args.index("--parallel") + 1]) if "--parallel" in args else None
        found.append({"pid": int(pid), "uid": uid, "parallel": parallel, "binary": args[0]})
    return found


def main():
    if sys.argv[1] == "--engines":
        print(json.dumps(engines()))
        return
    out = json.load(open(sys.argv[1]))
    env = dict(line.split("=", 1) for line in open(out["api_key_file"]).read().splitlines() if "=" in line)
    key = env["LLAMA_API_KEY"]
    base = out["endpoint"]
    code, resp = call(base + "/chat/completions", {"model": out["model"], "max_tokens": 16, "temperature": 0,
                                                   "messages": [{"role": "user", "content": "Hello"}]}, key)
    text = resp["choices"][0]["message"]["content"] if code == 200 else ""
    nokey, _ = call(base + "/models")
    wrong, _ = call(base + "/models", key="sk-wrong")
    print(json.dumps({"chat_status": code, "text": text, "no_key_status": nokey, "wrong_key_status": wrong,
                      "engines": engines(), "key_file_mode": oct(os.stat(out["api_key_file"]).st_mode & 0o777)}))


if __name__ == "__main__":
    main()
