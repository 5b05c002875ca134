"""Speaker diarization (issue 15): the torch-free weights reader, the numpy LSTM, clustering,
labelling, exports, the API, and DER on real two-speaker recordings with reference turns."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from quart import Quart
from werkzeug.datastructures import FileStorage

from appliance.core import diarize, formats
from appliance.core.engines.base import Segment, Transcript, Word
from appliance.web.api import asr_compat
from tests.conftest import CLIPS, ROOT

NPZ = ROOT / ".cache" / "speaker" / "models" / diarize.NPZ_NAME
AMI = CLIPS / "diarization"


def reference_turns(rttm: Path, uri: str) -> list[tuple[float, float, str]]:
    turns = []
    for line in rttm.read_text().splitlines():
        parts = line.split()
        if parts and parts[1] == uri:
            turns.append((float(parts[3]), float(parts[3]) + float(parts[4]), parts[7]))
    return turns


def der(reference: list[tuple[float, float, str]], turns: list[diarize.SpeakerTurn]) -> float:
    from pyannote.core import Annotation
    from pyannote.core import Segment as Span
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref, hyp = Annotation(), Annotation()
    for start, end, who in reference:
        ref[Span(start, end)] = who
    for t in turns:
        hyp[Span(t.start, t.end)] = t.speaker
    return float(DiarizationErrorRate(collar=0.25)(ref, hyp, uem=ref.get_timeline().extent()))


@pytest.fixture(scope="module")
def encoder() -> diarize.SpeakerEncoder:
    if not NPZ.is_file():
        pytest.fail("speaker model missing: run `make setup` (scripts/bootstrap.sh)")
    return diarize.SpeakerEncoder.load(NPZ)


def load(path: Path) -> np.ndarray:
    from appliance.core.audio import decode

    return decode(path)


# --- the weights: a legacy torch checkpoint read with pickle and numpy only ------------------


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> type:
    """A stand-in `torch` module, just enough to write a legacy-format checkpoint."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: object) -> None: ...

    class FloatStorage:
        pass

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    torch.FloatStorage = FloatStorage  # type: ignore[attr-defined]
    torch._utils = utils  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return FloatStorage


def write_legacy(path: Path, state: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    storage_cls = _fake_torch(monkeypatch)
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2  # type: ignore[attr-defined]

    class Ref:
        def __init__(self, key: str, array: np.ndarray) -> None:
            self.key, self.array = key, array

        def __reduce__(self) -> tuple[object, ...]:
            shape = self.array.shape
            strides = tuple(s // 4 for s in np.zeros(shape, np.float32).strides)
            return (rebuild, (StorageRef(self.key, self.array.size), 0, shape, strides, False, {}))

    class StorageRef:
        def __init__(self, key: str, numel: int) -> None:
            self.key, self.numel = key, numel

    class Writer(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, StorageRef):
                return ("storage", storage_cls, obj.key, "cpu", obj.numel, None)
            return None

    buffer = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buffer, protocol=2)
    pickle.dump(1001, buffer, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True}, buffer, protocol=2)
    keys = [str(i) for i in range(len(state))]
    model_state = OrderedDict(
        (name, Ref(key, arr)) for key, (name, arr) in zip(keys, state.items(), strict=True)
    )
    Writer(buffer, protocol=2).dump({"step": 1, "model_state": model_state})
    pickle.dump(keys, buffer, protocol=2)
    for arr in state.values():
        buffer.write(np.int64(arr.size).tobytes())
        buffer.write(np.ascontiguousarray(arr, np.float32).tobytes())
    path.write_bytes(buffer.getvalue())


