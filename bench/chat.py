"""Chat throughput under concurrent load: our server against peers, same model, same machine,
same run, same load.

    make bench-chat           # vs llama.cpp's llama-server, 1/4/8/16 clients, 128 and 512 tokens
    make bench-chat-python    # vs llama-cpp-python's server, 1/4/8 clients, 128 tokens

Each server is started alone, driven by streaming clients with mixed prompts and fixed-length
answers (temperature 0, end of sequence forbidden, so every server writes the same number of
tokens), and stopped. The same threads and the same context per sequence are given to each.
llama-batched-bench measures the engine's own ceiling (decode only, no sampling, no HTTP) at the
same batch sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from loadgen import (
    PROJECT,
    QUOTE,
    SHARED,
    Result,
    eos_token,
    free_port,
    install_bundle,
    machine,
    pct,
    rss_peak_mb,
    run_load,
    serve,
    start,
    stop,
    table,
)

PEERS = ("llama-server", "llama-cpp-python")


def install(recipe: Path, root: Path, work: Path) -> tuple[str, Path]:
    """Build + import the bundle; return (model id, path of its GGUF in the store)."""
    inst = install_bundle(recipe, root, work)
    model = next(m for m in inst.manifest.models if m.task.value == "chat")
    variant = next(v for v in model.variants if v.backend.value == "cpu")
    return model.id, inst.file(variant.path)


def measure(name: str, base: str, model: str, args: argparse.Namespace,
            eos: int) -> dict[tuple[int, int], Result]:
    asyncio.run(run_load(base, model, 1, 1, 8, eos))  # warm-up, not counted
    results = {}
    for max_tokens in args.max_tokens:
        for clients in args.clients:
            rounds = args.rounds + (1 if clients == 1 else 0)
            r = asyncio.run(run_load(base, model, clients, rounds, max_tokens, eos))
            print(f"  {name:18} {max_tokens:4} tokens {clients:2} clients: {r.tok_s:6.1f} tok/s,"
                  f" TTFT p50 {pct(r.ttft, .5):.2f}s, errors {r.errors}", file=sys.stderr,
                  flush=True)
            results[(max_tokens, clients)] = r
    return results


def peer_command(peer: str, gguf: Path, model: str, port: int,
                 args: argparse.Namespace) -> list[str]:
    slots = max(args.clients)
    if peer == "llama-server":
        return [str(args.llama_tools / "llama-server"), "-m", str(gguf), "-a", model,
                "-t", str(args.threads), "-tb", str(args.threads),
                "-c", str(args.ctx_per_seq * slots), "-np", str(slots), "--cont-batching",
                "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model,
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--n_ctx", str(args.ctx_per_seq), "--port", str(port), "--verbose", "false",
            # it aborts a running request when another arrives unless told not to
            "--interrupt_requests", "false"]


def ceiling(gguf: Path, args: argparse.Namespace) -> dict[int, float]:
    """llama-batched-bench: decode tokens/s at each batch size (no sampling, no HTTP)."""
    tool = args.llama_tools / "llama-batched-bench" if args.llama_tools else None
    if tool is None or not tool.exists():
        return {}
    npl = ",".join(str(c) for c in args.clients)
    out = subprocess.run([str(tool), "-m", str(gguf), "-c", str(128 * 1024), "-b", "512",
                          "-ub", "512", "-npp", "64", "-ntg", "128", "-npl", npl,
                          "-t", str(args.threads)], capture_output=True, text=True, check=True)
    rates = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[2] or ""):
            rates[int(cells[2])] = float(cells[7])  # B, S_TG t/s
    return rates


def _shared(base: str, model: str, eos: int) -> Result:
    """Sequential requests sharing a 500-token system prompt (the first one warms any cache)."""
    asyncio.run(run_load(base, model, 1, 1, 8, eos, SHARED[:1]))
    return asyncio.run(run_load(base, model, 1, len(SHARED) - 1, 16, eos, SHARED[1:]))


def _quote(base: str, model: str, eos: int) -> Result:
    return asyncio.run(run_load(base, model, 1, 2, 128, eos, QUOTE))


def workloads(work: Path, model: str, args: argparse.Namespace, eos: int) -> dict[str, float]:
    """Our server with the prefix cache and speculation switched on and off."""
    out: dict[str, float] = {}
    for slots, draft in ((0, 0), (2, 0), (2, 6)):
        proc, base = serve(work / "root", work / f"extra-{slots}-{draft}.log",
                           APPLIANCE_THREADS=str(args.threads), APPLIANCE_PREFIX_SLOTS=str(slots),
                           APPLIANCE_LOOKUP_DRAFT=str(draft), APPLIANCE_PARALLEL="4",
                           APPLIANCE_CTX_PER_SEQ=str(args.ctx_per_seq),
                           APPLIANCE_KV_CELLS=str(args.ctx_per_seq * (4 + slots)))
        try:
            if draft == 0:
                shared = _shared(base, model, eos)
                out[f"shared 500-token prompt, TTFT p50 (s), prefix slots {slots}"] = pct(
                    shared.ttft, .5)
            if slots:
                quote = _quote(base, model, eos)
                out[f"quoting answer, 1 client tok/s, lookup draft {draft}"] = quote.tok_s
        finally:
            stop(proc)
    return out


def peer_workloads(peer: str, base: str, model: str, eos: int) -> dict[str, float]:
    return {f"{peer}: shared 500-token prompt, TTFT p50 (s)": pct(_shared(base, model, eos).ttft,
                                                                 .5),
            f"{peer}: quoting answer, 1 client tok/s": _quote(base, model, eos).tok_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=PROJECT / "bundles" / "bench.toml")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=["llama-cpp-python"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, nargs="+", default=[128])
    p.add_argument("--rounds", type=int, default=1, help="requests per client")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--ctx-per-seq", type=int, default=2048)
    p.add_argument("--llama-tools", type=Path, help="folder with llama-server, llama-batched-bench")
    p.add_argument("--extras", action="store_true",
                   help="also: shared 500-token system prompt (prefix cache on/off), answers "
                        "that quote the input (speculation on/off), peak memory")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, gguf = install(args.bundle, work / "root", work)
        eos = eos_token(gguf)
        rows: dict[str, dict[tuple[int, int], Result]] = {}
        ours, base = serve(work / "root", work / "ours.log", APPLIANCE_THREADS=str(args.threads),
                           APPLIANCE_PARALLEL=str(max(args.clients)),
                           APPLIANCE_CTX_PER_SEQ=str(args.ctx_per_seq),
                           APPLIANCE_KV_CELLS=str(args.ctx_per_seq * (max(args.clients) + 2)))
        try:
            rows["appliance"] = measure("appliance", base, model, args, eos)
            peak_rss = rss_peak_mb(ours.pid)
        finally:
            stop(ours)
        extras = workloads(work, model, args, eos) if args.extras else {}
        for peer in args.peers:
            port = free_port()
            # llama-server's /health can answer before its slots are ready: ask for the models
            ready = f"http://127.0.0.1:{port}/v1/models"
            proc = start(peer_command(peer, gguf, model, port, args), ready,
                         log=work / f"{peer}.log")
            try:
                rows[peer] = measure(peer, f"http://127.0.0.1:{port}", model, args, eos)
                if args.extras:
                    extras.update(peer_workloads(peer, f"http://127.0.0.1:{port}", model, eos))
                    extras[f"{peer} peak RSS (MiB)"] = rss_peak_mb(proc.pid)
            except Exception:
                log = (work / f"{peer}.log").read_text(errors="replace").splitlines()
                print("\n".join(log[-30:]), file=sys.stderr)
                raise
            finally:
                stop(proc)
        top = ceiling(gguf, args)

    print(f"\nour peak RSS after {max(args.clients)} concurrent clients: {peak_rss:.0f} MiB")
    for name, value in extras.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"\nmodel {model} ({gguf.name}); {args.threads} threads, {args.ctx_per_seq} context "
          f"per sequence, temperature 0, mixed prompts; {machine()}")
    for peer in args.peers:
        header = ["tokens", "clients", "ours tok/s", f"{peer} tok/s", "ratio", "ceiling",
                  "TTFT p50 ours/peer", "TTFT p95 ours/peer", "ITL p50 ours/peer",
                  "ITL p95 ours/peer"]
        out = [header]
        for key, r in rows["appliance"].items():
            q = rows[peer][key]
            cap = top.get(key[1])
            out.append([str(key[0]), str(key[1]), f"{r.tok_s:.1f}", f"{q.tok_s:.1f}",
                        f"{r.tok_s / q.tok_s:.2f}x", f"{cap:.0f}" if cap else "-",
                        f"{pct(r.ttft, .5):.2f}/{pct(q.ttft, .5):.2f}s",
                        f"{pct(r.ttft, .95):.2f}/{pct(q.ttft, .95):.2f}s",
                        f"{pct(r.itl, .5) * 1000:.0f}/{pct(q.itl, .5) * 1000:.0f}ms",
                        f"{pct(r.itl, .95) * 1000:.0f}/{pct(q.itl, .95) * 1000:.0f}ms"])
        print(table(out))


if __name__ == "__main__":
    main()
