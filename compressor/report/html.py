"""`compress report`: one self-contained HTML page a person would rather look at than read JSON.

It reads what the compiler and the benchmarks already wrote (each artifact's manifest, the `bench.json` that
`compress bench ART --json ART/bench.json` leaves beside it, and any benchmark JSON passed as a sweep), draws
quality against measured speed and the per-layer token counts and widths, and embeds the PNGs as data URIs so the
page travels as one file; the PNGs are also written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import UsageError

# Quality keys the benchmarks and manifests write, best first; each is "higher is better" except perplexity.
QUALITY_KEYS = ("lee_pearson", "probe_accuracy", "cls_cosine_mean", "cosine_to_dense_mean", "cosine_mean", "cosine",
                "perplexity_ratio", "quality")
LOWER_IS_BETTER = {"perplexity_ratio"}


@dataclass
class Row:
    """One point of the report: an artifact or one row of a benchmark sweep."""

    label: str
    group: str
    speedup: float | None = None  # measured, against the dense baseline of the same run
    latency_ms: float | None = None
    flops_ratio: float | None = None  # dense / compressed, analytic
    quality: dict[str, float] = field(default_factory=dict)
    token_counts: list[int] | None = None
    heads: list[int] | None = None
    channels: list[int] | None = None
    passes: str = ""
    recipe: dict | None = None
    distributions: dict | None = None  # bench.json's speed-up over each dense baseline, per input-length distribution


def artifact_row(path: Path) -> Row:
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise UsageError(f"report: {path} is not an artifact (no manifest.json); give folders written by `compress run`")
    m = json.loads(manifest_file.read_text())
    validation = m.get("validation") or {}
    quality = {k: float(v) for k, v in validation.items() if k in QUALITY_KEYS and isinstance(v, (int, float))}
    row = Row(
        label=path.name,
        group="artifacts",
        flops_ratio=(m.get("flops") or {}).get("ratio"),
        quality=quality,
        token_counts=(m.get("token_plan") or {}).get("token_counts"),
        heads=(m.get("model") or {}).get("heads_per_layer"),
        channels=(m.get("model") or {}).get("channels_per_layer"),
        passes=" + ".join(describe_pass(p) for p in m.get("passes", [])) or "dense",
        recipe=m.get("recipe"),
    )
    bench_file = path / "bench.json"
    if bench_file.is_file():
        bench = json.loads(bench_file.read_text())
        row.speedup = bench.get("speedup")
        row.latency_ms = bench.get("compressed_ms")
        row.distributions = bench.get("distributions")
    return row


def describe_pass(entry: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in (entry.get("options") or {}).items() if v not in (None, False) and not isinstance(v, (list, dict)))
    return f"{entry['name']}({options})" if options else entry["name"]


def sweep_rows(path: Path) -> list[Row]:
    """Every list called `rows` in a benchmark JSON, grouped by the key that holds it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"report: cannot read sweep {path}: {e}") from None
    rows: list[Row] = []

    def walk(node, group: str):
        if isinstance(node, dict):
            if isinstance(node.get("rows"), list):
                rows.extend(row_from_bench(r, f"{path.stem}: {group}" if group else path.stem) for r in node["rows"] if isinstance(r, dict))
            for k, v in node.items():
                if k != "rows":
                    walk(v, k)

    walk(data, "")
    if not rows:
        raise UsageError(f"report: {path} has no `rows` list; a sweep is a benchmark JSON (benchmarks/*.json)")
    return rows


