"""The next release for the rolling update test: the `make dist` wheelhouse with the appliance
wheel rebuilt at version N+update1 (scripts/build_test_releases.py's way). Prints the version.

usage: next_wheelhouse.py WHEELHOUSE OUT
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from build_test_releases import build_wheel, bumped, wheelhouse_with  # type: ignore[import-not-found]

base, out = Path(sys.argv[1]), Path(sys.argv[2])
version = bumped((base / "VERSION").read_text().strip(), 1)
shutil.rmtree(out, ignore_errors=True)
with tempfile.TemporaryDirectory() as work:
    wheel = build_wheel(version, Path(work) / "wheel", Path(work))
    wheelhouse_with(base, wheel, version, out)
print(version)
