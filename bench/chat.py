"""Chat throughput: our server against llama-cpp-python's own server, same model, same load.

    make bench-chat-python        (or: .venv/bin/python bench/chat.py --bundle bundles/bench.toml)

Builds the bundle (cached), imports it into a throwaway state root, then for each server: start
it, drive 1, 4 and 8 concurrent streaming clients with mixed prompts and fixed-length answers
(temperature 0, end of sequence forbidden), stop it. Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from loadgen import (
    PROJECT,
    eos_token,
    free_port,
    install_bundle,
    machine,
    pct,
    run_load,
    serve,
    start,
    stop,
    table,
)


def install(recipe: Path, root: Path, work: Path) -> tuple[str, Path]:
    """Build + import the bundle; return (model id, path of its GGUF in the store)."""
    inst = install_bundle(recipe, root, work)
    model = next(m for m in inst.manifest.models if m.task.value == "chat")
    variant = next(v for v in model.variants if v.backend.value == "cpu")
    return model.id, inst.file(variant.path)


def measure(name: str, base: str, model: str, args: argparse.Namespace,
            eos: int) -> dict[int, object]:
    results = {}
    for clients in args.clients:
        each = args.rounds if clients > 1 else args.rounds + 1
        r = asyncio.run(run_load(base, model, clients, each, args.max_tokens, eos))
        print(f"  {name:24} {clients:2} clients: {r.tok_s:6.1f} tok/s, "
              f"TTFT p50 {pct(r.ttft, .5):.2f}s, errors {r.errors}", file=sys.stderr, flush=True)
        results[clients] = r
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=PROJECT / "bundles" / "bench.toml")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="requests per client")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-per-seq", type=int, default=2048)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, gguf = install(args.bundle, work / "root", work)
        eos = eos_token(gguf)
        rows: dict[str, dict[int, object]] = {}

        ours, base = serve(work / "root", work / "ours.log", APPLIANCE_THREADS=str(args.threads),
                           APPLIANCE_PARALLEL=str(max(args.clients)),
                           APPLIANCE_CTX_PER_SEQ=str(args.ctx_per_seq),
                           APPLIANCE_KV_CELLS=str(args.ctx_per_seq * max(args.clients)))
        try:
            rows["appliance"] = measure("appliance", base, model, args, eos)
        finally:
            stop(ours)

        port = free_port()
        peer = start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                      "--model_alias", model, "--n_threads", str(args.threads),
                      "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx_per_seq),
                      "--port", str(port), "--verbose", "false",
                      # it aborts a running request when another arrives unless told not to
                      "--interrupt_requests", "false"],
                     f"http://127.0.0.1:{port}/v1/models", log=work / "peer.log")
        try:
            rows["llama-cpp-python server"] = measure("llama-cpp-python server",
                                                      f"http://127.0.0.1:{port}", model, args, eos)
        finally:
            stop(peer)

    header = ["server", "clients", "tok/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "vs peer"]
    out = [header]
    for name, by_clients in rows.items():
        for clients, r in by_clients.items():
            peer_r = rows["llama-cpp-python server"][clients]
            out.append([name, str(clients), f"{r.tok_s:.1f}",  # type: ignore[attr-defined]
                        f"{pct(r.ttft, .5):.2f}s", f"{pct(r.ttft, .95):.2f}s",  # type: ignore[attr-defined]
                        f"{pct(r.itl, .5) * 1000:.0f}ms", f"{pct(r.itl, .95) * 1000:.0f}ms",  # type: ignore[attr-defined]
                        f"{r.tok_s / peer_r.tok_s:.2f}x"])  # type: ignore[attr-defined]
    print(f"\nmodel {model} ({gguf.name}), {args.max_tokens} tokens per answer, "
          f"{args.threads} threads; {machine()}")
    print(table(out))


if __name__ == "__main__":
    main()
