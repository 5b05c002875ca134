"""Offline speaker diarization: who spoke when, with no network and no torch.

The speaker encoder is Resemblyzer's GE2E d-vector model (a 3-layer LSTM over 40 mel bands,
256-d embeddings, Apache-2.0), whose weights ship inside the `Resemblyzer` 0.1.4 wheel on PyPI
as `resemblyzer/pretrained.pt`. That file is a legacy (non-zip) torch pickle; `load_torch_legacy`
reads it with the standard library's pickle and numpy only, and `convert` stores the weights as
a small `.npz` once (`python -m appliance.core.diarize fetch DATA_DIR` downloads the pinned
wheel from the configured package index, checks its sha256 and converts it). The LSTM then runs
in numpy.

Pipeline: Silero VAD (shipped in faster-whisper) finds speech; each speech region is cut into
1.6 s windows with a 0.8 s hop; each window gets a d-vector; the windows are clustered with
average-linkage agglomerative clustering on cosine distance (stopping at a distance threshold
tuned on real recordings when the number of speakers is not given, at `num_speakers` when it
is); each window labels the centre of its span; consecutive same-speaker spans become turns.
Segments and words then take the speaker they overlap most.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import io
import pickle
import shutil
import struct
import sys
import tempfile
import threading
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from appliance.core.engines.base import SAMPLE_RATE, Audio, Segment, TranscribeOptions
from appliance.core.package_index import file_url

FloatArray = npt.NDArray[np.float32]

WHEEL = "Resemblyzer-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f"
WEIGHTS_MEMBER = "resemblyzer/pretrained.pt"
WEIGHTS_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
NPZ_NAME = "speaker-ge2e.npz"

N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
WINDOW_FRAMES = 160  # 1.6 s, the encoder's training length
HOP_FRAMES = 60  # 0.6 s
MIN_FRAMES = 40  # speech shorter than 0.4 s gets no embedding of its own
# Average-linkage cosine distance at which clusters stop merging (tuned on the AMI excerpts of
# pyannote.audio's sdist and jfk.wav, see bench/diarize_bench.py)
THRESHOLD = 0.35
SPECTRAL_PRUNE = 0.2  # share of neighbours each window keeps in the affinity matrix
MAX_AHC = 600
MAX_SPEAKERS = 10  # the most speakers counted when no bound is given
MIN_SHARE = 0.2  # the least share of speech windows a speaker must have
# A two-way split whose within-minus-between similarity is under this is one speaker (tuned on
# jfk.wav, the LibriVox utterances and the AMI excerpts: see bench/diarize_bench.py)
ONE_SPEAKER_GAP = 0.06  # windows clustered exactly; the rest join the nearest centroid


class DiarizationUnavailable(RuntimeError):
    """The speaker model is not installed."""


@dataclass(frozen=True)
class SpeakerTurn:
    start: float
    end: float
    speaker: str


# ---------------------------------------------------------------------------- weights


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


class _Storage:
    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.data: npt.NDArray[Any] = np.zeros(0, self.dtype)


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> npt.NDArray[Any]:
        data = self.storage.data[self.offset :]
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data, self.size, tuple(s * item for s in self.stride)
        )
        return np.array(view)


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _StateDict(dict[str, Any]):
    """A state dict: torch pickles its `_metadata` as an attribute."""


class _Unpickler(pickle.Unpickler):
    """Understands only what a torch state dict needs; anything else is refused."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return _StateDict
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, _numel, _view = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return self.storages.setdefault(str(key), _Storage(_STORAGE_DTYPES[storage_type]))


