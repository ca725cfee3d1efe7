"""The op benchmarks' target verdicts: judged on a GPU, "not judged (CPU smoke run)" on the CPU."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402

TABLE = [dict(img=224, vs_eager=0.01, vs_eager_target="miss", act_ratio=0.2, act_ratio_target="pass")]


@pytest.mark.parametrize("device", ["cpu", "NVIDIA H100 80GB HBM3"])
def test_smoke_verdicts_are_not_judged_on_cpu(tmp_path, capsys, device):
    common.report_targets("soft_split", "soft_split", "targets", [dict(img=224, ms=1.0, status="ok")], TABLE,
                          str(tmp_path), dict(device=device))
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "soft_split_summary.json").read_text())["rows"][0]
    if device == "cpu":
        assert "not judged (CPU smoke run)" in out and "miss" not in out and "pass" not in out
        assert written["vs_eager_target"] == written["act_ratio_target"] == common.NOT_JUDGED
        assert written["vs_eager"] == 0.01  # the measurement itself is kept
    else:
        assert "miss" in out and "pass" in out and written["vs_eager_target"] == "miss"
