"""benchmarks/plot.py: the markdown table and the speed-up chart (matplotlib, the demo report's stack)."""

from __future__ import annotations

import json

import pytest

from benchmarks import plot


def _bench(provider: str, ms: float) -> dict:
    info = {"provider": provider, "op": "cfg_euler", "shape": [4, 16, 64, 64], "shape_name": "sd3_512_B4"}
    info.update(mode="fwd", dtype="fp32", ms_p50=ms, gb_per_s=10.0, peak_extra_memory_bytes=4 * 262144)
    return {"extra_info": info, "stats": {"median": ms * 1e-3}}


def test_table_and_speedup_chart(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": [_bench("torch", 2.0), _bench("flowkern_cpp", 0.5)]}))
    png = tmp_path / "speedup.png"
    plot.main([str(path), "--png", str(png)])
    table = capsys.readouterr().out
    assert "| cfg_euler | sd3_512_B4 | fwd | fp32 | 2.000 | - | 0.500 (cpp) | 4.00x | - |" in table
    with Image.open(png) as image:
        assert image.width == 1000 and image.height == 130
        assert (31, 119, 180) in {c for _, c in image.convert("RGB").getcolors(1000 * 130)}  # the bar
    path.write_text(json.dumps({"benchmarks": [_bench("flowkern_cpp", 0.5)]}))
    with pytest.raises(SystemExit, match="nothing to chart"):
        plot.main([str(path), "--png", str(png)])


def test_per_op_charts(tmp_path):
    from PIL import Image

    rows = [_bench("torch", 2.0), _bench("flowkern_cpp", 0.5), _bench("flowkern_cuda", 0.25)]
    rows[2]["extra_info"].update(fraction_of_copy_bandwidth=0.9)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": rows}))
    plot.main([str(path), "--charts", str(tmp_path / "charts")])
    with Image.open(tmp_path / "charts" / "cfg_euler.png") as image:
        assert image.size == (600, 700)
        colours = {c for _, c in image.convert("RGB").getcolors(600 * 700)}
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours  # a bar per provider