def load_torch_legacy(path: Path) -> dict[str, FloatArray]:
    """Read the model state of a legacy-format torch checkpoint without torch."""
    with path.open("rb") as f:
        magic = pickle.load(f)  # noqa: S301 - plain ints and dicts; the model pickle is guarded
        if magic != 0x1950A86A20F9469CFC6C:
            raise ValueError(f"{path} is not a legacy torch checkpoint")
        pickle.load(f)  # noqa: S301 - protocol version
        pickle.load(f)  # noqa: S301 - sys info
        unpickler = _Unpickler(f)
        checkpoint = unpickler.load()
        keys = pickle.load(f)  # noqa: S301 - a list of storage keys
        for key in keys:
            storage = unpickler.storages[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            raw = f.read(count * storage.dtype.itemsize)
            storage.data = np.frombuffer(raw, storage.dtype)
    state = checkpoint.get("model_state", checkpoint)
    return {
        name: ref.array().astype(np.float32)
        for name, ref in state.items()
        if isinstance(ref, _TensorRef)
    }


def convert(pt_path: Path, npz_path: Path) -> Path:
    """Convert the GE2E checkpoint once into an `.npz` the appliance loads."""
    state = load_torch_legacy(pt_path)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{pt_path} lacks {missing}")
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz_path.with_suffix(".tmp.npz")
    arrays: dict[str, Any] = {k: state[k] for k in _REQUIRED}
    np.savez(tmp, **arrays)
    tmp.replace(npz_path)
    return npz_path


_REQUIRED = [
    *(f"lstm.{p}_l{i}" for i in range(3) for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
    "linear.weight",
    "linear.bias",
]


def fetch(data_dir: Path, index: str | None = None) -> Path:
    """Download the pinned Resemblyzer wheel, check it, and convert its encoder weights."""

    target = data_dir / "models" / NPZ_NAME
    url = file_url("resemblyzer", WHEEL, index)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(tmp) / WHEEL
        with urllib.request.urlopen(url, timeout=300) as r, wheel.open("wb") as f:  # noqa: S310
            shutil.copyfileobj(r, f)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{WHEEL}: sha256 {digest} does not match the pin {WHEEL_SHA256}")
        pt = Path(tmp) / "pretrained.pt"
        with zipfile.ZipFile(wheel) as zf:
            pt.write_bytes(zf.read(WEIGHTS_MEMBER))
        return convert(pt, target)


def _install_model_dirs(prefix: Path) -> tuple[Path, ...]:
    """`models/` of the install the app runs from: the folder above its virtual environment
    (the Docker image: /opt/whisper-appliance/venv), or the Ansible role's install home above
    `releases/<version>/venv` or `current/venv`; then the default home, /opt/whisper-appliance."""
    above = prefix.parent
    homes = [above]
    if above.name == "current" or above.parent.name == "releases":
        homes = [above.parent if above.name == "current" else above.parent.parent]
    homes.append(Path("/opt/whisper-appliance"))
    return tuple(dict.fromkeys(home / "models" for home in homes))


# Where a deploy ships the converted weights outside the data dir (from the wheelhouse's
# models/, written by `make dist`): the Dockerfile and the Ansible role (so the CT template too,
# whose data dir is emptied) put them in the install's models/ folder, root's and read-only.
PACKAGED_MODEL_DIRS: tuple[Path, ...] = _install_model_dirs(Path(sys.prefix))


def weight_locations(data_dir: Path | None) -> list[Path]:
    """The converted weights' candidate paths, first found wins: DATA_DIR/models (what `fetch`
    writes, and where an operator may put a copy), then the install's models/ folder."""
    dirs = [data_dir / "models"] if data_dir is not None else []
    return [d / NPZ_NAME for d in (*dirs, *PACKAGED_MODEL_DIRS)]


def find_weights(data_dir: Path | None) -> Path | None:
    """The converted weights (see `weight_locations`), else Resemblyzer's own file if it is
    installed."""
    for candidate in weight_locations(data_dir):
        if candidate.is_file():
            return candidate
    spec = importlib.util.find_spec("resemblyzer")  # finds the package without importing torch
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            pt = Path(location) / "pretrained.pt"
            if pt.is_file():
                return pt
    return None


# ---------------------------------------------------------------------------- encoder


def _mel_filters(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> FloatArray:
    """librosa's default (Slaney) mel filterbank, as Resemblyzer was trained with."""
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0

    def hz_to_mel(f: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        mel = f / f_sp
        high = f >= min_log_hz
        mel[high] = min_log_mel + np.log(f[high] / min_log_hz) / logstep
        return mel

    def mel_to_hz(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        f = f_sp * m
        high = m >= min_log_mel
        f[high] = min_log_hz * np.exp(logstep * (m[high] - min_log_mel))
        return f

    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    edges = hz_to_mel(np.array([0.0, sr / 2]))
    mel_f = mel_to_hz(np.linspace(edges[0], edges[1], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def mel_spectrogram(audio: Audio) -> FloatArray:
    """Power mel spectrogram (frames, 40), librosa.feature.melspectrogram's defaults."""
    pad = N_FFT // 2
    padded = np.pad(
        audio.astype(np.float32), pad, mode="reflect" if len(audio) > pad else "constant"
    )
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    spectrum = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2
    return (spectrum.astype(np.float32) @ _MEL.T).astype(np.float32)


_MEL = _mel_filters()


class SpeakerEncoder:
    """Resemblyzer's VoiceEncoder forward pass in numpy."""

    def __init__(self, weights: dict[str, FloatArray]) -> None:
        # PyTorch's gates are (input, forget, cell, output); reorder them to (i, f, o, g) and
        # halve the sigmoid gates' weights, so that one tanh over all four gates gives
        # sigmoid(x) = (tanh(x / 2) + 1) / 2 for the first three and tanh(x) for the last
        self.layers = []
        for i in range(3):
            w_ih, w_hh = weights[f"lstm.weight_ih_l{i}"], weights[f"lstm.weight_hh_l{i}"]
            bias = weights[f"lstm.bias_ih_l{i}"] + weights[f"lstm.bias_hh_l{i}"]
            hidden = w_hh.shape[1]
            order = np.r_[0 : 2 * hidden, 3 * hidden : 4 * hidden, 2 * hidden : 3 * hidden]
            scale = np.r_[np.full(3 * hidden, 0.5), np.ones(hidden)].astype(np.float32)
            self.layers.append(
                (
                    np.ascontiguousarray((w_ih[order] * scale[:, None]).T),
                    np.ascontiguousarray((w_hh[order] * scale[:, None]).T),
                    (bias[order] * scale).astype(np.float32),
                )
            )
        self.linear_w = np.ascontiguousarray(weights["linear.weight"].T)
        self.linear_b = weights["linear.bias"]

    @classmethod
    def load(cls, path: Path) -> SpeakerEncoder:
        if path.suffix == ".npz":
            with np.load(path) as npz:
                return cls({k: npz[k].astype(np.float32) for k in npz.files})
        return cls(load_torch_legacy(path))

    def embed(self, mels: FloatArray) -> FloatArray:
        """(batch, frames, 40) mel windows of equal length → (batch, 256) unit d-vectors."""
        x = mels.astype(np.float32)
        batch, steps, _ = x.shape
        for w_ih, w_hh, bias in self.layers:
            hidden = w_hh.shape[0]
            proj = (x.reshape(batch * steps, -1) @ w_ih + bias).reshape(batch, steps, -1)
            h = np.zeros((batch, hidden), np.float32)
            c = np.zeros((batch, hidden), np.float32)
            gates = np.empty((batch, 4 * hidden), np.float32)
            outputs = np.empty((batch, steps, hidden), np.float32)
            for t in range(steps):
                np.matmul(h, w_hh, out=gates)
                gates += proj[:, t]
                np.tanh(gates, out=gates)
                sig = gates[:, : 3 * hidden]
                sig *= 0.5
                sig += 0.5
                c *= gates[:, hidden : 2 * hidden]
                c += gates[:, :hidden] * gates[:, 3 * hidden :]
                h = gates[:, 2 * hidden : 3 * hidden] * np.tanh(c)
                outputs[:, t] = h
            x = outputs
        embeds = np.maximum(x[:, -1] @ self.linear_w + self.linear_b, 0.0)
        norms = np.linalg.norm(embeds, axis=1, keepdims=True)
        out: FloatArray = (embeds / np.maximum(norms, 1e-8)).astype(np.float32)
        return out


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the LSTM's many small matrix products on one OpenBLAS thread.

    Threaded OpenBLAS made them 20x slower on a loaded 2-core machine; the appliance runs one
    worker per core anyway. Best effort: without an OpenBLAS we can find, nothing changes.
    """
    global _blas_users, _blas_saved
    lib = _openblas()
    if lib is None:
        yield
        return
    get, set_ = lib
    with _blas_lock:  # workers diarizing at once: the first sets it, the last restores it
        if _blas_users == 0:
            _blas_saved = int(get())
            set_(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                set_(_blas_saved)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = 1


@functools.cache
def _openblas() -> tuple[Any, Any] | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return None


_ENCODERS: dict[Path, SpeakerEncoder] = {}


def get_encoder(data_dir: Path | None) -> SpeakerEncoder:
    path = find_weights(data_dir)
    if path is None:
        raise DiarizationUnavailable(
            "the speaker model is not installed: "
            "run `python -m appliance.core.diarize fetch DATA_DIR`"
        )
    if path not in _ENCODERS:
        _ENCODERS[path] = SpeakerEncoder.load(path)
    return _ENCODERS[path]


# ---------------------------------------------------------------------------- diarization


def speech_regions(audio: Audio) -> list[tuple[int, int]]:
    """Speech as (start, end) sample spans, from the Silero VAD that faster-whisper ships."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(threshold=0.35, min_silence_duration_ms=300, speech_pad_ms=100)
    return [(int(s["start"]), int(s["end"])) for s in get_speech_timestamps(audio, options)]


def _windows(regions: Sequence[tuple[int, int]], n_frames: int) -> list[tuple[int, int, int, int]]:
    """(frame start, frame end, owned start, owned end) windows over the speech regions."""
    out: list[tuple[int, int, int, int]] = []
    for start_sample, end_sample in regions:
        a, b = start_sample // HOP, min(n_frames, end_sample // HOP)
        if b - a < MIN_FRAMES:
            continue
        if b - a <= WINDOW_FRAMES:
            out.append((a, b, a, b))
            continue
        starts = list(range(a, b - WINDOW_FRAMES + 1, HOP_FRAMES))
        if starts[-1] + WINDOW_FRAMES < b:
            starts.append(b - WINDOW_FRAMES)
        for k, s in enumerate(starts):
            centre = s + WINDOW_FRAMES // 2
            own_a = a if k == 0 else (starts[k - 1] + WINDOW_FRAMES // 2 + centre) // 2
            own_b = (
                b if k == len(starts) - 1 else (centre + starts[k + 1] + WINDOW_FRAMES // 2) // 2
            )
            out.append((s, s + WINDOW_FRAMES, own_a, own_b))
    return out


def embed_windows(
    encoder: SpeakerEncoder, mel: FloatArray, windows: Sequence[tuple[int, int, int, int]]
) -> FloatArray:
    by_length: dict[int, list[int]] = {}
    for k, (a, b, _, _) in enumerate(windows):  # lengths in 0.2 s steps: fewer, larger batches
        by_length.setdefault((b - a) // 20 * 20, []).append(k)
    out = np.zeros((len(windows), 256), np.float32)
    for length, members in by_length.items():
        for chunk in range(0, len(members), 256):
            part = members[chunk : chunk + 256]
            batch = np.stack([mel[windows[k][0] : windows[k][0] + length] for k in part])
            out[part] = encoder.embed(batch)
    return out


def _ahc(embeds: FloatArray, n_clusters: int | None, threshold: float) -> npt.NDArray[np.int64]:
    """Average-linkage agglomerative clustering on cosine distance (Lance-Williams updates)."""
    n = len(embeds)
    dist = (1.0 - embeds @ embeds.T).astype(np.float64)
    np.fill_diagonal(dist, np.inf)
    sizes = np.ones(n)
    labels = np.arange(n)
    active = np.ones(n, bool)
    clusters = n
    while clusters > 1:
        flat = int(np.argmin(dist))
        i, j = divmod(flat, n)
        if n_clusters is None and dist[i, j] > threshold:
            break
        if n_clusters is not None and clusters <= n_clusters:
            break
        merged = (sizes[i] * dist[i] + sizes[j] * dist[j]) / (sizes[i] + sizes[j])
        dist[i], dist[:, i] = merged, merged
        dist[i, i] = np.inf
        dist[j], dist[:, j] = np.inf, np.inf
        sizes[i] += sizes[j]
        active[j] = False
        labels[labels == j] = i
        clusters -= 1
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)


def cluster(
    embeds: FloatArray,
    *,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    threshold: float = THRESHOLD,
) -> npt.NDArray[np.int64]:
    """Speaker index per embedding, 0-based, numbered by first appearance."""
    n = len(embeds)
    if n == 0:
        return np.zeros(0, np.int64)
    if num_speakers is not None:
        min_speakers = max_speakers = num_speakers
    lo = max(1, min_speakers or 1)
    hi = min(n, max_speakers or n)
    lo = min(lo, hi)
    pick = np.unique(np.linspace(0, n - 1, min(n, MAX_AHC)).round().astype(np.int64))
    sample = embeds[pick]
    if len(pick) < 4 or hi == 1:
        labels = np.zeros(len(pick), np.int64) if hi == 1 else _ahc(sample, lo, threshold)
        k = int(labels.max()) + 1
    else:
        k, vectors = _spectral(sample, max(lo, 2), min(hi, max(lo, MAX_SPEAKERS)))
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        labels = _kmeans(vectors, k)
        # a "speaker" with under MIN_SHARE of the windows is noise: ask for one fewer
        while k > max(lo, 2) and np.bincount(labels, minlength=k).min() < MIN_SHARE * len(pick):
            k -= 1
            labels = _kmeans(vectors[:, :k], k)
        if lo == 1:  # one speaker, when even the best two-way split does not separate
            two = vectors[:, :2] / np.maximum(
                np.linalg.norm(vectors[:, :2], axis=1, keepdims=True), 1e-12
            )
            if _separation(sample, _kmeans(two, 2)) < ONE_SPEAKER_GAP:
                labels = np.zeros(len(pick), np.int64)
                k = 1
    centroids = np.stack(
        [sample[labels == c].mean(0) if np.any(labels == c) else sample[0] for c in range(k)]
    )
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-8)
    assign = labels if len(pick) == n else np.argmax(embeds @ centroids.T, axis=1)
    order: dict[int, int] = {}
    for a in assign.tolist():
        order.setdefault(int(a), len(order))
    return np.array([order[int(a)] for a in assign], np.int64)


def _spectral(
    embeds: FloatArray, lo: int, hi: int, prune: float = SPECTRAL_PRUNE
) -> tuple[int, npt.NDArray[np.float64]]:
    """Refined-affinity spectral embedding (Wang et al. 2018) and its eigengap speaker count."""
    n = len(embeds)
    affinity = np.clip(embeds @ embeds.T, 0.0, 1.0).astype(np.float64)
    keep = max(2, round(n * prune))
    if keep < n:  # row-wise pruning: each window keeps only its closest neighbours
        cut = np.partition(affinity, n - keep, axis=1)[:, n - keep][:, None]
        affinity = np.where(affinity >= cut, affinity, 0.0)
    affinity = np.maximum(affinity, affinity.T)
    np.fill_diagonal(affinity, 0.0)
    degree = affinity.sum(1)
    laplacian = np.diag(degree) - affinity
    values, vectors = np.linalg.eigh(laplacian)
    hi = min(hi, n - 1)
    if hi <= lo:
        k = lo
    else:
        gaps = np.diff(values[: hi + 1])
        k = lo + int(np.argmax(gaps[lo - 1 : hi]))
    return k, vectors[:, :k]


def _kmeans(points: npt.NDArray[np.float64], k: int, rounds: int = 20) -> npt.NDArray[np.int64]:
    """k-means with farthest-point initialisation (deterministic)."""
    centres = [points[0]]
    for _ in range(1, k):
        d = np.min([np.sum((points - c) ** 2, axis=1) for c in centres], axis=0)
        centres.append(points[int(np.argmax(d))])
    c = np.stack(centres)
    assign = np.zeros(len(points), np.int64)
    for _ in range(rounds):
        assign = np.argmin(((points[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        c = np.stack(
            [points[assign == j].mean(0) if np.any(assign == j) else c[j] for j in range(k)]
        )
    return assign


def _separation(embeds: FloatArray, labels: npt.NDArray[np.int64]) -> float:
    """Mean cosine similarity within clusters minus between them (0 when one cluster)."""
    sim = embeds @ embeds.T
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
    diff = labels[:, None] != labels[None, :]
    if not same.any() or not diff.any():
        return 0.0
    return float(sim[same].mean() - sim[diff].mean())


def _small_clusters(labels: npt.NDArray[np.int64]) -> int:
    counts = np.bincount(labels)
    if len(counts) <= 1:
        return 0
    small = counts < max(2, 0.05 * len(labels))
    return int(min(small.sum(), len(counts) - 1))


def speaker_name(index: int) -> str:
    return f"Speaker {index + 1}"


def diarize(
    audio: Audio,
    *,
    data_dir: Path | None = None,
    encoder: SpeakerEncoder | None = None,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    regions: Sequence[tuple[int, int]] | None = None,
    threshold: float = THRESHOLD,
) -> list[SpeakerTurn]:
    """Speaker turns over the audio (16 kHz mono float32)."""
    encoder = encoder or get_encoder(data_dir)
    if regions is None:
        regions = speech_regions(audio)
    rms = float(np.sqrt(np.mean(np.square(audio)))) if len(audio) else 0.0
    if rms > 0:  # Resemblyzer's preprocessing: raise the level to -30 dBFS, never lower it
        audio = (audio * max(1.0, 10 ** (-30 / 20) / rms)).astype(np.float32)
    mel = mel_spectrogram(audio)
    windows = _windows(regions, len(mel))
    if not windows:
        return []
    with _one_blas_thread():
        embeds = embed_windows(encoder, mel, windows)
    labels = cluster(
        embeds,
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        threshold=threshold,
    )
    turns: list[SpeakerTurn] = []
    for (_, _, own_a, own_b), label in zip(windows, labels.tolist(), strict=True):
        start, end, name = own_a * HOP / SAMPLE_RATE, own_b * HOP / SAMPLE_RATE, speaker_name(label)
        if turns and turns[-1].speaker == name and start - turns[-1].end < 0.5:
            turns[-1] = replace(turns[-1], end=end)
        else:
            turns.append(SpeakerTurn(start, end, name))
    return turns


def _speaker_at(turns: Sequence[SpeakerTurn], start: float, end: float) -> str | None:
    best: dict[str, float] = {}
    for turn in turns:
        overlap = min(end, turn.end) - max(start, turn.start)
        if overlap > 0:
            best[turn.speaker] = best.get(turn.speaker, 0.0) + overlap
    if best:
        return max(best, key=lambda s: best[s])
    if not turns:
        return None
    middle = (start + end) / 2  # no overlap: the nearest turn in time
    return min(turns, key=lambda t: min(abs(t.start - middle), abs(t.end - middle))).speaker


def label_segments(segments: Sequence[Segment], turns: Sequence[SpeakerTurn]) -> list[Segment]:
    """Each word takes the speaker it overlaps most; a segment, its words' majority by time."""
    out: list[Segment] = []
    for segment in segments:
        words = tuple(replace(w, speaker=_speaker_at(turns, w.start, w.end)) for w in segment.words)
        votes: dict[str, float] = {}
        for w in words:
            if w.speaker is not None:
                votes[w.speaker] = votes.get(w.speaker, 0.0) + max(w.end - w.start, 0.01)
        speaker = (
            max(votes, key=lambda s: votes[s])
            if votes
            else _speaker_at(turns, segment.start, segment.end)
        )
        out.append(replace(segment, words=words, speaker=speaker))
    return out


class _Samples(Protocol):
    def __len__(self) -> int: ...
    def read(self, start: int, stop: int) -> Audio: ...


def run(
    samples: _Samples | Audio,
    segments: Sequence[Segment],
    options: TranscribeOptions,
    data_dir: Path | None,
) -> list[Segment]:
    """Label a finished transcription's segments (and words) with speakers."""
    audio = samples if isinstance(samples, np.ndarray) else samples.read(0, len(samples))
    turns = diarize(
        audio,
        data_dir=data_dir,
        num_speakers=options.num_speakers,
        min_speakers=options.min_speakers,
        max_speakers=options.max_speakers,
    )
    return label_segments(segments, turns)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "fetch":
        print(fetch(Path(argv[1])))
        return 0
    if len(argv) == 3 and argv[0] == "convert":
        print(convert(Path(argv[1]), Path(argv[2])))
        return 0
    print("usage: python -m appliance.core.diarize fetch DATA_DIR | convert pretrained.pt out.npz")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