def tiny_state(hidden: int = 4, n_in: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for layer in range(3):
        width = n_in if layer == 0 else hidden
        state[f"lstm.weight_ih_l{layer}"] = rng.normal(size=(4 * hidden, width)).astype(np.float32)
        state[f"lstm.weight_hh_l{layer}"] = rng.normal(size=(4 * hidden, hidden)).astype(np.float32)
        state[f"lstm.bias_ih_l{layer}"] = rng.normal(size=4 * hidden).astype(np.float32)
        state[f"lstm.bias_hh_l{layer}"] = rng.normal(size=4 * hidden).astype(np.float32)
    state["linear.weight"] = rng.normal(size=(hidden, hidden)).astype(np.float32)
    state["linear.bias"] = rng.normal(size=hidden).astype(np.float32)
    return state


def test_legacy_checkpoint_converts_without_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tiny_state()
    pt = tmp_path / "pretrained.pt"
    with monkeypatch.context() as m:
        write_legacy(pt, state, m)
    # other tests may have imported torch already: block it, so a torch import here fails
    monkeypatch.setitem(sys.modules, "torch", None)
    loaded = diarize.load_torch_legacy(pt)
    for name, arr in state.items():
        np.testing.assert_array_equal(loaded[name], arr)
    npz = diarize.convert(pt, tmp_path / "models" / diarize.NPZ_NAME)
    assert diarize.find_weights(tmp_path) == npz
    a = diarize.SpeakerEncoder.load(pt).embed(np.ones((1, 5, 40), np.float32))
    b = diarize.SpeakerEncoder.load(npz).embed(np.ones((1, 5, 40), np.float32))
    np.testing.assert_array_equal(a, b)


def test_a_weights_file_cannot_run_code(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f)
        pickle.dump(1001, f)
        pickle.dump({}, f)
        f.write(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing os\.system"):
        diarize.load_torch_legacy(evil)


def test_numpy_lstm_matches_a_step_by_step_reference() -> None:
    state = tiny_state(hidden=3, seed=1)
    x = np.random.default_rng(2).normal(size=(2, 7, 40)).astype(np.float32)

    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-v))

    expected = []
    for sequence in x:
        inputs = list(sequence)
        for layer in range(3):
            w_ih, w_hh = state[f"lstm.weight_ih_l{layer}"], state[f"lstm.weight_hh_l{layer}"]
            bias = state[f"lstm.bias_ih_l{layer}"] + state[f"lstm.bias_hh_l{layer}"]
            h, c, outputs = np.zeros(3), np.zeros(3), []
            for step in inputs:  # PyTorch's gate order: input, forget, cell, output
                i, f, g, o = np.split(w_ih @ step + w_hh @ h + bias, 4)
                c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
                h = sigmoid(o) * np.tanh(c)
                outputs.append(h)
            inputs = outputs
        e = np.maximum(state["linear.weight"] @ inputs[-1] + state["linear.bias"], 0)
        expected.append(e / max(np.linalg.norm(e), 1e-8))
    got = diarize.SpeakerEncoder(state).embed(x)
    np.testing.assert_allclose(got, np.array(expected), atol=1e-5)


def test_mel_filterbank_is_librosas_slaney() -> None:
    bank = diarize._mel_filters()
    assert bank.shape == (40, 201)
    assert (bank >= 0).all() and (bank.sum(1) > 0).all()
    peaks = bank.argmax(1)
    assert (np.diff(peaks) >= 0).all()  # bands ascend in frequency
    # Slaney norm: each triangle's area is ~2 / bandwidth-in-Hz * (bandwidth / 2) = constant
    hz_per_bin = 8000 / 200
    areas = bank.sum(1) * hz_per_bin
    assert np.allclose(areas[5:], 1.0, atol=0.15)


# --- clustering and labelling ---------------------------------------------------------------


def synthetic(speakers: int, per: int = 30, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(speakers, 256))
    points = np.concatenate(
        [c + spread * np.linalg.norm(c) / 16 * rng.normal(size=(per, 256)) for c in centres]
    )
    points = np.abs(points)  # d-vectors are non-negative (ReLU)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_cluster_counts_and_bounds() -> None:
    two = synthetic(2)
    labels = diarize.cluster(two)
    assert len(set(labels.tolist())) == 2
    assert labels[0] == 0  # numbered by first appearance
    assert len(set(diarize.cluster(two, num_speakers=3).tolist())) == 3
    assert len(set(diarize.cluster(two, max_speakers=1).tolist())) == 1
    assert len(set(diarize.cluster(synthetic(1)).tolist())) == 1
    assert diarize.cluster(np.zeros((0, 256), np.float32)).size == 0


def test_segments_and_words_take_the_speaker_they_overlap() -> None:
    turns = [
        diarize.SpeakerTurn(0.0, 2.0, "Speaker 1"),
        diarize.SpeakerTurn(2.0, 5.0, "Speaker 2"),
    ]
    words = (Word(0.2, 0.8, " Hi", 0.9), Word(2.2, 2.6, " yes", 0.9), Word(2.6, 4.0, " sure", 0.9))
    segments = [Segment(0, 0.0, 4.0, " Hi yes sure", words), Segment(1, 6.0, 7.0, " late")]
    labelled = diarize.label_segments(segments, turns)
    assert [w.speaker for w in labelled[0].words] == ["Speaker 1", "Speaker 2", "Speaker 2"]
    assert labelled[0].speaker == "Speaker 2"  # most of the words' time
    assert labelled[1].speaker == "Speaker 2"  # no overlap: the nearest turn


def test_every_export_carries_the_labels() -> None:
    segments = [
        Segment(
            0,
            0.0,
            1.0,
            " Hello.",
            (Word(0.0, 1.0, " Hello.", 1.0, "Speaker 1"),),
            speaker="Speaker 1",
        ),
        Segment(
            1, 1.0, 2.0, " Hi.", (Word(1.0, 2.0, " Hi.", 1.0, "Speaker 2"),), speaker="Speaker 2"
        ),
    ]
    t = Transcript(text="Hello. Hi.", segments=segments, language="en", duration=2.0)
    assert "[Speaker 1] Hello." in formats.render(t, "txt")
    assert "[Speaker 2] Hi." in formats.render(t, "srt")
    assert "<v Speaker 2>Hi." in formats.render(t, "vtt")
    assert formats.render(t, "tsv").splitlines()[1].split("\t")[2] == "Speaker 1"
    data = json.loads(formats.render(t, "json"))
    assert [s["speaker"] for s in data["segments"]] == ["Speaker 1", "Speaker 2"]
    assert [w["speaker"] for w in data["words"]] == ["Speaker 1", "Speaker 2"]
    # whisper-asr-webservice's own renderer (/asr)
    assert "[Speaker 2] Hi." in asr_compat.render(t, "txt", None)
    assert "<v Speaker 1>Hello." in asr_compat.render(t, "vtt", None)
    assert json.loads(asr_compat.render(t, "json", None))["segments"][1]["speaker"] == "Speaker 2"


