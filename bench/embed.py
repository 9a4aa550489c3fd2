"""Embeddings throughput: our endpoint against sentence-transformers (torch), same machine, same
run, same sentences. Also the cosine parity of what the endpoint returns.

    make bench-embed
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from loadgen import PROJECT, install_bundle, machine, serve, stop, table

MODEL = "all-minilm-l6-v2"
WORDS = ["offline", "appliance", "model", "bundle", "signature", "device", "network", "answer",
         "quickly", "private", "data", "battery", "sensor", "field", "report", "weather", "river",
         "mountain", "engine", "update", "secure"]


def sentences(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 30)))) for _ in range(n)]


def endpoint_rate(base: str, texts: list[str], batch: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    with httpx.Client(timeout=120) as client:
        while time.perf_counter() - start < seconds:
            for i in range(0, len(texts), batch):
                r = client.post(f"{base}/v1/embeddings",
                                json={"model": MODEL, "input": texts[i:i + batch]})
                r.raise_for_status()
                done += len(texts[i:i + batch])
    return done / (time.perf_counter() - start)


def torch_rate(folder: Path, texts: list[str], batch: int, seconds: float,
               threads: int) -> tuple[float, np.ndarray]:
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(threads)
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    vectors = model.encode(texts[:64], batch_size=batch, normalize_embeddings=True)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(texts), batch):
            model.encode(texts[i:i + batch], batch_size=batch, normalize_embeddings=True)
            done += len(texts[i:i + batch])
    return done / (time.perf_counter() - start), vectors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="torch threads, and the embeddings lanes we give our server")
    args = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    texts = sentences(256)
    rows = [["engine", "batch", "sentences/s", "vs torch"]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        install_bundle(PROJECT / "bundles" / "demo.toml", work / "root", work)
        sys.path.insert(0, str(PROJECT))
        from appliance.device.layout import Layout
        from appliance.publish import recipe
        from appliance.publish.fetch import Resolver
        r = recipe.load(PROJECT / "bundles" / "demo.toml")
        spec = next(m for m in r.models if m.id == MODEL)
        assert spec.weights.ref
        folder = Resolver(r, PROJECT / ".cache" / "bundle", print).resolve(spec.weights.ref)
        results: dict[tuple[str, int], float] = {}
        parity: dict[str, float] = {}
        for quant in ("int8", "fp32"):
            config = Layout(work / "root").config  # the live one, once serve() made it
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(
                f'[models]\nquantization = {{ "{MODEL}" = "{quant}" }}\n'
                f"[hardware]\naux_cores = {max(1, args.threads - 1)}\n")
            proc, base = serve(work / "root", work / f"{quant}.log")
            try:
                for batch in (1, 32):
                    results[(f"appliance onnx {quant}", batch)] = endpoint_rate(
                        base, texts, batch, args.seconds)
                got = httpx.post(f"{base}/v1/embeddings", timeout=60,
                                 json={"model": MODEL, "input": texts[:64]}).json()
                parity[quant] = np.array([d["embedding"] for d in got["data"]], dtype=np.float32)
            finally:
                stop(proc)
        for batch in (1, 32):
            rate, reference = torch_rate(folder, texts, batch, args.seconds, args.threads)
            results[("sentence-transformers (torch)", batch)] = rate
        for (name, batch), rate in results.items():
            peer = results[("sentence-transformers (torch)", batch)]
            rows.append([name, str(batch), f"{rate:.0f}", f"{rate / peer:.2f}x"])
        print(f"\n{MODEL}, {len(texts)} sentences of 6-30 words; {machine()}; "
              f"torch threads {args.threads}, our embeddings lanes {max(1, args.threads - 1)}")
        print(table(rows))
        for quant, vecs in parity.items():
            cos = (vecs * reference).sum(axis=1)
            print(f"parity {quant}: cosine to sentence-transformers min {cos.min():.5f}, "
                  f"mean {cos.mean():.5f}")


if __name__ == "__main__":
    main()
