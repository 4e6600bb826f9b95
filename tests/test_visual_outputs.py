"""Pictures and exports checked by what they show: heat map pixels against the tile table and the
tissue mask, attention squares on the patch grid, GeoJSON geometry against the Parquet table, the
HTML report's DOM in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jwth_engine.heads.native import NativeHead
from jwth_engine.heads.reference import JwthPoolingHead
from jwth_engine.outputs.attention import AttentionCollector, attention_overlay, read_attention_npz
from jwth_engine.outputs.figures import apply_colormap, colormap, read_png
from jwth_engine.outputs.heatmap import (BACKGROUND_WASH, OUTLINE_RGB, compose_heatmap, heatmap_layout,
                                         tile_boxes, tissue_on_picture)

TINY = ["--model", "test_tiny_patch14_reg4", "--device", "cpu", "--precision", "fp32"]


def run_cli(cli_cmd, *args, timeout=600, **kwargs):
    return subprocess.run([*cli_cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


class Tiles:
    """The tile table's columns as numpy arrays, by attribute (no pandas needed)."""

    def __init__(self, path):
        table = pq.read_table(path)
        self.columns = {name: table.column(name).to_numpy() for name in table.column_names}
        self.__dict__.update(self.columns)

    def __len__(self) -> int:
        return len(self.x)

    def rows(self):
        from types import SimpleNamespace

        for i in range(len(self)):
            yield SimpleNamespace(**{k: v[i].item() for k, v in self.columns.items()})


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- heat map ---------------------------------------------------------------------------------------

def test_compose_heatmap_colours_exactly_the_tile_footprints():
    thumb = np.full((60, 80, 3), 200, np.uint8)
    mask = np.zeros((30, 40), bool)      # mask px = 2 picture px = 20 level-0 px (scale 0.1)
    mask[5:20, 5:30] = True
    x, y = np.array([100, 300]), np.array([100, 100])
    w = h = np.array([200, 200])
    layers = compose_heatmap(thumb, mask, 20.0, 0.1, (x, y, w, h), np.array([0.2, 0.9]), cmap="viridis",
                             opacity=1.0, outline_px=1)
    expected = np.zeros((60, 80), bool)
    expected[10:30, 10:50] = True        # two 20 px squares side by side, sharing an edge
    assert (layers.covered == expected).all()
    cmap = colormap("viridis")
    inside = layers.covered & ~(layers.rgb == OUTLINE_RGB).all(axis=2)
    assert (layers.rgb[12:28, 12:28][inside[12:28, 12:28]] == apply_colormap(np.array([0.2]), cmap)[0]).all()
    assert (layers.rgb[12:28, 32:48][inside[12:28, 32:48]] == apply_colormap(np.array([0.9]), cmap)[0]).all()
    washed = int(200 * (1 - BACKGROUND_WASH) + 255 * BACKGROUND_WASH + 0.5)
    assert (layers.rgb[50:, 60:] == washed).all()            # background: washed, not coloured
    assert (layers.rgb[31:38, 12:58] == 200).all()            # tissue without a tile: untouched
    assert (layers.rgb[39, 12:58] == OUTLINE_RGB).all()       # the tissue outline (mask rows 5..19)


def test_heatmap_layout_long_side_is_the_requested_size():
    for w0, h0 in ((2220, 2967), (100_000, 80_000), (5000, 300)):
        for size in (400, 1400):
            layout = heatmap_layout(w0, h0, size)
            assert max(layout.png_width, layout.png_height) == size
            # aspect kept up to the rounding of the shorter side to whole pixels
            assert abs((layout.width / layout.height) / (w0 / h0) - 1) < 1.0 / min(layout.width, layout.height)


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory, cli_cmd, cmu_small):
    """One scoring run with every picture, shared by the tests below (CPU time is scarce)."""
    out = tmp_path_factory.mktemp("visual") / "out"
    proc = run_cli(cli_cmd, "score", cmu_small, *TINY, "--out", out, "--heatmap", "--geojson", "--report",
                   "--attention", "3", "--heatmap-size", "900", "--heatmap-opacity", "1.0",
                   "--heatmap-class", "positive")
    assert proc.returncode == 0, proc.stderr
    return out, "CMU-1-Small-Region"


