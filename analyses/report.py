"""Tables and figures of the paper's analyses: the indirect-effect table (Table 1 layout) and the sink plots.

Tables are returned as strings (Markdown, CSV). Plots use matplotlib's Agg canvas directly (no pyplot, no global
backend switch), write PNGs atomically (temporary file in the target directory, then `os.replace`, so a reader never
sees a half-written file) and return the path. matplotlib is imported only when a plot is drawn (extra `report`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from analyses.stats import MeanCI
from hooked_av.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Dominant = Literal["audio", "video"]
DOMINANT: tuple[Dominant, ...] = ("audio", "video")
N_DIVS = (2, 3, 4)  # k_divide N of the global-sink selection (K = input_len / N)
MISSING = "\u2013"  # en dash for absent cells
# Token subsets in table order: (official `--replace_mode` name, row label, takes N). Random = count-matched to the
# N-sink set and seeded (the official baseline is unseeded, METHOD.md §7).
SUBSETS: tuple[tuple[str, str, bool], ...] = (
    ("all", "All non-dominant", False),
    ("object", "Object", False),
    ("sink", "Sink", True),
    ("random_sink_num", "Random (count-matched)", True),
    ("random_sink_num_half", "Random (half count)", True),
    ("cross_modal_sink", "Cross-modal sink", True),
    ("uni_modal_sink", "Unimodal sink", True),
)
DECIMALS = 2  # the official analysis prints IE with %.2f
FIGSIZE_PANEL = (6.4, 4.0)  # inches per panel
FIGSIZE_IE_PANEL = (6.4, 4.8)  # taller: room for the rotated row labels
TICK_ROTATION = 45  # degrees, IE bar labels
DPI = 100
MDS_BINS = 40  # histogram bins over the MDS range [-1, 1]
MDS_RANGE = (-1.0, 1.0)
BAR_WIDTH = 0.38
HIST_ALPHA = 0.5


@dataclass(frozen=True)
class IECell:
    """One cell group of the IE table: IE_clean and IE_corrupt of one token subset for one dominance group.

    The CIs are over per-sample differences already in percentage points (100 · Δprobability, METHOD.md §8).
    `n_div` is the N of the sink selection; None for the subsets without N ("all", "object").
    """

    subset: str
    n_div: int | None
    dominant: Dominant
    ie_clean: MeanCI
    ie_corrupt: MeanCI

    def __post_init__(self) -> None:
        if self.dominant not in DOMINANT:
            raise ValueError(f"IECell.dominant must be one of {DOMINANT}, got {self.dominant!r}")
        takes_n = {name: with_n for name, _, with_n in SUBSETS}.get(self.subset)
        if takes_n is True and self.n_div is None:
            raise ValueError(f"IECell subset {self.subset!r} needs n_div (N of the sink selection)")
        if takes_n is False and self.n_div is not None:
            raise ValueError(f"IECell subset {self.subset!r} has no N, got n_div={self.n_div}")


def row_label(subset: str, n_div: int | None) -> str:
    """Display label of a table row, e.g. "Sink (N=2)"; unknown subsets keep their name."""
    name = {key: label for key, label, _ in SUBSETS}.get(subset, subset)
    return name if n_div is None else f"{name} (N={n_div})"


def _rows(cells: Sequence[IECell]) -> list[tuple[str, int | None]]:
    """Table rows: all canonical (subset, N) rows, then any other (subset, N) of `cells` in first-seen order."""
    rows = [(name, n) for name, _, with_n in SUBSETS for n in (N_DIVS if with_n else (None,))]
    for cell in cells:
        if (cell.subset, cell.n_div) not in rows:
            rows.append((cell.subset, cell.n_div))
    return rows


def _index(cells: Iterable[IECell]) -> dict[tuple[str, int | None, str], IECell]:
    """Cells keyed by (subset, N, dominant); a repeated key is an error (two values for one table cell)."""
    out: dict[tuple[str, int | None, str], IECell] = {}
    for cell in cells:
        key = (cell.subset, cell.n_div, cell.dominant)
        if key in out:
            raise ValueError(f"two IE cells for {row_label(cell.subset, cell.n_div)}, {cell.dominant}-dominant")
        out[key] = cell
    return out


def format_ci(ci: MeanCI | None, decimals: int = DECIMALS) -> str:
    """ "mean ± half-width"; just the mean when the interval is undefined (n = 1); "–" when missing or n = 0."""
    if ci is None or math.isnan(ci.mean):
        return MISSING
    if math.isnan(ci.half_width):
        return f"{ci.mean:.{decimals}f}"
    return f"{ci.mean:.{decimals}f} \u00b1 {ci.half_width:.{decimals}f}"


def _format_n(cell: IECell) -> str:
    """Sample count; "n_clean/n_corrupt" in the (unusual) case they differ."""
    a, b = cell.ie_clean.n, cell.ie_corrupt.n
    return str(a) if a == b else f"{a}/{b}"


def ie_table_markdown(cells: Sequence[IECell], decimals: int = DECIMALS) -> str:
    """Table 1 layout as Markdown: rows = token subset × N, columns = IE_clean, IE_corrupt, n per dominance group.

    Values are "mean ± half-width" in percentage points; absent cells are "–". A note under the table states the
    interval level(s) and method(s) found in the cells.
    """
    cells = list(cells)
    index = _index(cells)
    header = ["Tokens", "N"]
    for dom in DOMINANT:
        tag = f"{dom.capitalize()}-dom."
        header += [f"{tag} IE_clean (pp)", f"{tag} IE_corrupt (pp)", f"{tag} n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---:"] + ["---:"] * (len(header) - 2)) + "|"]
    for subset, n_div in _rows(cells):
        label = {key: name for key, name, _ in SUBSETS}.get(subset, subset)
        row = [label, MISSING if n_div is None else str(n_div)]
        for dom in DOMINANT:
            cell = index.get((subset, n_div, dom))
            if cell is None:
                row += [MISSING] * 3
            else:
                row += [format_ci(cell.ie_clean, decimals), format_ci(cell.ie_corrupt, decimals), _format_n(cell)]
        lines.append("| " + " | ".join(row) + " |")
    kinds = sorted({(ci.level, ci.method) for c in cells for ci in (c.ie_clean, c.ie_corrupt)})
    if kinds:
        desc = ", ".join(f"{level:.0%} {method}" for level, method in kinds)
        note = f"IE in percentage points, mean \u00b1 half-width of the confidence interval ({desc}); n = samples."
        lines += ["", note]
    return "\n".join(lines) + "\n"


def ie_table_csv(cells: Sequence[IECell]) -> str:
    """The same cells as CSV, one line per (subset, N, dominant) in table order, with exact interval bounds."""
    cells = list(cells)
    index = _index(cells)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = ["mean", "low", "high", "n", "method", "level", "seed"]
    writer.writerow(
        ["subset", "label", "n_div", "dominant"] + [f"ie_{kind}_{f}" for kind in ("clean", "corrupt") for f in fields]
    )
    for subset, n_div in _rows(cells):
        for dom in DOMINANT:
            cell = index.get((subset, n_div, dom))
            if cell is None:
                continue
            values = [getattr(ci, f) for ci in (cell.ie_clean, cell.ie_corrupt) for f in fields]
            writer.writerow(
                [subset, row_label(subset, n_div), "" if n_div is None else n_div, dom]
                + ["" if v is None else v for v in values]
            )
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------- plots


def _new_figure(n_panels: int = 1, panel: tuple[float, float] = FIGSIZE_PANEL) -> tuple[Figure, list]:
    """A figure with `n_panels` side-by-side axes of `panel` inches each, on an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * n_panels, panel[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file in the same directory, then `os.replace`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            fig.savefig(handle, format="png", dpi=DPI)

    return atomic_write(path, write)


def plot_sinks_per_layer(counts_by_layer: Mapping[str, Sequence[int]] | Sequence[int], path: str | Path) -> Path:
    """Number of sink tokens at each layer (the hidden state entering layer ℓ), one line per modality if given."""
    series = dict(counts_by_layer) if isinstance(counts_by_layer, Mapping) else {"all tokens": counts_by_layer}
    fig, (ax,) = _new_figure()
    for name, counts in series.items():
        ax.plot(range(len(counts)), list(counts), marker="o", markersize=3, label=name)
    ax.set_xlabel("layer ℓ (input to layer ℓ)")
    ax.set_ylabel("sink tokens (count)")
    ax.set_title("Sink tokens per layer")
    ax.set_ylim(bottom=0)
    if len(series) > 1:
        ax.legend(title="modality")
    return save_figure(fig, path)


def plot_sink_frequency_histogram(freqs: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """How many layers each token is a sink in, as grouped bars per modality (x: layer count, y: tokens)."""
    import numpy as np

    fig, (ax,) = _new_figure()
    groups = {name: np.asarray(list(v), dtype=int) for name, v in freqs.items()}
    top = max((int(v.max()) for v in groups.values() if v.size), default=0)
    width = 1.0 / max(1, len(groups) + 1)
    for i, (name, values) in enumerate(groups.items()):
        counts = np.bincount(values, minlength=top + 1) if values.size else np.zeros(top + 1, dtype=int)
        ax.bar(np.arange(top + 1) + (i - (len(groups) - 1) / 2) * width, counts, width=width, label=name)
    ax.set_xlabel("layers in which the token is a sink (count of layers)")
    ax.set_ylabel("tokens (count)")
    ax.set_title("Sink frequency across layers")
    if groups:
        ax.legend(title="modality")
    return save_figure(fig, path)


def plot_mds_distributions(
    mds_by_group: Mapping[str, Sequence[float]],
    path: str | Path,
    split: float | Mapping[str, float] | None = None,
) -> Path:
    """Histograms of the layer-mean MDS of sink tokens per group (e.g. video sinks, audio sinks).

    MDS = (v − a)/(v + a) ∈ [−1, 1] (+1: attended by video queries only, −1: audio queries only). `split` draws
    the unimodal / cross-modal split point(s): one value, or one per group.
    """
    import numpy as np

    fig, (ax,) = _new_figure()
    bins = np.linspace(*MDS_RANGE, MDS_BINS + 1)
    colors: dict[str, str] = {}
    for name, values in mds_by_group.items():
        data = np.asarray(list(values), dtype=float)
        data = data[np.isfinite(data)]
        _, _, patches = ax.hist(data, bins=bins, alpha=HIST_ALPHA, label=f"{name} (n={data.size})")
        colors[name] = patches[0].get_facecolor() if len(patches) else None
    splits = {} if split is None else ({"split": split} if not isinstance(split, Mapping) else dict(split))
    for name, value in splits.items():
        color = colors.get(name) or "black"
        ax.axvline(value, color=color, linestyle="--", linewidth=1.5, alpha=1.0, label=f"split {name} = {value:.2f}")
    ax.set_xlim(*MDS_RANGE)
    ax.set_xlabel("layer-mean MDS (unitless; −1 audio-attended … +1 video-attended)")
    ax.set_ylabel("sink tokens (count)")
    ax.set_title("Modality-dominance score of sink tokens")
    if mds_by_group or splits:
        ax.legend()
    return save_figure(fig, path)


def plot_ie_bars(cells: Sequence[IECell], path: str | Path) -> Path:
    """IE_clean and IE_corrupt bars with CI error bars per token subset and N; one panel per dominance group."""
    import numpy as np

    cells = list(cells)
    index = _index(cells)
    rows = _rows(cells)
    fig, axes = _new_figure(len(DOMINANT), FIGSIZE_IE_PANEL)
    for ax, dom in zip(axes, DOMINANT):
        present = [(s, n) for s, n in rows if (s, n, dom) in index]
        x = np.arange(len(present))
        for kind, offset in (("clean", -0.5), ("corrupt", 0.5)):
            cis = [getattr(index[(s, n, dom)], f"ie_{kind}") for s, n in present]
            means = np.array([c.mean for c in cis], dtype=float)
            err = np.array([[c.mean - c.low, c.high - c.mean] for c in cis], dtype=float).reshape(-1, 2).T
            ax.bar(x + offset * BAR_WIDTH, means, BAR_WIDTH, yerr=np.nan_to_num(err), capsize=3, label=f"IE_{kind}")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [row_label(s, n) for s, n in present], fontsize=7, rotation=TICK_ROTATION, ha="right")
        ax.set_ylabel("indirect effect (percentage points)")
        ax.set_title(f"{dom.capitalize()}-dominant samples")
        if present:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Indirect effect of restoring each token subset (mean with CI)")
    return save_figure(fig, path)
