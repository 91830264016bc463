"""`compress report`: the HTML page embeds its pictures and shows the manifest's numbers."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from compressor.errors import UsageError
from compressor.report.html import write_report

ROOT = Path(__file__).resolve().parents[1]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.cells: list[list[str]] = []
        self._row: list[str] | None = None
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._in_cell = True
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "tr":
            self.cells.append(self._row)
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self._row[-1] += data


def test_report_embeds_pictures_and_matches_manifest(minilm_artifact, tmp_path):
    out = tmp_path / "report.html"
    sweep = ROOT / "benchmarks" / "results.json"
    summary = write_report([minilm_artifact], out, [sweep])
    page = Page()
    page.feed(out.read_text())
    # every picture is embedded as a PNG and is the same picture written beside the page
    assert len(page.images) == len(summary["images"]) == 2
    for src, name in zip(page.images, summary["images"]):
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert data == (tmp_path / name).read_bytes()
    # the artifact's row shows the manifest's FLOPs ratio and validation cosine
    manifest = json.loads((minilm_artifact / "manifest.json").read_text())
    header = page.cells[0]
    row = next(r for r in page.cells[1:] if r[0] == minilm_artifact.name)
    assert row[header.index("FLOPs ratio")] == f"{manifest['flops']['ratio']:.2f}"
    assert row[header.index("cosine_to_dense_mean")] == f"{manifest['validation']['cosine_to_dense_mean']:.4f}"
    # every benchmark row of the sweep is in the table
    bench = json.loads(sweep.read_text())
    assert len(page.cells) - 1 == 1 + len(bench["minilm"]["rows"]) + len(bench["dinov2"]["rows"])


def test_report_refuses_bad_input(tmp_path):
    with pytest.raises(UsageError, match="not an artifact"):
        write_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(UsageError, match=".html"):
        write_report([], tmp_path / "r.png", [ROOT / "benchmarks" / "results.json"])
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(UsageError, match="no `rows`"):
        write_report([], tmp_path / "r.html", [tmp_path / "x.json"])
    assert not (tmp_path / "r.html").exists()


def test_report_command(minilm_artifact, tmp_path, capsys):
    from compressor.cli import main

    assert main(["report", str(minilm_artifact), "--output", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().count("data:image/png;base64,") == 2
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "bad.html")]) == 2
    assert "not an artifact" in capsys.readouterr().err
