"""Chat throughput under concurrent load: our server against peers, same model, same machine,
same run, same load.

    make bench-chat           # vs llama.cpp's llama-server, 1/4/8/16 clients, 128 and 512 tokens
    make bench-chat-python    # vs llama-cpp-python's server, 1/4/8 clients, 128 tokens

All servers are started, each is warmed up (and again with each row's prompts, which both
keep in their prompt caches), and every row (answer length x clients) is run
`--repeats` times, the servers taking turns in a rotating order (ours first, then the peer
first, ...), so drift in the machine's speed falls on both sides alike. Only one server works at a
time; the others sit idle. Clients stream mixed prompts and fixed-length answers (temperature 0,
end of sequence forbidden, so every server writes the same number of tokens). The same threads and
the same context per sequence are given to each. llama-batched-bench measures the engine's own
ceiling (decode only, no sampling, no HTTP) at the same batch sizes.

The table shows medians with their range. The ratio is the median of the per-repeat ratios (each
ours/peer pair ran back to back); it is called a win only when every pair is above 1 and a loss
only when every pair is below 1, and only with at least 5 repeats: if the servers were equal,
all 5 pairs would fall on one side with probability 1/16. Anything else is "within noise".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadgen import (
    PROJECT,
    QUOTE,
    SHARED,
    Result,
    build_flags,
    conversation,
    eos_token,
    free_port,
    install_bundle,
    load,
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


Rows = dict[tuple[int, int], list[Result]]  # (answer tokens, clients) -> one Result per repeat
MIN_CALL = 5  # repeats needed before a ratio is called a win or a loss


def measure(servers: dict[str, str], model: str, args: argparse.Namespace,
            eos: int) -> dict[str, Rows]:
    """Every row `args.repeats` times; within a repeat the servers run one after another, in an
    order that rotates from repeat to repeat."""
    names = list(servers)
    for name in names:
        asyncio.run(run_load(servers[name], model, 1, 1, 8, eos))  # warm-up, not counted
    results: dict[str, Rows] = {name: {} for name in names}
    for max_tokens in args.max_tokens:
        for clients in args.clients:
            rounds = args.rounds + (1 if clients == 1 else 0)
            # the row's prompts once through each server, unmeasured: both keep prompts (our
            # prefix cache, llama-server's prompt cache), so otherwise only the first repeat
            # would prefill them cold (measured: 4 clients at 31-37 tok/s, then 48-55)
            for name in names:
                asyncio.run(run_load(servers[name], model, clients, rounds, 8, eos))
            for rep in range(args.repeats):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    r = asyncio.run(run_load(servers[name], model, clients, rounds, max_tokens,
                                             eos))
                    print(f"  {name:18} {max_tokens:4} tokens {clients:2} clients, repeat "
                          f"{rep + 1}/{args.repeats}: {r.tok_s:6.1f} tok/s, TTFT p50 "
                          f"{pct(r.ttft, .5):.2f}s, errors {r.errors}, load {load()}",
                          file=sys.stderr, flush=True)
                    results[name].setdefault((max_tokens, clients), []).append(r)
    return results


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """Median with the range: `101.2 (97.0-104.1)`; just the value for one run."""
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def verdict(ratios: list[float]) -> str:
    """win / loss only when every paired ratio lies on one side of 1 (a sign test)."""
    if len(ratios) < MIN_CALL:
        return f"no call (n={len(ratios)})"
    if min(ratios) > 1:
        return "win"
    if max(ratios) < 1:
        return "loss"
    return "within noise"


def merged(runs: list[Result]) -> Result:
    """All repeats' latencies together, for percentiles."""
    out = Result()
    for r in runs:
        out.ttft += r.ttft
        out.itl += r.itl
    return out


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


def server_flags(gguf: Path, args: argparse.Namespace, work: Path) -> str:
    """The SIMD levels llama-server was built for: only its verbose log says, so it is started
    once more on its own, verbose, and stopped."""
    port = free_port()
    log = work / "llama-server-flags.log"
    proc = start([str(args.llama_tools / "llama-server"), "-m", str(gguf), "-c", "512", "-np", "1",
                  "--port", str(port), "--no-webui", "-v"], f"http://127.0.0.1:{port}/v1/models",
                 log=log)
    stop(proc)
    return _system_info(log.read_text(errors="replace"))


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


def _follow_ups(base: str, model: str, eos: int) -> float:
    """TTFT p50 of turns 2-6 of a conversation (turn 1 decodes the system prompt cold)."""
    return pct(asyncio.run(conversation(base, model, 6, 32, eos)).ttft[1:], .5)


def _quote(base: str, model: str, eos: int) -> Result:
    return asyncio.run(run_load(base, model, 1, 2, 128, eos, QUOTE))


def workloads(work: Path, model: str, args: argparse.Namespace, eos: int) -> dict[str, float]:
    """Our server with the prefix cache and speculation switched on and off."""
    out: dict[str, float] = {}
    for slots, draft in ((0, 0), (2, 0), (2, 2)):  # 2: the service's default
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
                out[f"follow-up turns of a conversation, TTFT p50 (s), prefix slots {slots}"] = (
                    _follow_ups(base, model, eos))
            if slots:
                quote = _quote(base, model, eos)
                out[f"quoting answer, 1 client tok/s, lookup drafts {'on' if draft else 'off'}"] = (
                    quote.tok_s)
        finally:
            stop(proc)
    return out