def row_from_bench(r: dict, group: str) -> Row:
    quality = {k: float(r[k]) for k in QUALITY_KEYS if isinstance(r.get(k), (int, float))}
    return Row(
        label=str(r.get("name") or r.get("variant") or r.get("method") or "?"),
        group=group,
        speedup=r.get("speedup"),
        latency_ms=r.get("latency_ms") or r.get("ms"),
        flops_ratio=r.get("flops_ratio") or (1.0 / r["flops_kept"] if r.get("flops_kept") else None),
        quality=quality,
        token_counts=r.get("token_counts"),
    )


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_quality_speed(rows: list[Row], keys: list[str]):
    """One panel per quality measure (cosine, Lee correlation, probe accuracy, perplexity ratio): each row appears
    in the panels of the measures it has, so text, vision and language models never share an axis."""
    import matplotlib.pyplot as plt

    cols = min(2, len(keys))
    rows_n = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(7 * cols, 4.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        for g in sorted({r.group for r in rows}):
            pts = [(r.speedup if r.speedup is not None else r.flops_ratio, r.quality[key], r) for r in rows if r.group == g and key in r.quality]
            pts = [p for p in pts if p[0] is not None]
            measured = [p for p in pts if p[2].speedup is not None]
            analytic = [p for p in pts if p[2].speedup is None]
            line = ax.plot([p[0] for p in measured], [p[1] for p in measured], "o", label=f"{g}")[0] if measured else None
            if analytic:
                kwargs = {"color": line.get_color()} if line else {}
                ax.plot([p[0] for p in analytic], [p[1] for p in analytic], "o", mfc="none", label=f"{g} (FLOPs ratio)", **kwargs)
            for x, y, r in pts:
                ax.annotate(r.label[:30], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(key + (" (lower is better)" if key in LOWER_IS_BETTER else ""), fontsize=9)
        ax.set_xlabel("speed-up over dense (filled: measured; hollow: FLOPs ratio)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return fig


def plot_layers(rows: list[Row]):
    import matplotlib.pyplot as plt

    panels = [("tokens entering each layer", "token_counts"), ("attention heads per layer", "heads"), ("MLP channels per layer", "channels")]
    panels = [(t, a) for t, a in panels if any(getattr(r, a) for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, attr) in zip(axes[0], panels):
        for r in rows:
            values = getattr(r, attr)
            if values:
                ax.plot(range(len(values)), values, marker=".", label=r.label[:28])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def table(rows: list[Row], keys: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["name", "group", "passes", "speed-up (measured)", "latency ms", "FLOPs ratio", *keys])
    body = []
    for r in rows:
        cells = [html.escape(r.label), html.escape(r.group), html.escape(r.passes), fmt(r.speedup, 2), fmt(r.latency_ms, 1), fmt(r.flops_ratio, 2)]
        cells += [fmt(r.quality.get(k), 4) for k in keys]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def baselines_table(rows: list[Row]) -> str:
    parts = []
    for r in rows:
        for dist, entry in (r.distributions or {}).items():
            cells = ", ".join(f"vs {k} {fmt(v.get('speedup'), 2)}x" for k, v in entry.get("baselines", {}).items())
            tokens = f" ({entry['real_tokens_mean']:.0f} real tokens on average)" if "real_tokens_mean" in entry else ""
            parts.append(f"<li>{html.escape(r.label)}, {html.escape(str(dist))}{tokens}: {cells}</li>")
    return f"<h2>Speed-up against each dense baseline</h2><ul>{''.join(parts)}</ul>" if parts else ""


def unmeasured_note(labels: list[str]) -> str:
    """Under the table: which artifacts have no measured speed (their '–' cells) and the command that fills them."""
    if not labels:
        return ""
    return (f"<p>Speed-up and latency are not measured for {html.escape(', '.join(labels))} (no <code>bench.json</code> "
            f"beside the artifact): run <code>compress bench ART --json ART/bench.json</code> for each, then "
            f"<code>compress report</code> again. Until then their points are placed at the FLOPs ratio (hollow).</p>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:nth-child(-n+3),th{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"""


def write_report(artifacts: list[str | Path], output: str | Path, sweeps: list[str | Path] = ()) -> dict:
    """Write the page and its PNGs; return what it shows (rows, quality key, image names) for scripts and tests."""
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"report: --output must name an .html file, got {output}")
    rows = [artifact_row(Path(a)) for a in artifacts] + [r for s in sweeps for r in sweep_rows(Path(s))]
    if not rows:
        raise UsageError("report: give at least one artifact folder or --sweep benchmark JSON")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in QUALITY_KEYS if any(k in r.quality and (r.speedup or r.flops_ratio) for r in rows)]
    images: dict[str, bytes] = {}
    if keys:
        images["quality_vs_speed.png"] = png(plot_quality_speed(rows, keys[:6]))
    layers = plot_layers([r for r in rows if r.group == "artifacts"] or rows)
    if layers is not None:
        images["per_layer.png"] = png(layers)
    plt.close("all")

    recipes = "".join(
        f"<h3>{html.escape(r.label)}</h3><pre>{html.escape(json.dumps(r.recipe, indent=2))}</pre>" for r in rows if r.recipe
    )
    figures = "".join(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></figure>' for name, data in images.items())
    unmeasured = [r.label for r in rows if r.group == "artifacts" and r.speedup is None]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>compressor report</title><style>{STYLE}</style></head><body>"
        f"<h1>compressor report</h1><p>{len(rows)} rows; quality measures: <b>{html.escape(', '.join(keys) or 'none')}</b>.</p>"
        f"{figures}<h2>Table</h2>{table(rows, keys)}{unmeasured_note(unmeasured)}{baselines_table(rows)}"
        f"{'<h2>Recipes</h2>' + recipes if recipes else ''}</body></html>"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(page)
    for name, data in images.items():
        (output.parent / f"{output.stem}_{name}").write_bytes(data)
    tmp.replace(output)
    return {
        "output": str(output),
        "quality_keys": keys,
        "images": [f"{output.stem}_{n}" for n in images],
        "unmeasured": unmeasured,
        "rows": [{"label": r.label, "group": r.group, "speedup": r.speedup, "flops_ratio": r.flops_ratio, **r.quality} for r in rows],
    }
