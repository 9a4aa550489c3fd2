"""Shared load generator for the benchmarks: concurrent streaming clients, timed on the client.

Every request streams (so time-to-first-token is seen as a client sees it) and forbids the end of
sequence token with logit_bias, so each answer is exactly `max_tokens` long on every server and
tokens/s compare like for like.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Mixed prompt lengths: a one-liner, a paragraph, and a long context.
BASE = ("The appliance runs language models on small devices without any network. "
        "It verifies signed bundles, keeps them from being rolled back, and serves an API. ")
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    BASE * 3 + "Summarise the text above.",
    BASE * 12 + "Explain what this device does, step by step.",
    "List ten uses for a paperclip.",
]


# A shared system prompt of about 500 tokens, with a different question each time.
SYSTEM = ("You are the on-device assistant of an offline appliance in a workshop. Answer in plain "
          "words, cite the manual section when you can, never invent part numbers, and say when "
          "you do not know. The appliance runs its models locally and never reaches a network. "
          ) * 9
QUESTIONS = ["How do I replace the filter?", "What does error E42 mean?",
             "How often should the belt be oiled?", "Can I run it on battery power?",
             "Where is the serial number?", "How do I update the models?",
             "What is the maximum load?", "How loud is it at full speed?"]
SHARED = [f"{SYSTEM}\nQuestion: {q}\nAnswer:" for q in QUESTIONS]
# Answers that quote their input: where prompt-lookup speculation applies.
PASSAGE = ("Each bundle is verified before it is installed: the signature over the manifest is "
           "checked against the trusted keys, every file is hashed while it is copied, and the "
           "sequence must be higher than any installed before. ")
QUOTE = [f"Text: {PASSAGE * 3}\nRepeat the text exactly.\nText: {PASSAGE[:60]}"]


def rss_peak_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0
    texts: list[str] = field(default_factory=list)  # each answer, in the order they ended

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, object], out: Result) -> None:
    start = time.perf_counter()
    last, first, tokens, text = start, None, 0, ""
    async with client.stream("POST", url, json=body, timeout=600) as r:
        if r.status_code != 200:
            out.errors += 1
            await r.aread()
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                continue
            text += chunk["choices"][0]["text"]
            now = time.perf_counter()
            if first is None:
                first = now
                out.ttft.append(now - start)
            else:
                out.itl.append(now - last)
            last = now
    out.tokens += tokens or body["max_tokens"]  # type: ignore[operator]
    out.texts.append(text)


async def run_load(base: str, model: str, clients: int, requests_each: int, max_tokens: int,
                   eos_id: int, prompts: list[str] | None = None) -> Result:
    prompts = prompts or PROMPTS
    out = Result()
    url = f"{base}/v1/completions"

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        for k in range(requests_each):
            body = {"model": model, "prompt": prompts[(i + k) % len(prompts)],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "logit_bias": {str(eos_id): -100},
                    "stream_options": {"include_usage": True}}
            await _one(client, url, body, out)

    async with contextlib.AsyncExitStack() as stack:
        # Clients are made before the clock starts: each loads an SSL context (about 18 ms,
        # blocking the loop), which otherwise counted in every TTFT and in the wall time.
        # A fresh connection per request: llama-server closes streamed keep-alive connections.
        made = [await stack.enter_async_context(
            httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)))
            for _ in range(clients)]
        start = time.perf_counter()
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(made)))
        out.wall = time.perf_counter() - start
    return out


async def conversation(base: str, model: str, turns: int, max_tokens: int, eos: int) -> Result:
    """One client in a conversation: each turn's prompt is the previous prompt, its answer and
    a new question (the 500-token system prompt first)."""
    out, prompt = Result(), SYSTEM
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for question in QUESTIONS[:turns]:
            prompt += f"\nQuestion: {question}\nAnswer:"
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "logit_bias": {str(eos): -100},
                    "stream_options": {"include_usage": True}}
            await _one(client, f"{base}/v1/completions", body, out)
            prompt += out.texts[-1]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{url} not ready after {timeout} s")


def start(cmd: list[str], ready_url: str, env: dict[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - lives with the server
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)
    wait_ready(ready_url, proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def eos_token(gguf: Path) -> int:
    """The model's end-of-sequence id, read with llama.cpp (vocab only)."""
    import llama_cpp as ll
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(gguf).encode(), params)
    try:
        return int(ll.llama_vocab_eos(ll.llama_model_get_vocab(model)))
    finally:
        ll.llama_model_free(model)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w)
                       for j, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


PROJECT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# The package of the tree this benchmark lives in, whichever checkout the venv was installed
# from (the console scripts would import that one).
OWN_TREE = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT),
                                                        os.environ.get("PYTHONPATH")]))}


def install_bundle(recipe: Path, root: Path, work: Path) -> Any:
    """Build (cached) + sign + import a bundle into a throwaway root; return the Installed."""
    ctl, build = str(VENV_BIN / "appliance-ctl"), str(VENV_BIN / "appliance-build")
    env = {**os.environ, "APPLIANCE_ROOT": str(root), **OWN_TREE}

    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, env=env)

    run(build, "keygen", "--out", str(work / "k"))
    run(build, "bundle", str(recipe), "--key", str(work / "k.key"), "--out", str(work / "out"),
        "--cache", str(PROJECT / ".cache" / "bundle"))
    run(ctl, "keys", "add", str(work / "k.pub"))
    run(ctl, "bundle", "import", str(next((work / "out").glob("*.bundle"))))
    sys.path.insert(0, str(PROJECT))
    from appliance.device.layout import Layout
    from appliance.device.store import Store
    return Store(Layout(root)).active_bundles()[0]


def serve(root: Path, log: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start `appliance-ctl serve` on a free loopback port without auth."""
    port = free_port()
    proc = start([sys.executable, "-m", "appliance.cli.ctl", "serve"],
                 f"http://127.0.0.1:{port}/healthz",
                 env={"APPLIANCE_ROOT": str(root), "APPLIANCE_AUTH": "false",
                      "APPLIANCE_PORT": str(port), **OWN_TREE, **env}, log=log)
    return proc, f"http://127.0.0.1:{port}"


# The SIMD levels that change llama.cpp's kernels: a figure is only comparable with figures
# taken on the same set (AVX2-only and AVX-512 machines differ by far more than 10%).
SIMD = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
        "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def machine() -> str:
    model, flags = "unknown CPU", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = " ".join(f for f in SIMD if f in flags) or "none seen"
    return f"{os.cpu_count()} cores ({model}; {simd}), Python {sys.version.split()[0]}"


def build_flags() -> str:
    """The SIMD levels llama-cpp-python's llama.cpp was built for (what the kernels use)."""
    import llama_cpp
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return " ".join(part.split("=")[0].split(":")[-1].strip() for part in info.split("|")
                    if part.strip().endswith("= 1"))


def load() -> str:
    """The 1, 5 and 15 minute load averages: figures taken above ~0.5 are not quiet."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
