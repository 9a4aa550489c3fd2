"""Transcription speed: our endpoint against calling faster-whisper directly on the same file,
same model folder, same threads, same run. Then chat throughput alone and while transcriptions
run, which shows what the core lanes cost the chat engine.

    make bench-asr
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
from loadgen import PROJECT, eos_token, install_bundle, machine, run_load, serve, stop, table

WHISPER = "whisper-tiny.en"
CHAT = "smollm2-135m-instruct"
TEXT = ("The appliance keeps every model on the device and never reaches the network. "
        "It checks the signature of each bundle before it installs anything. "
        "Operators copy updates with a USB stick and the device verifies them again. ")


def speech(folder: Path, repeats: int) -> Path:
    wav = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), TEXT * repeats],
                   check=True)
    return wav


def bare(folder: Path, wav: Path, runs: int) -> tuple[float, float]:
    """(seconds per run, audio seconds) with faster-whisper called directly."""
    from faster_whisper import WhisperModel
    from faster_whisper.audio import decode_audio
    model = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=1,
                         num_workers=1, local_files_only=True)
    audio = decode_audio(str(wav))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        segments, _ = model.transcribe(str(wav), language="en", beam_size=5, vad_filter=False)
        list(segments)
        times.append(time.perf_counter() - start)
    return min(times), len(audio) / 16000


def ours(base: str, wav: Path, runs: int) -> float:
    times = []
    with httpx.Client(timeout=600) as client:
        for _ in range(runs):
            start = time.perf_counter()
            r = client.post(f"{base}/v1/audio/transcriptions", data={"model": WHISPER},
                            files={"file": ("speech.wav", wav.read_bytes(), "audio/wav")})
            r.raise_for_status()
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="length of the test speech")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inst = install_bundle(PROJECT / "bundles" / "demo.toml", work / "root", work)
        model = next(m for m in inst.manifest.models if m.id == WHISPER)
        folder = inst.file(next(v for v in model.variants if v.backend.value == "cpu").path)
        chat = next(m for m in inst.manifest.models if m.id == CHAT)
        eos = eos_token(inst.file(chat.variants[0].path))
        wav = speech(work, args.repeats)
        bare_s, duration = bare(folder, wav, args.runs)
        proc, base = serve(work / "root", work / "serve.log")
        try:
            ours_s = ours(base, wav, args.runs)
            alone = asyncio.run(run_load(base, CHAT, 4, 2, 64, eos))
            busy = threading.Event()

            def transcribe_loop() -> None:
                while not busy.is_set():
                    ours(base, wav, 1)

            t = threading.Thread(target=transcribe_loop)
            t.start()
            time.sleep(0.5)
            during = asyncio.run(run_load(base, CHAT, 4, 2, 64, eos))
            busy.set()
            t.join()
        finally:
            stop(proc)
    rows = [["path", "seconds", "real-time factor", "vs bare"],
            ["faster-whisper called directly", f"{bare_s:.2f}", f"{bare_s / duration:.3f}",
             "1.00x"],
            ["appliance /v1/audio/transcriptions", f"{ours_s:.2f}", f"{ours_s / duration:.3f}",
             f"{ours_s / bare_s:.2f}x"]]
    print(f"\n{WHISPER}, int8, 1 thread each, {duration:.1f} s of espeak-ng speech, best of "
          f"{args.runs}; {machine()}")
    print(table(rows))
    print(table([["chat load (4 clients, 64 tokens)", "tok/s"],
                 ["alone", f"{alone.tok_s:.1f}"],
                 ["while transcriptions run", f"{during.tok_s:.1f}"]]))


if __name__ == "__main__":
    main()
