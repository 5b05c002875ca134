"""CTranslate2 Whisper model directory -> openai-whisper checkpoint (`.pt`).

Owns reading CTranslate2's `model.bin` (the format its own `ModelSpec._serialize` writes: a
header, then named little-endian tensors, then aliases), renaming the weights to openai-whisper's
state-dict names (they map one to one; CTranslate2 only fuses q/k/v into one matrix) and caching
the converted checkpoint so the conversion runs once per model.

Only float weights convert: int8/int16 CTranslate2 models were quantised at conversion time and
their float weights are gone. Reading needs numpy only; writing the `.pt` needs torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from appliance.exceptions import ApplianceError

# Bump when the produced checkpoint changes, so stale cached checkpoints are rebuilt.
CONVERTER_VERSION = 1
# CTranslate2 >= 3 writes binary version 6 (include/ctranslate2/models/model.h); the layout
# read here has been stable since version 5.
SUPPORTED_BINARY_VERSIONS = (5, 6)
# Order of the DataType enum in include/ctranslate2/types.h.
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_QUANTISED = ("int8", "int16")

Array = npt.NDArray[np.generic]


class ConversionError(ApplianceError, ValueError):
    """The model directory cannot be turned into an openai-whisper checkpoint."""


@dataclass(frozen=True)
class CT2Model:
    """The variables of a CTranslate2 `model.bin`, as numpy arrays (bfloat16 widened)."""

    spec: str
    revision: int
    variables: dict[str, Array]
    dtypes: dict[str, str]
    aliases: dict[str, str]


def _read_exact(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise ConversionError(f"{f.name}: truncated CTranslate2 model file")
    return data


def _read(f: BinaryIO, fmt: str) -> int:
    value: int = struct.unpack("<" + fmt, _read_exact(f, struct.calcsize(fmt)))[0]
    return value


def _read_string(f: BinaryIO) -> str:
    size = _read(f, "H")  # length including the trailing NUL
    return _read_exact(f, size)[:-1].decode("utf-8")


def read_ct2_model(path: Path) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (ctranslate2's Python API does not expose weights)."""
    variables: dict[str, Array] = {}
    dtypes: dict[str, str] = {}
    aliases: dict[str, str] = {}
    with path.open("rb") as f:
        version = _read(f, "I")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise ConversionError(
                f"{path}: CTranslate2 binary version {version} is not supported "
                f"(supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))})"
            )
        spec = _read_string(f)
        revision = _read(f, "I")
        for _ in range(_read(f, "I")):
            name = _read_string(f)
            shape = tuple(_read(f, "I") for _ in range(_read(f, "B")))
            type_id = _read(f, "B")
            if type_id >= len(_CT2_DTYPES):
                raise ConversionError(f"{path}: variable {name} has unknown type id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            raw = _read_exact(f, _read(f, "I"))
            dtypes[name] = dtype
            variables[name] = _to_array(raw, dtype, shape)
        for _ in range(_read(f, "I")):
            alias = _read_string(f)
            aliases[alias] = _read_string(f)
    return CT2Model(spec, revision, variables, dtypes, aliases)


def _to_array(raw: bytes, dtype: str, shape: tuple[int, ...]) -> Array:
    if dtype == "bfloat16":  # numpy has no bfloat16: it is the top half of a float32
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


# Variables that describe the architecture rather than hold weights.
_SETTINGS = re.compile(
    r"(encoder|decoder)/(num_heads|activation|alibi|alignment_heads|alignment_layer|pre_norm|"
    r"scale_embeddings|start_from_zero_embedding)"
)
_LAYER = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)")
# CTranslate2 name inside a layer -> openai-whisper name inside `blocks.N`, for weights that
# are not fused. Layer norms use gamma/beta where torch uses weight/bias.
_LAYER_NAMES = {
    "self_attention/linear_1": "attn.out",
    "self_attention/layer_norm": "attn_ln",
    "attention/linear_0": "cross_attn.query",
    "attention/linear_2": "cross_attn.out",
    "attention/layer_norm": "cross_attn_ln",
    "ffn/linear_0": "mlp.0",
    "ffn/linear_1": "mlp.2",
    "ffn/layer_norm": "mlp_ln",
}
_TOP_NAMES = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.ln_post",
    "encoder/position_encodings/encodings": "encoder.positional_embedding",
    "decoder/embeddings/weight": "decoder.token_embedding.weight",
    "decoder/position_encodings/encodings": "decoder.positional_embedding",
    "decoder/layer_norm": "decoder.ln",
}
_SUFFIXES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def _split_fused(
    prefix: str, kind: str, value: Array, out: dict[str, Array], parts: tuple[str, ...]
) -> None:
    """CTranslate2 fuses q,k,v (self-attention) or k,v (cross-attention) along dim 0."""
    for part, chunk in zip(parts, np.split(value, len(parts), axis=0), strict=True):
        if kind == "bias" and part == "key":
            # openai-whisper's key projection has no bias, and a key bias cannot change the
            # attention (it adds q.b to every score of a row, which softmax cancels).
            continue
        out[f"{prefix}.{part}.{kind}"] = chunk


