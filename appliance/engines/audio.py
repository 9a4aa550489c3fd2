"""Decoding uploaded audio in-process with PyAV (FFmpeg's libraries), never through a shell.

Decoding stops as soon as the audio exceeds the allowed duration, whatever the container's
header claims, so a small file that expands into hours of silence costs no more than the limit.
"""

from __future__ import annotations

import io

import numpy as np

from appliance.errors import RequestError

SAMPLE_RATE = 16000
FORMATS = ("wav", "mp3", "ogg", "flac", "m4a", "mp4", "webm", "mpeg", "mpga", "oga", "opus")


class AudioError(RequestError):
    """The upload is not audio we can decode, or it is too long."""


def decode(data: bytes, max_seconds: float) -> np.ndarray:
    """Mono float32 samples at 16 kHz. Raises AudioError."""
    import av

    limit = int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            streams = container.streams.audio
            if not streams:
                raise AudioError("the file has no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(streams[0]):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    total += samples.size
                    if total > limit:
                        raise AudioError(f"the audio is longer than the {max_seconds:.0f} s "
                                         "this appliance accepts")
                    chunks.append(samples)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise AudioError(f"the file could not be decoded as audio ({type(exc).__name__})") from None
    if not chunks:
        raise AudioError("the file holds no audio samples")
    pcm = np.concatenate(chunks)
    if pcm.size > limit:
        raise AudioError(f"the audio is longer than the {max_seconds:.0f} s this appliance accepts")
    return pcm.astype(np.float32) / 32768.0
