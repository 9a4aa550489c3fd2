"""Write tests/fixtures/embed_reference.json: all-MiniLM-L6-v2 vectors from the reference
pipeline (sentence-transformers on torch) for a fixed set of sentences. Run once on a host with
the bench extra; the device tests compare our ONNX engine against this file without torch.

    .venv/bin/python bench/make_embed_reference.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

SENTENCES = [
    "The appliance serves models without any network connection.",
    "A cat sat on the warm windowsill.",
    "Signed bundles protect the device from tampered weights.",
    "How do I reset my password?",
    "Le chat dort sur le canapé.",
    "Quarterly revenue grew by twelve percent.",
    "short",
    "The quick brown fox jumps over the lazy dog, again and again, until the sun sets "
    "behind the hills and the farmer calls everyone home for a late dinner by the fire.",
]


def model_folder() -> Path:
    from appliance.publish import recipe
    from appliance.publish.fetch import Resolver
    r = recipe.load(PROJECT / "bundles" / "demo.toml")
    spec = next(m for m in r.models if m.id == "all-minilm-l6-v2")
    assert spec.weights.ref is not None
    return Resolver(r, PROJECT / ".cache" / "bundle", print).resolve(spec.weights.ref)


def main() -> None:
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(model_folder()), device="cpu", local_files_only=True)
    vectors = model.encode(SENTENCES, normalize_embeddings=True)
    out = PROJECT / "tests" / "fixtures" / "embed_reference.json"
    out.write_text(json.dumps({"model": "sentence-transformers/all-MiniLM-L6-v2",
                               "sentences": SENTENCES,
                               "vectors": [[round(float(x), 7) for x in v] for v in vectors]}))
    print(f"wrote {out} ({len(SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