def test_heatmap_png_content_on_cmu(cmu_run, cmu_small):
    from jwth_engine.slide import open_slide
    from jwth_engine.tissue import detect_tissue

    out, name = cmu_run
    summary = json.loads((out / f"{name}.summary.json").read_text())
    assert summary["outputs"]["heatmap_png"] == f"{name}.heatmap.png"
    png = read_png(out / f"{name}.heatmap.png")
    assert max(png.shape[:2]) == 900
    table = Tiles(out / f"{name}.tiles.parquet")
    with open_slide(cmu_small) as slide:
        w0, h0 = slide.info.level_dimensions[0]
        tissue = detect_tissue(slide, mpp=summary["slide"]["mpp_used"])
    layout = heatmap_layout(w0, h0, 900)
    assert png.shape[:2] == (layout.png_height, layout.png_width)
    left, top, width, height = layout.image_box
    picture = png[top:top + height, left:left + width].astype(int)
    boxes = tile_boxes(table.x, table.y, table.width, table.height, layout.scale, width, height)
    tissue_px = tissue_on_picture(tissue.mask, tissue.downsample, layout.scale, width, height)
    cmap = colormap("viridis")
    covered = np.zeros((height, width), bool)
    for (x0, y0, x1, y1), p in zip(boxes, table.prob_positive):
        covered[y0:y1, x0:x1] = True
        colour = apply_colormap(np.array([p]), cmap)[0].astype(int)
        block = picture[y0:y1, x0:x1].reshape(-1, 3)
        not_outline = ~(block == OUTLINE_RGB).all(axis=1)
        # opacity 1: every tile pixel but the tissue outline is exactly its probability's colour
        assert (np.abs(block[not_outline] - colour) <= 1).all()
    # coloured pixels lie on tissue: most of them on the mask, none farther than a tile from it
    assert tissue_px[covered].mean() > 0.6
    from scipy import ndimage

    near = ndimage.binary_dilation(tissue_px, iterations=int(np.ceil(table.width[0] * layout.scale)) + 1)
    assert near[covered].all()
    # background (no tile, no tissue) is washed out: pale and grey, no colormap colour
    background = picture[~covered & ~tissue_px]
    assert background.min(axis=1).mean() > 200
    assert (background.max(axis=1) - background.min(axis=1)).mean() < 20


def test_pictures_made_beside_the_stream_equal_those_made_after(cmu_small, tmp_path):
    # On a GPU the slide-only picture work (thumbnail base, tissue polygons) runs on a thread while
    # the tiles stream (VisualStep.begin(overlap=True)); on a CPU after scoring. Same files either way.
    from jwth_engine.config import RunConfig
    from jwth_engine.scoring import SlideScorer
    from jwth_engine.scoring.visuals import VisualOptions, VisualStep

    scorer = SlideScorer(RunConfig.from_kwargs(model="test_tiny_patch14_reg4", device="cpu", precision="fp32"))
    files = {}
    for overlap in (False, True):
        prepared = scorer.prepare(cmu_small)
        step = VisualStep(VisualOptions(heatmap=True, geojson=True), scorer.model)
        step.begin(prepared, "CMU", overlap=overlap)
        probs = np.random.default_rng(0).dirichlet([1.0, 1.0], size=len(prepared.grid.coords)).astype(np.float32)
        try:
            step.capture(prepared, probs, "CMU")
        finally:
            step.settle()
            prepared.close()
        out = tmp_path / str(overlap)
        out.mkdir()
        written = step.write(out, "CMU", {"status": "scored"}, prepared)
        files[overlap] = {k: (out / v).read_bytes() for k, v in written.items() if k in ("heatmap_png", "geojson")}
    assert set(files[True]) == {"heatmap_png", "geojson"}
    assert files[True] == files[False]
    png = read_png(tmp_path / "True" / "CMU.heatmap.png")
    assert png.std() > 10                  # a picture, not a blank canvas


def test_heatmap_command_redraws_from_results(cmu_run, cli_cmd, tmp_path):
    out, name = cmu_run
    dest = tmp_path / "again.png"
    proc = run_cli(cli_cmd, "heatmap", out / name, "--heatmap-class", "negative", "--heatmap-size", "600",
                   "-o", dest, "--heatmap-colormap", "magma")
    assert proc.returncode == 0, proc.stderr
    assert max(read_png(dest).shape[:2]) == 600


@pytest.mark.parametrize("args, problem", [
    (["--heatmap-class", "tumour"], "no class 'tumour'"),
    (["--heatmap-colormap", "nope"], "unknown colormap"),
])
def test_heatmap_command_bad_input(cmu_run, cli_cmd, tmp_path, args, problem):
    out, name = cmu_run
    dest = tmp_path / "x.png"
    proc = run_cli(cli_cmd, "heatmap", out / name, "-o", dest, *args)
    assert proc.returncode == 2 and problem in one_error_line(proc)
    assert not dest.exists()


