"""Confidence intervals (t quantile, bootstrap) and the report: IE table strings, PNG plots, atomic writes."""

import csv
import io
import math
import os

import pytest

from analyses import report
from analyses.report import (
    IECell,
    ie_table_csv,
    ie_table_markdown,
    plot_ie_bars,
    plot_mds_distributions,
    plot_sink_frequency_histogram,
    plot_sinks_per_layer,
    save_figure,
)
from analyses.stats import MeanCI, betainc, mean_ci, t_cdf, t_quantile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000  # an empty 640x400 canvas compresses to ~2 KB; a drawn plot is well above

# ------------------------------------------------------------------------------------------------------ stats


@pytest.mark.parametrize(
    "p,df,expected",
    [(0.975, 9, 2.2621571628), (0.975, 4, 2.7764451052), (0.95, 5, 2.0150483733), (0.995, 30, 2.7499956536)],
)
def test_t_quantile_known_values(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-9)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-9)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("p", [0.55, 0.9, 0.975, 0.9999])
def test_t_quantile_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_t_quantile_large_df_and_edges():
    z = 1.959963984540054
    assert t_quantile(0.975, math.inf) == pytest.approx(z, abs=1e-12)
    assert t_quantile(0.975, 1e6) == pytest.approx(z + (z**3 + z) / 4e6, abs=1e-9)  # first-order expansion
    below, above = t_quantile(0.975, 0.999e5), t_quantile(0.975, 1.001e5)  # continuous across the method switch
    assert below > above and below - above == pytest.approx(2.3723 * (1 / 0.999e5 - 1 / 1.001e5), rel=1e-3)
    assert t_quantile(0.5, 7) == 0.0
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # I_0.4(2,3) = 1 - (0.6^4 + 4·0.4·0.6^3)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            t_quantile(bad, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_mean_ci_t_by_hand():
    ci = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975,4} · s/√n, s² = 10/4
    assert (ci.mean, ci.n, ci.method, ci.seed, ci.level) == (3.0, 5, "t", None, 0.95)
    assert ci.low == pytest.approx(3 - half, abs=1e-9) and ci.high == pytest.approx(3 + half, abs=1e-9)
    assert ci.half_width == pytest.approx(half, abs=1e-9)
    ci90 = mean_ci([2.0, 4.0, 9.0], level=0.9)  # mean 5, s² = 13, t_{0.95,2} = 2.9199855804
    assert ci90.half_width == pytest.approx(2.9199855804 * math.sqrt(13 / 3), abs=1e-8)


def test_mean_ci_bootstrap_is_seeded():
    values = [0.3, -1.2, 4.5, 2.2, 0.0, 1.1, -0.7, 3.3, 2.9, 0.8]
    a = mean_ci(values, method="bootstrap", seed=7, n_boot=2000)
    assert a == mean_ci(values, method="bootstrap", seed=7, n_boot=2000)
    assert a != mean_ci(values, method="bootstrap", seed=8, n_boot=2000)
    assert a.low < a.mean < a.high and a.seed == 7 and a.method == "bootstrap"
    # for a near-normal sample the percentile interval is close to the t interval
    t = mean_ci(values)
    assert a.half_width == pytest.approx(t.half_width, rel=0.25)
    constant = mean_ci([2.5] * 4, method="bootstrap")
    assert (constant.low, constant.mean, constant.high) == (2.5, 2.5, 2.5)


