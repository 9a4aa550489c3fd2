"""Where a decode step's time goes in our server, sampled with py-spy under 1, 4 and 8 clients.

    python bench/profile_chat.py [--clients 1 4 8] [--max-tokens 128] [--seconds 20]

Our server is started with the bench bundle (as `make bench-chat` starts it), driven by the
same streaming clients, and py-spy samples every thread, idle ones included, for `--seconds`
while the load runs. Each sample of the scheduler thread is put in one bucket (llama_decode,
sampling, detokenisation, the event-loop handoff, bookkeeping, idle), as is each sample of the
event-loop thread (SSE framing, the HTTP write, the handoff, request handling, idle). The
engine's step counter turns the shares into milliseconds per step.

Shares are more robust to a busy machine than absolute times, but not immune: where other
processes hold the cores, llama_decode's threads wait for each other and its share grows.
Read them beside the load average printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from chat import install
from loadgen import PROJECT, VENV_BIN, Result, eos_token, load, machine, run_load, serve, stop

ENGINE = PROJECT / "appliance" / "engines" / "chat.py"

# (bucket, test on the frames from the outermost to the innermost); the first test that holds
SCHEDULER = [
    ("llama_decode", lambda f, leaf: "ChatEngine._step" in leaf and _calls(leaf, "llama_decode(")),
    ("sampling", lambda f, leaf: _any(f, "ChatEngine._pick", "_logprobs", "_verify")),
    ("detokenise", lambda f, leaf: _any(f, "ChatEngine.piece", "TextAssembler.")),
    ("handoff", lambda f, leaf: _any(f, "Outbox.", "Stream.push")),
    ("idle", lambda f, leaf: _any(f, "Condition.wait", "ChatEngine._run (") and (
        "Condition.wait" in leaf or _calls(leaf, "time.sleep("))),
    ("bookkeeping", lambda f, leaf: True),
]
LOOP = [
    ("idle", lambda f, leaf: leaf.startswith(("Runner.run", "BaseEventLoop.run_forever",
                                              "run_until_complete"))),
    ("SSE framing", lambda f, leaf: _any(f, "sse (", "completion_chunk", "chat_chunk",
                                         "Envelope.", "json")),
    ("handoff", lambda f, leaf: _any(f, "_hand_over", "Queue.get", "Queue.put_nowait",
                                     "events (appliance/api/generation.py")),
    ("HTTP write", lambda f, leaf: _any(f, "StreamingResponse", "httptools", "h11",
                                        "send (", "RequestResponseCycle")),
    ("request handling", lambda f, leaf: True),
]


def _any(frames: list[str], *names: str) -> bool:
    return any(n in fr for fr in frames for n in names)


_SOURCE: dict[int, str] = {}


def _calls(frame: str, call: str) -> bool:
    """Whether the engine source line named by `frame` (`func (path:line)`) makes `call`."""
    found = re.search(r"chat\.py:(\d+)\)", frame)
    if not found:
        return False
    if not _SOURCE:
        _SOURCE.update(enumerate(ENGINE.read_text().splitlines(), 1))
    return call in _SOURCE.get(int(found.group(1)), "")


def buckets(raw: Path) -> tuple[Counter[str], Counter[str]]:
    """py-spy's raw (collapsed) stacks -> sample counts per bucket, scheduler and event loop."""
    sched: Counter[str] = Counter()
    loop: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        if not frames:
            continue
        rules, out = ((SCHEDULER, sched) if ": chat-" in thread else
                      (LOOP, loop) if ": MainThread" in thread else (None, None))
        if rules is None or out is None:
            continue
        out[next(name for name, test in rules if test(frames, frames[-1]))] += int(count)
    return sched, loop


def steps(base: str, model: str) -> int:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf'appliance_chat_steps{{model="{re.escape(model)}"}} (\d+)', text)
    return int(found.group(1)) if found else 0


def profile(pyspy: str, pid: int, base: str, model: str, clients: int, args: argparse.Namespace,
            eos: int, out: Path) -> tuple[Counter[str], Counter[str], float, Result]:
    """Load `clients` streams long enough to cover the sampling window; return the buckets, the
    milliseconds per step in the window and the load's result."""
    result: list[Result] = []
    rounds = max(1, round(args.seconds * args.expect / (clients * args.max_tokens)) + 1)
    worker = threading.Thread(target=lambda: result.append(asyncio.run(run_load(
        base, model, clients, rounds, args.max_tokens, eos))))
    worker.start()
    time.sleep(args.settle)  # past the first prefills
    before, t0 = steps(base, model), time.monotonic()
    subprocess.run([pyspy, "record", "--pid", str(pid), "--rate", str(args.rate), "--idle",
                    "--threads", "--format", "raw", "--duration", str(args.seconds), "-o",
                    str(out)], check=True, capture_output=True)
    after, t1 = steps(base, model), time.monotonic()
    busy = worker.is_alive()
    worker.join()
    if not busy:
        print(f"  warning: the load ended inside the window at {clients} clients; raise "
              f"--expect", file=sys.stderr)
    sched, loop = buckets(out)
    return sched, loop, (t1 - t0) * 1000 / max(1, after - before), result[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=PROJECT / "bundles" / "bench.toml")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--ctx-per-seq", type=int, default=2048)
    p.add_argument("--seconds", type=int, default=20, help="sampling window per row")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of load before sampling")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--expect", type=float, default=60.0,
                   help="tok/s expected, to size the load so that it outlasts the window")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or str(VENV_BIN / "py-spy"))
    p.add_argument("--keep", type=Path, help="folder to keep py-spy's raw stacks in")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, gguf = install(args.bundle, work / "root", work)
        eos = eos_token(gguf)
        slots = max(args.clients)
        proc, base = serve(work / "root", work / "ours.log", APPLIANCE_THREADS=str(args.threads),
                           APPLIANCE_PARALLEL=str(slots),
                           APPLIANCE_CTX_PER_SEQ=str(args.ctx_per_seq),
                           APPLIANCE_KV_CELLS=str(args.ctx_per_seq * (slots + 2)))
        rows = []
        try:
            asyncio.run(run_load(base, model, 1, 1, 8, eos))  # warm-up
            for clients in args.clients:
                raw = (args.keep or work) / f"pyspy-{clients}.txt"
                raw.parent.mkdir(parents=True, exist_ok=True)
                start_load = load()
                sched, loop, ms, res = profile(args.py_spy, proc.pid, base, model, clients, args,
                                               eos, raw)
                rows.append((clients, sched, loop, ms, res, start_load, load()))
                print(f"  {clients} clients: {ms:.1f} ms/step, {res.tok_s:.1f} tok/s, load "
                      f"{start_load} -> {load()}", file=sys.stderr, flush=True)
        finally:
            stop(proc)
    print(f"\nmodel {model}; {args.threads} threads; {args.max_tokens}-token answers; "
          f"{machine()}; py-spy at {args.rate} Hz for {args.seconds} s per row")
    for clients, sched, loop, ms, res, l0, l1 in rows:
        print(f"\n{clients} clients: {ms:.1f} ms per step ({res.tok_s:.1f} tok/s over the whole "
              f"load), load average {l0} -> {l1}")
        _show("scheduler thread (wall time)", sched, ms)
        _show("event-loop thread (wall time)", loop, ms)


def _show(title: str, counts: Counter[str], ms: float) -> None:
    total = sum(counts.values()) or 1
    print(f"  {title}, {total} samples:")
    for name, n in counts.most_common():
        print(f"    {name:18} {100 * n / total:5.1f}%  {ms * n / total:6.2f} ms/step")


if __name__ == "__main__":
    main()