def test_heatmap_command_without_results(cli_cmd, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "empty" / "slide"):
        proc = run_cli(cli_cmd, "heatmap", target)
        assert proc.returncode == 2 and str(target) in one_error_line(proc)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("args, problem", [
    (["--heatmap", "--heatmap-class", "tumour"], "no class 'tumour'"),
    (["--attention", "2", "--pooling", "linear-probe"], "no attention"),
])
def test_score_bad_visual_options_write_nothing(cli_cmd, cmu_small, tmp_path, args, problem):
    out = tmp_path / "out"
    proc = run_cli(cli_cmd, "score", cmu_small, *TINY, "--out", out, *args)
    assert proc.returncode == 2 and problem in one_error_line(proc)
    assert not out.exists() or list(out.iterdir()) == []


def test_no_tissue_slide_says_so(cli_cmd, tiny_svs, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(cli_cmd, "score", tiny_svs, *TINY, "--out", out, "--heatmap", "--report")
    assert proc.returncode == 0, proc.stderr
    assert "no heat map" in proc.stderr
    assert not (out / "openslide-python-small.heatmap.png").exists()
    assert "no tissue" in (out / "openslide-python-small.report.html").read_text()
    proc = run_cli(cli_cmd, "heatmap", out / "openslide-python-small")
    assert proc.returncode == 0 and "no heat map" in proc.stderr
    assert not (out / "openslide-python-small.heatmap.png").exists()


# --- attention ---------------------------------------------------------------------------------------

def _forced_head(dim: int, heads: int, prefix: int, targets: list[int], patches: int):
    """A JWTH head and tokens where head h attends (almost) only to patch targets[h]: the query of
    head h points along its first channel, keys are the tokens themselves, and only patch
    targets[h] has that channel set."""
    torch.manual_seed(0)
    module = JwthPoolingHead(dim, 2, heads, prefix).eval()
    d = dim // heads
    with torch.no_grad():
        module.q_proj.weight.zero_()
        module.q_proj.bias.zero_()
        module.k_proj.weight.copy_(torch.eye(dim))
        module.k_proj.bias.zero_()
        for h in range(heads):
            module.q_proj.bias[h * d] = 60.0
    tokens = 0.05 * torch.randn(4, prefix + patches, dim)
    for h, j in enumerate(targets):
        tokens[:, prefix + j, h * d] = 8.0
        tokens[:, :prefix, h * d] = 8.0     # class and registers: must be excluded from the map
    return module, tokens


@pytest.mark.parametrize("patch, grid", [(14, 16), (16, 14)])     # DINOv2- and DINOv3-style presets
def test_forced_attention_lights_its_patch_square(patch, grid):
    heads, prefix = 3, 5
    targets = [0, grid * 3 + 7, grid * grid - 1]
    module, tokens = _forced_head(96, heads, prefix, targets, grid * grid)
    head = NativeHead(module)
    out = head(tokens, need_attn=True)
    collector = AttentionCollector(k=2, num_classes=2)
    probs = torch.softmax(out.logits, -1)
    collector(0, tokens, out, probs)
    selection = collector.selection(1)
    maps = selection.grid_maps(grid).astype(np.float32)
    assert maps.shape == (len(selection.rows), heads, grid, grid)
    tile = np.full((grid * patch, grid * patch, 3), 128, np.uint8)
    for h, j in enumerate(targets):
        r, c = divmod(j, grid)
        assert np.unravel_index(maps[0, h].argmax(), (grid, grid)) == (r, c)
        overlay = attention_overlay(tile, maps[0, h], patch).astype(int)
        brightness = overlay.sum(axis=2)
        lit = brightness >= brightness.max() - 3
        expected = np.zeros_like(lit)
        expected[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
        assert (lit == expected).all(), f"head {h}: lit square is not patch ({r}, {c}) of {patch} px"


def test_collector_keeps_top_and_bottom_across_batches():
    module, tokens = _forced_head(96, 3, 5, [0, 1, 2], 16)
    head = NativeHead(module)
    collector = AttentionCollector(k=2, num_classes=2)
    scores = []
    for first in range(0, 12, 4):
        out = head(tokens, need_attn=True)
        probs = torch.rand(4, 2)
        probs = probs / probs.sum(1, keepdim=True)
        scores.append(probs[:, 0].numpy())
        collector(first, tokens, out, probs)
    all_scores = np.concatenate(scores)
    sel = collector.selection(0)
    top = sel.rows[sel.kinds == "top"]
    bottom = sel.rows[sel.kinds == "bottom"]
    assert list(top) == list(np.argsort(-all_scores, kind="stable")[:2])
    assert list(bottom) == list(np.argsort(all_scores, kind="stable")[:2])
    assert sel.maps.dtype == np.float16


def test_attention_outputs_on_cmu(cmu_run):
    out, name = cmu_run
    data = read_attention_npz(out / f"{name}.attention.npz")
    table = Tiles(out / f"{name}.tiles.parquet")
    assert data["attn"].dtype == np.float16
    assert data["attn"].shape[1:] == (8, 16, 16)             # 8 heads, 224 / 14 = 16
    np.testing.assert_allclose(data["attn"].astype(np.float32).sum(axis=(2, 3)), 1.0, atol=1e-2)
    top = data["kind"] == "top"
    assert top.sum() == 3 and (~top).sum() == 3
    probs = table.prob_positive
    np.testing.assert_allclose(np.sort(data["prob"][top])[::-1], np.sort(probs)[::-1][:3], rtol=1e-6)
    np.testing.assert_array_equal(data["x"], table.x[data["rows"]])
    panels = sorted((out / f"{name}.attention").glob("*.png"))
    assert [p.name for p in panels] == ["bottom-01.png", "bottom-02.png", "bottom-03.png",
                                        "top-01.png", "top-02.png", "top-03.png"]
    panel = read_png(panels[-1])
    assert panel.shape[0] >= 224 and panel.std() > 10


def test_attention_grid_of_a_patch16_preset(cli_cmd, cmu_small, tmp_path):
    proc = run_cli(cli_cmd, "score", cmu_small, "--model", "test_tiny_patch16_rope", "--device", "cpu",
                   "--out", tmp_path, "--attention", "1", "--min-tissue", "0.9")
    assert proc.returncode == 0, proc.stderr
    data = read_attention_npz(tmp_path / "CMU-1-Small-Region.attention.npz")
    assert data["attn"].shape[2:] == (14, 14) and int(data["patch_size"]) == 16


# --- GeoJSON -----------------------------------------------------------------------------------------

def test_geojson_is_valid_and_round_trips_tiles(cmu_run):
    from shapely.geometry import shape

    out, name = cmu_run
    collection = json.loads((out / f"{name}.tiles.geojson").read_text())
    table = Tiles(out / f"{name}.tiles.parquet")
    assert collection["type"] == "FeatureCollection"
    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]
    tissue = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(tiles) == len(table) and tissue
    for feature, row in zip(tiles, table.rows()):
        ring = feature["geometry"]["coordinates"][0]
        assert ring == [[row.x, row.y], [row.x + row.width, row.y], [row.x + row.width, row.y + row.height],
                        [row.x, row.y + row.height], [row.x, row.y]]
        m = feature["properties"]["measurements"]
        assert set(m) == {"prob_negative", "prob_positive", "tissue_fraction"}
        assert m["prob_positive"] == float(row.prob_positive) and m["tissue_fraction"] == float(row.tissue_fraction)
        winner = "positive" if row.prob_positive > row.prob_negative else "negative"
        assert feature["properties"]["classification"]["name"] == winner
        assert len(feature["properties"]["classification"]["color"]) == 3
        assert shape(feature["geometry"]).is_valid
    for feature in tissue:
        assert feature["geometry"]["type"] == "Polygon"
        for ring in feature["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4
        assert shape(feature["geometry"]).is_valid
    assert len({f["id"] for f in collection["features"]}) == len(collection["features"])


def test_tissue_polygons_keep_holes_and_area():
    from shapely.geometry import shape

    from jwth_engine.outputs.geojson import tissue_features

    mask = np.zeros((60, 60), bool)
    mask[10:50, 10:50] = True
    mask[20:30, 20:30] = False            # a hole
    mask[23:27, 23:27] = True             # an island inside the hole
    mask[52:58, 2:8] = True               # a second piece
    features = tissue_features("s", mask, 4.0)
    polygons = [shape(f["geometry"]) for f in features]
    assert all(p.is_valid for p in polygons) and len(polygons) == 3
    assert sum(p.area for p in polygons) == pytest.approx(mask.sum() * 16, rel=0.03)
    assert max(len(f["geometry"]["coordinates"]) for f in features) == 2       # outer ring + the hole


# --- HTML report -------------------------------------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium_flags(profile: str) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars"]


_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("div");
  out.id = "image-check";
  out.textContent = "images=" + images.length + " broken=" + broken.length;
  document.body.appendChild(out);
});
</script>"""


def dump_dom(html: Path, tmp_path: Path) -> str:
    """The page's DOM after load, with an inserted script's verdict on every image."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not found (apt-get install chromium)")
    probe = tmp_path / f"probe-{html.name}"
    probe.write_text(html.read_text().replace("</body>", _CHECK_SCRIPT + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, *_chromium_flags(profile), "--virtual-time-budget=10000", "--dump-dom",
                               probe.as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_in_chromium(cmu_run, tmp_path):
    out, name = cmu_run
    html = out / f"{name}.report.html"
    text = html.read_text()
    # self-contained: nothing fetched from the network, every image inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "url(http" not in text and "@import" not in text
    assert all(src.startswith("data:image/") for src in re.findall(r'<img[^>]*src="([^"]+)"', text))
    dom = dump_dom(html, tmp_path)
    match = re.search(r'id="image-check">images=(\d+) broken=(\d+)<', dom)
    assert match, dom[-500:]
    assert int(match.group(1)) == 1 + 6 and int(match.group(2)) == 0    # heat map + 3 top + 3 bottom tiles
    assert 'id="random-warning"' in dom and "NOT meaningful" in dom
    summary_table = re.search(r'<table id="summary-table">(.*?)</table>', dom, re.S).group(1)
    summary = json.loads((out / f"{name}.summary.json").read_text())
    for cls, value in summary["scores"].items():
        assert re.search(rf"<td>{cls}</td><td[^>]*>{value['mean']:.4f}</td>", summary_table)
    assert f"Prediction: <b>{summary['prediction']}</b>" in dom
    for section in ("slide-table", "model-table", "timings-table", "tile-counts"):
        assert f'id="{section}"' in dom
    assert summary["slide"]["mpp_source"] in dom and summary["model"]["preset"] in dom
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([_chromium(), *_chromium_flags(profile), "--window-size=1280,2400",
                        f"--screenshot={shot}", html.as_uri()], capture_output=True, timeout=180)
    image = read_png(shot)
    assert image.shape[:2] == (2400, 1280) and image.std() > 20


def test_screen_index_lists_and_links_reports(cli_cmd, data_dir, tmp_path):
    source = tmp_path / "slides"
    source.mkdir()
    for name in ("CMU-1-Small-Region.svs", "openslide-python-small.svs"):
        os.symlink(data_dir / "wsi" / "aperio_svs" / name, source / name)
    out = tmp_path / "run"
    proc = run_cli(cli_cmd, "screen", source, "--out", out, *TINY, "--report", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    index = out / "index.html"
    dom = dump_dom(index, tmp_path)
    rows = re.findall(r"<tr class=\"(\w+)\">(.*?)</tr>", dom, re.S)
    assert len(rows) == 2 and {r[0] for r in rows} == {"done"}
    link = re.search(r'<a href="(slides/CMU-1-Small-Region/CMU-1-Small-Region\.report\.html)">', dom)
    assert link and (out / link.group(1)).is_file()
    assert "<script>" in index.read_text() and "http" not in index.read_text().replace("http-equiv", "")


# --- progress ------------------------------------------------------------------------------------------

def test_progress_bar_only_on_a_terminal(cli_cmd, cmu_small, tmp_path):
    import pty

    base = ["score", cmu_small, *TINY, "--out", tmp_path, "--min-tissue", "0.9"]
    piped = run_cli(cli_cmd, *base)
    assert piped.returncode == 0 and "scoring" not in piped.stderr and "━" not in piped.stderr

    def on_terminal(*extra):
        leader, follower = pty.openpty()
        proc = subprocess.Popen([*cli_cmd, *map(str, base), *extra], stdout=subprocess.PIPE, stderr=follower,
                                env={**os.environ, "COLUMNS": "100", "TERM": "xterm"})
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=600)
        os.close(leader)
        return proc.returncode, b"".join(chunks).decode(errors="replace")

    code, shown = on_terminal()
    assert code == 0 and "scoring" in shown and "━" in shown
    code, shown = on_terminal("--quiet")
    assert code == 0 and "scoring" not in shown and "━" not in shown and "backend" not in shown