def test_mean_ci_small_and_bad_inputs():
    empty = mean_ci([])
    assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.low) and math.isnan(empty.high)
    one = mean_ci([4.0], method="bootstrap")
    assert one.mean == 4.0 and one.n == 1 and math.isnan(one.low) and math.isnan(one.half_width)
    with pytest.raises(ValueError, match="1 of 3 values are not finite"):
        mean_ci([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="level"):
        mean_ci([1, 2], level=1.0)
    with pytest.raises(ValueError, match="method"):
        mean_ci([1, 2], method="normal")


# ------------------------------------------------------------------------------------------------------ table


def ci(mean, half, n=20):
    return MeanCI(mean, mean - half, mean + half, n, "t", None)


CELLS = [
    IECell("sink", 2, "audio", ci(12.5, 2.25), ci(-3.0, 1.0)),
    IECell("all", None, "audio", ci(40.0, 5.0), ci(30.125, 4.5)),
    IECell("all", None, "video", ci(55.0, 6.0, 30), ci(50.0, 7.0, 30)),
    IECell("cross_modal_sink", 4, "video", ci(1.0, math.nan, 1), ci(0.5, math.nan, 1)),
]


def test_ie_table_markdown_rows():
    table = ie_table_markdown(CELLS)
    lines = table.splitlines()
    assert lines[0] == (
        "| Tokens | N | Audio-dom. IE_clean (pp) | Audio-dom. IE_corrupt (pp) | Audio-dom. n "
        "| Video-dom. IE_clean (pp) | Video-dom. IE_corrupt (pp) | Video-dom. n |"
    )
    all_row = "| All non-dominant | – | 40.00 ± 5.00 | 30.12 ± 4.50 | 20 | 55.00 ± 6.00 | 50.00 ± 7.00 | 30 |"
    assert all_row in lines
    assert "| Object | – | – | – | – | – | – | – |" in lines
    assert "| Sink | 2 | 12.50 ± 2.25 | -3.00 ± 1.00 | 20 | – | – | – |" in lines
    assert "| Sink | 3 | – | – | – | – | – | – |" in lines
    assert "| Cross-modal sink | 4 | – | – | – | 1.00 | 0.50 | 1 |" in lines  # n = 1: no interval
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| Tokens")]
    assert len(rows) == 2 + 5 * 3  # all, object, then 5 subsets x N in {2, 3, 4}
    assert [r.split(" | ")[0] for r in rows[2:5]] == ["| Sink"] * 3
    labels = ["| Random (count-matched)", "| Random (half count)", "| Cross-modal sink", "| Unimodal sink"]
    assert [r.split(" | ")[0] for r in rows[5::3]] == labels
    assert lines[-1].startswith("IE in percentage points") and "95% t" in lines[-1]


def test_ie_table_extra_rows_and_errors():
    extra = IECell("kv_first_chunk", 2, "audio", ci(1.0, 0.5), ci(2.0, 0.5))
    row = "| kv_first_chunk | 2 | 1.00 ± 0.50 | 2.00 ± 0.50 | 20 | – | – | – |"
    assert row in ie_table_markdown([extra])
    with pytest.raises(ValueError, match="two IE cells for Sink \\(N=2\\), audio-dominant"):
        ie_table_markdown(CELLS + [CELLS[0]])
    with pytest.raises(ValueError, match="needs n_div"):
        IECell("sink", None, "audio", ci(1, 1), ci(1, 1))
    with pytest.raises(ValueError, match="has no N"):
        IECell("object", 2, "audio", ci(1, 1), ci(1, 1))
    with pytest.raises(ValueError, match="dominant"):
        IECell("all", None, "text", ci(1, 1), ci(1, 1))


def test_ie_table_csv():
    rows = list(csv.DictReader(io.StringIO(ie_table_csv(CELLS))))
    assert [(r["subset"], r["n_div"], r["dominant"]) for r in rows] == [
        ("all", "", "audio"), ("all", "", "video"), ("sink", "2", "audio"), ("cross_modal_sink", "4", "video"),
    ]
    sink = rows[2]
    assert sink["label"] == "Sink (N=2)"
    assert float(sink["ie_clean_low"]) == 10.25 and float(sink["ie_clean_high"]) == 14.75
    assert float(sink["ie_corrupt_mean"]) == -3.0 and sink["ie_corrupt_n"] == "20" and sink["ie_clean_method"] == "t"
    assert sink["ie_corrupt_level"] == "0.95" and sink["ie_corrupt_seed"] == ""
    assert math.isnan(float(rows[3]["ie_clean_low"]))


# ------------------------------------------------------------------------------------------------------ plots


def check_png(path, size):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > MIN_PNG_BYTES, (path, len(data))
    with Image.open(path) as image:
        image.load()
        assert image.size == size


def single_panel():
    return (round(report.FIGSIZE_PANEL[0] * report.DPI), round(report.FIGSIZE_PANEL[1] * report.DPI))


def test_plots_write_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    w, h = single_panel()
    out = plot_sinks_per_layer({"video": [3, 8, 20, 25, 24], "audio": [1, 2, 9, 12, 11]}, tmp_path / "a" / "layers.png")
    assert out == tmp_path / "a" / "layers.png"
    check_png(out, (w, h))
    check_png(plot_sinks_per_layer([5, 9, 30, 31], tmp_path / "layers_all.png"), (w, h))
    freqs = {"video": [1, 1, 2, 5, 28, 28, 3], "audio": [1, 4, 4, 27], "text": []}
    check_png(plot_sink_frequency_histogram(freqs, tmp_path / "freq.png"), (w, h))
    mds = {"video sinks": [0.9, 0.5, 0.41, 0.2, -0.1, 0.7], "audio sinks": [-1.0, -0.6, -0.2, 0.1]}
    check_png(plot_mds_distributions(mds, tmp_path / "mds.png", split={"video sinks": 0.45}), (w, h))
    check_png(plot_mds_distributions(mds, tmp_path / "mds1.png", split=0.0), (w, h))
    ie_size = (2 * w, round(report.FIGSIZE_IE_PANEL[1] * report.DPI))
    check_png(plot_ie_bars(CELLS, tmp_path / "ie.png"), ie_size)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a", "freq.png", "ie.png", "layers_all.png", "mds.png", "mds1.png"]  # no temp files left
    plot_ie_bars(CELLS[:1], tmp_path / "ie.png")  # overwrite in place (one panel empty)
    check_png(tmp_path / "ie.png", ie_size)
    assert sorted(os.listdir(tmp_path / "a")) == ["layers.png"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    class Broken:
        def savefig(self, handle, **kwargs):
            handle.write(b"partial")
            raise RuntimeError("disk full")

    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(Broken(), target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.png"]
