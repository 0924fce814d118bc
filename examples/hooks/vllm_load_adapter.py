#!/usr/bin/env python3
"""Hook: load each new version of an adapter into a running vLLM server, without restarting it.

Config (daemon.yaml):

    hooks:
      - on: [published]
        command: ["python3", "/path/to/examples/hooks/vllm_load_adapter.py"]
        timeout_seconds: 60

The daemon gives the event as JSON on stdin. This POSTs {"lora_name": "<adapter>-v<N>", "lora_path": "<path>"} to
the server's /v1/load_lora_adapter; requests then name that model ("model": "<adapter>-v<N>"). A new name per
version: vLLM refuses to load a name it already has, and clients move to the new version when they choose.

The vLLM server must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora (and --max-lora-rank at least
the adapter's r). It must see the same path: run it on this host, or mount the checkpoints folder at the same place.

Environment:
  VLLM_URL              the server (default http://127.0.0.1:8000)
  VLLM_API_KEY          sent as "Authorization: Bearer ..." when set (vllm serve --api-key)
  VLLM_UNLOAD_PREVIOUS  1: unload <adapter>-v<N-1> after loading v<N> (its failure is only a warning)

Exit status 0 when the server answered 2xx; otherwise 1 with the server's answer on stderr (the daemon logs it
and retries as the hook's `retries` says). Standard library only. Tested against a stand-in HTTP server that
checks the request (tests/test_hooks.py), not against a real vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def post(base: str, endpoint: str, body: dict, timeout: float = 30) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("VLLM_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['VLLM_API_KEY']}"
    request = urllib.request.Request(base.rstrip("/") + endpoint, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(4096).decode("utf-8", "replace")


def main() -> int:
    event = json.load(sys.stdin)
    if event.get("event") != "published":
        print(f"nothing to do for a {event.get('event')!r} event", file=sys.stderr)
        return 0
    adapter, version, path = event["adapter"], int(event["version"]), event["path"]
    base = os.environ.get("VLLM_URL", "http://127.0.0.1:8000")
    name = f"{adapter}-v{version}"
    try:
        code, text = post(base, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
    except (OSError, urllib.error.URLError) as e:
        print(f"cannot reach vLLM at {base}: {e}", file=sys.stderr)
        return 1
    if not 200 <= code < 300:
        print(f"vLLM refused to load {name} from {path}: HTTP {code}: {text.strip()}", file=sys.stderr)
        return 1
    print(f"loaded {name} from {path}")
    if os.environ.get("VLLM_UNLOAD_PREVIOUS") == "1" and version > 1:
        previous = f"{adapter}-v{version - 1}"
        try:
            code, text = post(base, "/v1/unload_lora_adapter", {"lora_name": previous})
        except (OSError, urllib.error.URLError) as e:
            code, text = 0, str(e)
        if not 200 <= code < 300:
            print(f"warning: could not unload {previous}: {code} {text.strip()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