# --- real recordings ------------------------------------------------------------------------


def test_two_speaker_meeting_finds_two_speakers_and_low_der(
    encoder: diarize.SpeakerEncoder,
) -> None:
    turns = diarize.diarize(load(AMI / "sample.wav"), encoder=encoder)
    assert {t.speaker for t in turns} == {"Speaker 1", "Speaker 2"}
    error = der(reference_turns(AMI / "sample.rttm", "sample"), turns)
    assert error <= 0.20, f"DER {error:.1%}"


def test_known_speaker_count_on_a_second_recording(encoder: diarize.SpeakerEncoder) -> None:
    turns = diarize.diarize(load(AMI / "dev00.wav"), encoder=encoder, num_speakers=2)
    assert len({t.speaker for t in turns}) == 2
    error = der(reference_turns(AMI / "debug.development.rttm", "dev00"), turns)
    assert error <= 0.25, f"DER {error:.1%}"


def test_one_speaker_clip_finds_one_speaker(encoder: diarize.SpeakerEncoder, jfk_wav: Path) -> None:
    turns = diarize.diarize(load(jfk_wav), encoder=encoder)
    assert {t.speaker for t in turns} == {"Speaker 1"}


# --- through the API ------------------------------------------------------------------------


@pytest.fixture
def speaker_model(app: Quart) -> Path:
    if not NPZ.is_file():
        pytest.fail("speaker model missing: run `make setup` (scripts/bootstrap.sh)")
    target = app.extensions["appliance"].settings.data_dir / "models" / diarize.NPZ_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(NPZ, target)
    return target


def wav(path: Path) -> FileStorage:
    return FileStorage(io.BytesIO(path.read_bytes()), filename=path.name)


async def test_transcribe_and_openai_diarized_json(app: Quart, speaker_model: Path) -> None:
    client = app.test_client()
    response = await client.post(
        "/transcribe",
        files={"file": wav(AMI / "sample.wav")},
        form={"diarize": "true", "word_timestamps": "true"},
    )
    assert response.status_code == 200, await response.get_data(as_text=True)
    body = await response.get_json()
    assert {s["speaker"] for s in body["segments"]} == {"Speaker 1", "Speaker 2"}
    assert all(w.get("speaker") for w in body["words"])
    assert body["timings"]["diarize_seconds"] > 0

    response = await client.post(
        "/v1/audio/transcriptions",
        files={"file": wav(AMI / "sample.wav")},
        form={"model": "whisper-1", "response_format": "diarized_json", "num_speakers": "2"},
    )
    assert response.status_code == 200, await response.get_data(as_text=True)
    body = await response.get_json()
    assert body["text"]
    assert {s["speaker"] for s in body["segments"]} == {"Speaker 1", "Speaker 2"}
    first = body["segments"][0]
    assert set(first) >= {"type", "id", "speaker", "start", "end", "text"}
    assert first["type"] == "transcript.text.segment"


async def test_streaming_diarized_json_ends_with_segment_events(
    app: Quart, speaker_model: Path
) -> None:
    response = await app.test_client().post(
        "/v1/audio/transcriptions",
        files={"file": wav(AMI / "sample.wav")},
        form={
            "model": "whisper-1",
            "response_format": "diarized_json",
            "stream": "true",
            "num_speakers": "2",
        },
    )
    assert response.status_code == 200, await response.get_data(as_text=True)
    body = await response.get_data(as_text=True)
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "transcript.text.done"
    segments = [e for e in events if e["type"] == "transcript.text.segment"]
    assert segments and kinds.index("transcript.text.segment") > kinds.index(
        "transcript.text.delta"
    )
    assert {e["speaker"] for e in segments} == {"Speaker 1", "Speaker 2"}


async def test_diarize_without_the_model_is_a_clear_503(app: Quart, jfk_wav: Path) -> None:
    response = await app.test_client().post(
        "/transcribe", files={"file": wav(jfk_wav)}, form={"diarize": "true"}
    )
    if diarize.find_weights(app.extensions["appliance"].settings.data_dir) is not None:
        pytest.skip("a speaker model is installed system-wide (resemblyzer)")
    assert response.status_code == 503
    assert (await response.get_json())["error"]["code"] == "diarization_unavailable"


async def test_bad_speaker_counts_are_refused(app: Quart, jfk_wav: Path) -> None:
    client = app.test_client()
    for form in ({"num_speakers": "0"}, {"min_speakers": "3", "max_speakers": "2"}):
        response = await client.post("/transcribe", files={"file": wav(jfk_wav)}, form=form)
        assert response.status_code == 400, form