def to_openai_state_dict(model: CT2Model) -> tuple[dict[str, int], dict[str, Array]]:
    """Rename a CTranslate2 Whisper model's weights to openai-whisper's; returns (dims, state)."""
    if model.spec != "WhisperSpec":
        raise ConversionError(f"not a Whisper model: CTranslate2 spec is {model.spec!r}")
    quantised = sorted(
        name
        for name, dtype in model.dtypes.items()
        if name.endswith("_scale") or (dtype in _QUANTISED and model.variables[name].ndim >= 2)
    )
    if quantised:
        kind = model.dtypes.get(quantised[0].removesuffix("_scale"), model.dtypes[quantised[0]])
        raise ConversionError(
            f"this CTranslate2 model stores {kind} weights (e.g. {quantised[0]}): quantised "
            "weights cannot be converted back to float for openai-whisper. Use a model converted "
            "with --quantization float16 or float32 (faster-whisper can still run it as int8)."
        )
    state: dict[str, Array] = {}
    layers = {"encoder": set(), "decoder": set()}  # type: dict[str, set[int]]
    for name, value in model.variables.items():
        if _SETTINGS.fullmatch(name):
            continue
        if (m := _LAYER.fullmatch(name)) is not None:
            side, index, rest = m.group(1), int(m.group(2)), m.group(3)
            layers[side].add(index)
            prefix = f"{side}.blocks.{index}"
            module, _, kind = rest.rpartition("/")
            if module == "self_attention/linear_0":
                _split_fused(f"{prefix}.attn", kind, value, state, ("query", "key", "value"))
            elif module == "attention/linear_1":
                _split_fused(f"{prefix}.cross_attn", kind, value, state, ("key", "value"))
            elif module in _LAYER_NAMES and kind in _SUFFIXES:
                state[f"{prefix}.{_LAYER_NAMES[module]}.{_SUFFIXES[kind]}"] = value
            else:
                raise ConversionError(f"unexpected CTranslate2 variable {name}")
            continue
        if name in _TOP_NAMES:
            state[_TOP_NAMES[name]] = value
            continue
        module, _, kind = name.rpartition("/")
        if module in _TOP_NAMES and kind in _SUFFIXES:
            state[f"{_TOP_NAMES[module]}.{_SUFFIXES[kind]}"] = value
            continue
        raise ConversionError(f"unexpected CTranslate2 variable {name}")
    # The output projection is an alias of the token embedding (tied weights) in both formats.
    unknown_aliases = set(model.aliases) - {"decoder/projection/weight"}
    if unknown_aliases:
        raise ConversionError(f"unexpected CTranslate2 aliases {sorted(unknown_aliases)}")

    def count(side: str) -> int:
        found = layers[side]
        if found != set(range(len(found))):
            raise ConversionError(f"{side} layers are not numbered 0..N-1: {sorted(found)}")
        return len(found)

    def heads(side: str) -> int:
        return int(model.variables[f"{side}/num_heads"].item())

    try:
        dims = {
            "n_mels": int(state["encoder.conv1.weight"].shape[1]),
            "n_audio_ctx": int(state["encoder.positional_embedding"].shape[0]),
            "n_audio_state": int(state["encoder.positional_embedding"].shape[1]),
            "n_audio_head": heads("encoder"),
            "n_audio_layer": count("encoder"),
            "n_vocab": int(state["decoder.token_embedding.weight"].shape[0]),
            "n_text_ctx": int(state["decoder.positional_embedding"].shape[0]),
            "n_text_state": int(state["decoder.positional_embedding"].shape[1]),
            "n_text_head": heads("decoder"),
            "n_text_layer": count("decoder"),
        }
    except KeyError as exc:
        raise ConversionError(f"incomplete CTranslate2 Whisper model: {exc} is missing") from exc
    return dims, state


def convert(model_dir: Path, output: Path) -> Path:
    """Write `output` (an openai-whisper checkpoint) from the CTranslate2 model in `model_dir`."""
    model_bin = model_dir / "model.bin"
    if not model_bin.is_file():
        raise ConversionError(f"{model_dir} holds no CTranslate2 model.bin")
    dims, state = to_openai_state_dict(read_ct2_model(model_bin))
    import torch  # only now: refusing an int8 model must not need the optional extra

    # torch.from_numpy wants writable arrays; copy() also detaches them from the file buffer.
    checkpoint = {
        "dims": dims,
        "model_state_dict": {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a checkpoint.
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=".convert-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        Path(tmp).replace(output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "whisper-appliance" / "openai-whisper"


def _fingerprint(model_dir: Path) -> str:
    """Cheap identity of the model file: a changed model.bin gets a new checkpoint."""
    st = (model_dir / "model.bin").stat()
    key = f"{model_dir.resolve()}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _can_cache_next_to(model_dir: Path) -> bool:
    # Never write into an installed package (bundled models): pip would not remove the file.
    if {"site-packages", "dist-packages"} & set(model_dir.resolve().parts):
        return False
    return model_dir.is_dir() and os.access(model_dir, os.W_OK | os.X_OK)


def converted_checkpoint(model_dir: Path, cache_dir: Path | None = None) -> Path:
    """Path of the openai-whisper checkpoint for `model_dir`, converting it on first use.

    The checkpoint is cached in `cache_dir` when given, else next to the model when that
    directory is writable and not part of an installed package, else in `default_cache_dir()`.
    """
    if not (model_dir / "model.bin").is_file():
        raise ConversionError(f"{model_dir} holds no CTranslate2 model.bin")
    name = f"openai-whisper-{_fingerprint(model_dir)}.pt"
    if cache_dir is None:
        cache_dir = model_dir if _can_cache_next_to(model_dir) else default_cache_dir()
    target = cache_dir / name
    if target.is_file():
        return target
    return convert(model_dir, target)


def alignment_heads(model_dir: Path) -> list[tuple[int, int]] | None:
    """The (layer, head) pairs used for word timestamps, from the model's config.json."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    heads = config.get("alignment_heads") if isinstance(config, dict) else None
    if not isinstance(heads, list) or not heads:
        return None
    return [(int(layer), int(head)) for layer, head in heads]
