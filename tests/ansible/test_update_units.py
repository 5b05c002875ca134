"""The repository's updater units (systemd/whisper-appliance-update.*) are the role's templates
rendered with its defaults, and they point at the paths the code uses."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import yaml

from appliance.system.update import spool as update_spool
from appliance.system.update.release import DEFAULT_KEY_DIR

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("whisper-appliance-update.service", "whisper-appliance-update.path")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_the_rendered_template(unit: str) -> None:
    defaults = yaml.safe_load((ROOT / "roles/whisper_appliance/defaults/main.yml").read_text())
    template = (ROOT / "roles/whisper_appliance/templates" / f"{unit}.j2").read_text()
    env = jinja2.Environment(  # noqa: S701 - a systemd unit, not HTML
        keep_trailing_newline=True, trim_blocks=True, undefined=jinja2.StrictUndefined
    )
    rendered = env.from_string(template).render(**defaults, ansible_managed="managed")
    static = (ROOT / "systemd" / unit).read_text()
    assert rendered[rendered.index("[Unit]") :] == static[static.index("[Unit]") :]


def test_units_match_the_code() -> None:
    path = (ROOT / "systemd/whisper-appliance-update.path").read_text()
    spool = f"/var/lib/whisper-appliance/{update_spool.SPOOL}"
    assert f"PathExists={spool}/{update_spool.REQUEST}\n" in path
    assert f"PathExistsGlob={spool}/{update_spool.PROCESSING_PREFIX}*.json\n" in path
    service = (ROOT / "systemd/whisper-appliance-update.service").read_text()
    assert "Type=oneshot\n" in service
    assert "-m appliance.updater run-request\n" in service
    assert f"UPDATER_KEY_DIR={DEFAULT_KEY_DIR}\n" in service
    assert "EnvironmentFile=-/etc/whisper-appliance/updater.env\n" in service
