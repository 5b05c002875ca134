"""Streaming Silero VAD: speech probabilities for 32 ms windows, fed frame by frame.

faster-whisper ships Silero VAD v6 (`faster_whisper/assets/silero_vad_v6.onnx`) and runs it on
a whole file at once. Live audio arrives in frames, so this class keeps the model's recurrent
state (h, c) and the 64-sample context between calls; the probabilities are identical to the
whole-file run. The ONNX session is shared (its `run` is thread-safe); the state is per stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

WINDOW = 512  # samples per probability at 16 kHz (32 ms)
CONTEXT = 64


def _session() -> Any:
    from faster_whisper.vad import get_vad_model

    return get_vad_model().session


class StreamingVad:
    """Feed float32 16 kHz samples; get one speech probability per complete 512-sample window."""

    def __init__(self) -> None:
        self._session = _session()
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def __call__(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        audio = np.concatenate([self._pending, samples]) if self._pending.size else samples
        count = audio.size // WINDOW
        self._pending = audio[count * WINDOW :].copy()
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        windows = audio[: count * WINDOW].reshape(count, WINDOW)
        contexts = np.concatenate([self._context[None, :], windows[:-1, -CONTEXT:]], axis=0)
        batch = np.concatenate([contexts, windows], axis=1).astype(np.float32, copy=False)
        feeds = {"input": batch, "h": self._h, "c": self._c}
        out, self._h, self._c = self._session.run(None, feeds)
        self._context = windows[-1, -CONTEXT:].copy()
        probs: npt.NDArray[np.float32] = np.asarray(out, dtype=np.float32).reshape(-1)
        return probs
