"""Every JSON file hpqdeploy writes carries its format version; readers refuse versions they do not know."""

from __future__ import annotations

import json

import pytest

from hpqdeploy import formats
from hpqdeploy.errors import UserError


@pytest.mark.parametrize("name", sorted(formats.VERSIONS))
def test_stamp_and_check(name, tmp_path):
    blob = formats.stamp(name, {"a": 1, "format_version": 0})
    assert blob == {"format_version": formats.VERSIONS[name], "a": 1}
    assert formats.check(tmp_path / name, blob) is blob
    assert formats.check(tmp_path / name, {"a": 1}) == {"a": 1}  # written before versioning: version 1
    for bad in (formats.VERSIONS[name] + 1, 0, "1", True):
        with pytest.raises(UserError, match="format version"):
            formats.check(tmp_path / name, {"format_version": bad})


def test_export_json_is_versioned_and_report_refuses_a_newer_one(digits_quant, tmp_path):
    from hpqdeploy.config import ExportOptions
    from hpqdeploy.lower.export import run_export
    from hpqdeploy.reporting.collect import read_json

    out = tmp_path / "ort"
    run_export(digits_quant, out, ExportOptions("onnxruntime", eval_limit=16), quiet=True)
    blob = json.loads((out / "export.json").read_text())
    assert blob["format_version"] == formats.VERSIONS["export.json"]
    (out / "export.json").write_text(json.dumps({**blob, "format_version": 7}))
    with pytest.raises(UserError, match="export.json: format version 7"):
        read_json(out / "export.json")
