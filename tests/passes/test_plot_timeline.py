"""PNG Gantt chart: writes a real image, with and without the memory panel; clear errors."""

from __future__ import annotations

import sys

import pytest

from fxpipe.errors import ScheduleError
from fxpipe.passes.emit_schedule import emit_schedule
from fxpipe.passes.plot_timeline import plot_timeline
from fxpipe.passes.simulate_schedule import simulate_schedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tl(kind="zb-h1", p=2, m=4, memory=True, v=1):
    n = p * v
    return simulate_schedule(emit_schedule(kind, n, m, num_devices=p), [1e-3] * n, [2e-3] * n, [1e-4] * n,
                             activation_bytes=[2.0**20] * n if memory else None)


@pytest.mark.parametrize("memory", [True, False])
def test_writes_a_png(tmp_path, memory):
    pytest.importorskip("matplotlib")
    out = plot_timeline(_tl(memory=memory), tmp_path / "sub" / "t.png", device_names=["gpu0", "gpu1"])
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    # the memory panel makes a taller figure (PNG height: bytes 20..24 of the IHDR chunk)
    height = int.from_bytes(data[20:24], "big")
    assert (height > 300) if memory else (height < 300)


def test_interleaved_and_crowded_charts(tmp_path):
    pytest.importorskip("matplotlib")
    plot_timeline(_tl("interleaved", p=2, m=4, v=2), tmp_path / "il.png", title="interleaved")
    plot_timeline(_tl("gpipe", p=4, m=64, memory=False), tmp_path / "many.png")  # boxes too narrow for labels
    zero = simulate_schedule(emit_schedule("1f1b", 2, 2), [0.0] * 2, [0.0] * 2, [0.0] * 2)
    plot_timeline(zero, tmp_path / "zero.png")
    for name in ("il.png", "many.png", "zero.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_rejects_wrong_device_names(tmp_path):
    with pytest.raises(ScheduleError, match="device_names has 1 entries for 2 devices"):
        plot_timeline(_tl(), tmp_path / "t.png", device_names=["a"])


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ScheduleError, match="pip install matplotlib"):
        plot_timeline(_tl(), tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