def peer_workloads(peer: str, base: str, model: str, eos: int) -> dict[str, float]:
    return {f"{peer}: shared 500-token prompt, TTFT p50 (s)": pct(_shared(base, model, eos).ttft,
                                                                 .5),
            f"{peer}: follow-up turns of a conversation, TTFT p50 (s)": _follow_ups(base, model,
                                                                                  eos),
            f"{peer}: quoting answer, 1 client tok/s": _quote(base, model, eos).tok_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=PROJECT / "bundles" / "bench.toml")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=["llama-cpp-python"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, nargs="+", default=[128])
    p.add_argument("--rounds", type=int, default=1, help="requests per client")
    p.add_argument("--repeats", type=int, default=1,
                   help=f"runs of each row per server, alternating; {MIN_CALL}+ to call a ratio")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--ctx-per-seq", type=int, default=2048)
    p.add_argument("--llama-tools", type=Path, help="folder with llama-server, llama-batched-bench")
    p.add_argument("--extras", action="store_true",
                   help="also: shared 500-token system prompt (prefix cache on/off), answers "
                        "that quote the input (speculation on/off), peak memory")
    args = p.parse_args()
    started_load = load()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, gguf = install(args.bundle, work / "root", work)
        eos = eos_token(gguf)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        servers: dict[str, str] = {}
        extras: dict[str, float] = {}
        peak_rss: dict[str, float] = {}
        try:
            procs["appliance"], servers["appliance"] = serve(
                work / "root", work / "ours.log", APPLIANCE_THREADS=str(args.threads),
                APPLIANCE_PARALLEL=str(max(args.clients)),
                APPLIANCE_CTX_PER_SEQ=str(args.ctx_per_seq),
                APPLIANCE_KV_CELLS=str(args.ctx_per_seq * (max(args.clients) + 2)))
            for peer in args.peers:
                port = free_port()
                # llama-server's /health can answer before its slots are ready: ask for models
                ready = f"http://127.0.0.1:{port}/v1/models"
                procs[peer] = start(peer_command(peer, gguf, model, port, args), ready,
                                    log=work / f"{peer}.log")
                servers[peer] = f"http://127.0.0.1:{port}"
            rows = measure(servers, model, args, eos)
            peak_rss = {name: rss_peak_mb(proc.pid) for name, proc in procs.items()}
            if args.extras:
                for peer in args.peers:
                    extras.update(peer_workloads(peer, servers[peer], model, eos))
        except Exception:
            for peer in args.peers:
                if (work / f"{peer}.log").exists():
                    log = (work / f"{peer}.log").read_text(errors="replace").splitlines()
                    print("\n".join(log[-30:]), file=sys.stderr)
            raise
        finally:
            for proc in procs.values():
                stop(proc)
        if args.extras:
            extras = {**workloads(work, model, args, eos), **extras}
        flags = {peer: server_flags(gguf, args, work) for peer in args.peers
                 if peer == "llama-server"}
        top = ceiling(gguf, args)

    print(f"\npeak RSS after {max(args.clients)} concurrent clients (MiB): "
          + ", ".join(f"{name} {mb:.0f}" for name, mb in peak_rss.items()))
    for name, value in extras.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"\nmodel {model} ({gguf.name}); {args.threads} threads, {args.ctx_per_seq} context "
          f"per sequence, temperature 0, mixed prompts; {machine()}")
    print(f"llama.cpp built for: ours {build_flags()}"
          + "".join(f"; {peer} {value}" for peer, value in flags.items()))
    print(f"load average at start {started_load}, at end {load()}; {args.repeats} repeats per "
          f"row, median (min-max)")
    ours = rows["appliance"]
    for peer in args.peers:
        header = ["tokens", "clients", "ours tok/s", f"{peer} tok/s", "ratio", "call",
                  "ceiling", "TTFT p50 ours/peer", "TTFT p95 ours/peer", "ITL p50 ours/peer",
                  "ITL p95 ours/peer"]
        out = [header]
        for key, runs in ours.items():
            theirs = rows[peer][key]
            ratios = [a.tok_s / b.tok_s for a, b in zip(runs, theirs, strict=True) if b.tok_s]
            r, q = merged(runs), merged(theirs)
            cap = top.get(key[1])
            out.append([str(key[0]), str(key[1]), spread([x.tok_s for x in runs]),
                        spread([x.tok_s for x in theirs]), spread(ratios, "{:.2f}") + "x",
                        verdict(ratios), f"{cap:.0f}" if cap else "-",
                        f"{pct(r.ttft, .5):.2f}/{pct(q.ttft, .5):.2f}s",
                        f"{pct(r.ttft, .95):.2f}/{pct(q.ttft, .95):.2f}s",
                        f"{pct(r.itl, .5) * 1000:.0f}/{pct(q.itl, .5) * 1000:.0f}ms",
                        f"{pct(r.itl, .95) * 1000:.0f}/{pct(q.itl, .95) * 1000:.0f}ms"])
        print(table(out))


def _system_info(text: str) -> str:
    """The SIMD levels in a llama.cpp tool's system_info line."""
    found = re.search(r"system_info:.*?\|(.*)", text)
    if not found:
        return "not logged"
    return " ".join(part.split("=")[0].split(":")[-1].strip() for part in found.group(1).split("|")
                    if part.strip().endswith("= 1"))

if __name__ == "__main__":
    main()
