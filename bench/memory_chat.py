"""Peak memory of our chat server and llama-server at the same context and parallelism.

    python bench/memory_chat.py --llama-tools DIR [--clients 16] [--max-tokens 64]

Each server is started alone with llama.cpp's load log on, driven by `--clients` streaming
clients, and its peak resident memory (VmHWM) is split as the kernel sees it (anonymous memory:
KV cache, buffers, the Python heap; file-backed: the mapped GGUF and the shared libraries).
llama.cpp's own account of its buffers (KV cache, compute, output) is read from each log, so
the difference can be named: ours is run with and without its prefix-cache streams.
Memory does not depend on how busy the machine is, unlike the throughput benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
from pathlib import Path

from chat import install, peer_command
from loadgen import PROJECT, eos_token, free_port, run_load, serve, start, stop

# llama.cpp's load log: the lines that size its buffers
BUFFERS = re.compile(r"(llama_kv_cache.*size = .*|.*compute buffer size = .*|.*output buffer "
                     r"size = .*|.*model buffer size = .*|.*CPU_REPACK model buffer.*)")


def status(pid: int) -> dict[str, float]:
    """VmHWM, VmRSS and the RSS split (RssAnon, RssFile, RssShmem), in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024
    return out


def drive(base: str, model: str, clients: int, tokens: int, eos: int) -> None:
    asyncio.run(run_load(base, model, 1, 1, 8, eos))
    r = asyncio.run(run_load(base, model, clients, 1, tokens, eos))
    if r.errors:
        raise SystemExit(f"{r.errors} requests failed at {base}")


def buffers(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return sorted({" ".join(m.group(1).split()) for line in lines if (m := BUFFERS.search(line))})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=PROJECT / "bundles" / "bench.toml")
    p.add_argument("--llama-tools", type=Path, required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-per-seq", type=int, default=2048)
    args = p.parse_args()
    args.clients = [args.clients]  # as bench/chat.py's peer_command reads it
    slots = args.clients[0]
    rows: list[tuple[str, dict[str, float], list[str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, gguf = install(args.bundle, work / "root", work)
        eos = eos_token(gguf)
        for prefix in (2, 0):
            log = work / f"ours-{prefix}.log"
            proc, base = serve(work / "root", log, APPLIANCE_THREADS=str(args.threads),
                               APPLIANCE_PARALLEL=str(slots), APPLIANCE_PREFIX_SLOTS=str(prefix),
                               APPLIANCE_CTX_PER_SEQ=str(args.ctx_per_seq),
                               APPLIANCE_KV_CELLS=str(args.ctx_per_seq * (slots + prefix)),
                               APPLIANCE_LLAMA_VERBOSE="1")
            try:
                drive(base, model, slots, args.max_tokens, eos)
                rows.append((f"ours, {prefix} prefix streams", status(proc.pid), buffers(log)))
            finally:
                stop(proc)
        port = free_port()
        log = work / "llama-server.log"
        proc = start(peer_command("llama-server", gguf, model, port, args),
                     f"http://127.0.0.1:{port}/v1/models", log=log)
        try:
            drive(f"http://127.0.0.1:{port}", model, slots, args.max_tokens, eos)
            rows.append(("llama-server", status(proc.pid), buffers(log)))
        finally:
            stop(proc)
    print(f"{slots} clients x {args.max_tokens} tokens, {args.ctx_per_seq} context per sequence,"
          f" {slots} sequences (MiB)", file=sys.stderr)
    for name, mem, lines in rows:
        print(f"\n{name}: peak {mem['VmHWM']:.0f}; now {mem['VmRSS']:.0f} = anonymous "
              f"{mem['RssAnon']:.0f} + file {mem['RssFile']:.0f} + shared {mem['RssShmem']:.0f}")
        for line in lines:
            print(f"  {line}")


if __name__ == "__main__":
    main()
