"""`flashbench report RUN [RUN...]`: one self-contained static HTML page of one or more runs.

The page is a pure function of the runs' files (``results.jsonl``, ``floor.json``, ``config.json``, the
saved samples or ``grids/*.png``) and works offline: plotly.js, the DataTables bundle of itables and every
image are embedded; the only links are to the runs' own lossless PNGs, relative to the page. Per run:

1. the main, latency, A and B tables (``bench.results.tables``), with CIs, sortable by value;
2. quality against NFE and against latency (plotly), each method its own marker, the Pareto front dashed;
3. the students' loss curves, when the rows have them;
4. per prompt (the first K), methods × NFE at the first seed, ×4 nearest-neighbour for small images;
5. the claims report (``bench.results.claims``), rendered from its markdown;
6. the provenance of every row and the protocol it was measured under (collapsible).

Several runs are shown side by side only when their rows share one protocol id: the hash of what makes
numbers comparable (prompt set by content, evaluators, FID reference, bootstrap; ``bench.provenance``).
Teachers, methods, devices and dtypes may differ between them: those are what a comparison compares.
Nothing on the page depends on when it was built: the only dates are the runs' own.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.results import claims, images, tables
from bench.rundir import CONFIG_FILE, RESULTS_FILE, load_rows
from bench.specs import PLOTTED, SPECS, missing
from core import io
from core.errors import UserError

INSTALL = "pip install -e '.[report]'"
PAGE = "index.html"
PROMPTS_SHOWN = 8  # K: the prompts whose samples the page shows
THUMB = 128  # a larger sample is embedded as a thumbnail of this side, linked to its lossless PNG
SMALL = 64  # samples up to this side are shown ×4, nearest-neighbour
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star", "pentagon",
           "hexagon", "triangle-left", "triangle-right", "hourglass", "bowtie", "star-square", "asterisk")
# DataTables: order (and type-detect) a cell by the number it starts with ("31.17 [30.40, 31.97]", "95%", "1.2×")
SORT_BY_NUMBER = ("function (data, type) { if (type !== 'sort' && type !== 'type') { return data; } "
                  "const m = String(data).replace(/<[^>]*>/g, '').replace(/,/g, '').match(/^\\s*-?\\d*\\.?\\d+(e[-+]?\\d+)?/i); "
                  "return m ? parseFloat(m[0]) : null; }")


def require_extra() -> None:
    """UserError naming the install command when the optional `report` extra is missing."""
    for mod in ("plotly", "itables", "markdown_it", "jinja2"):
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"`flashbench report` needs the optional extra `report` ({mod} is missing): {INSTALL}") from None


def check_runs(runs: list[Path]) -> list[Path]:
    """The runs as given, or UserError (one line) for a missing path, a folder that is not a run, or a repeat."""
    seen = set()
    for run in runs:
        if not run.exists():
            raise UserError(f"{run}: no such run directory")
        if not run.is_dir() or not (run / RESULTS_FILE).is_file() or not (run / CONFIG_FILE).is_file():
            raise UserError(f"{run} is not a run directory (it needs {RESULTS_FILE} and {CONFIG_FILE}, as "
                            "`flashbench run` writes them)")
        key = run.resolve()
        if key in seen:
            raise UserError(f"{run} is given twice; name each run once")
        seen.add(key)
    return runs


def protocol_ids(rows: list[dict]) -> dict[str | None, dict]:
    """{protocol id: protocol} over a run's measured rows."""
    return {(r.get("protocol") or {}).get("id"): r.get("protocol") or {} for r in rows if r.get("status") == "ok"}


def check_protocols(runs: dict[Path, list[dict]]) -> None:
    """UserError when the runs' measured rows were not all made under one protocol id (compared by content:
    prompt set, evaluators, FID reference, bootstrap); one run alone is never refused."""
    if len(runs) < 2:
        return
    ids = {run: protocol_ids(rows) for run, rows in runs.items()}
    if len(set().union(*ids.values())) <= 1:
        return
    (first, a_ids), *others = ids.items()
    run, b_ids = next(((r, i) for r, i in others if set(i) != set(a_ids)), others[0])
    a, b = next(iter(a_ids.values()), {}), next(iter(b_ids.values()), {})
    differ = sorted(k for k in set(a) | set(b) if k != "id" and a.get(k) != b.get(k))
    raise UserError(f"{first} and {run} were measured under different protocols (ids "
                    f"{', '.join(sorted(map(str, a_ids)))} vs {', '.join(sorted(map(str, b_ids)))}; fields that differ: "
                    f"{', '.join(differ) or 'none named'}): their numbers are not comparable; report them one at a time")


# --- the page's parts ------------------------------------------------------------------------------


@dataclass
class Table:
    id: str
    title: str
    note: str
    html: str


@dataclass
class Sample:
    src: str  # data: URI
    href: str | None  # the lossless PNG, relative to the page
    width: int  # display width in CSS px
    pixelated: bool


@dataclass
class PromptGrid:
    index: int
    text: str
    nfes: list[int]
    rows: list[tuple[str, list[Sample | None]]]  # (label, one sample per NFE or None)


@dataclass
class Section:
    name: str
    anchor: str
    config: dict
    facts: list[tuple[str, str]]
    tables: list[Table] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (title, html)
    curves: str | None = None
    grids: list[PromptGrid] = field(default_factory=list)
    grid_note: str = ""
    claims: str = ""
    protocols: list[tuple[str, str]] = field(default_factory=list)  # (id, JSON)
    rows: list[tuple[str, str]] = field(default_factory=list)  # (summary, JSON)


def _cell_html(v) -> str:
    """A table cell for itables (HTML allowed): escaped text, markdown bold as <b>."""
    text = "—" if missing(v) else str(v)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def datatable(df: pd.DataFrame, table_id: str) -> str:
    """A sortable table (itables, offline: the bundle is embedded once per page); numeric columns order by value."""
    from itables import JavascriptFunction, to_html_datatable

    df = df.astype(object).map(_cell_html)
    numeric = [i for i, c in enumerate(df.columns) if c != "method"]
    return to_html_datatable(df, table_id=table_id, connected=False, allow_html=True, paging=False, order=[],
                             showIndex=False, classes="display nowrap compact cell-border", text_in_header_can_be_selected=False,
                             columnDefs=[{"targets": numeric, "render": JavascriptFunction(SORT_BY_NUMBER)}])


def run_tables(agg: pd.DataFrame, floor: dict | None, anchor: str) -> list[Table]:
    out = [Table(f"{anchor}-main", "Main table", "Every metric with its 95% CI; the real-vs-real floor last.",
                 datatable(tables.display_table(agg, floor), f"{anchor}-main"))]
    lat = tables.latency_table(agg)
    if lat is not None:
        out.append(Table(f"{anchor}-latency", "Latency", "Per image at batch 1, by stage; throughput at the suite's "
                         "batch; peak memory.", datatable(lat, f"{anchor}-latency")))
    ref = tables.reference_row(agg)
    if ref is not None:
        out.append(Table(f"{anchor}-table-a", "Table A", f"Best per column at equal steps in bold; speedups against "
                         f"{ref['label']} at {ref['steps']} steps.", datatable(tables.table_a(agg), f"{anchor}-table-a")))
        out.append(Table(f"{anchor}-table-b", "Table B", f"Relative to {ref['label']} at {ref['steps']} steps (=100%).",
                         datatable(tables.table_b(agg), f"{anchor}-table-b")))
    return out


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (x, lower is better) and quality (y), in order of x."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if best is None or (y < best if lower_is_better else y > best):
            front.append((x, y))
            best = y
    return front


def _figure_html(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def quality_plot(agg: pd.DataFrame, x: str, xlabel: str, div_id: str) -> str | None:
    """Each plotted metric against `x` (NFE or latency), one marker symbol per method, CIs as error bars, the
    Pareto front over every method dashed; None when the run has no such points."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ok = agg[agg["status"] == "ok"] if not agg.empty else agg
    keys = [k for k in PLOTTED if k in ok and ok[k].notna().any()]
    if x not in ok or ok[x].isna().all() or not keys:
        return None
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[SPECS[k].title for k in keys], horizontal_spacing=0.07)
    labels = list(dict.fromkeys(ok["label"]))
    for col, key in enumerate(keys, 1):
        pts = ok[ok[key].notna() & ok[x].notna()]
        for i, label in enumerate(labels):
            g = pts[pts["label"] == label].sort_values(x)
            if g.empty:
                continue
            err = None
            if f"{key}_ci_low" in g and g[f"{key}_ci_low"].notna().all():
                err = dict(type="data", symmetric=False, array=(g[f"{key}_ci_high"] - g[key]).clip(lower=0).tolist(),
                           arrayminus=(g[key] - g[f"{key}_ci_low"]).clip(lower=0).tolist(), thickness=1, width=3)
            fig.add_trace(go.Scatter(
                x=g[x].tolist(), y=g[key].tolist(), error_y=err, mode="lines+markers", name=label, legendgroup=label,
                showlegend=col == 1, marker=dict(symbol=SYMBOLS[i % len(SYMBOLS)], size=9),
                line=dict(width=1), text=[f"{label}, {s} steps" for s in g["steps"]],
                hovertemplate=f"%{{text}}<br>{xlabel}: %{{x:.4g}}<br>{SPECS[key].header}: %{{y:.4g}}<extra></extra>"),
                row=1, col=col)
        front = pareto_front(list(zip(pts[x].tolist(), pts[key].tolist())), SPECS[key].lower_is_better)
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines", name="Pareto front",
                                 legendgroup="pareto", showlegend=col == 1, hoverinfo="skip",
                                 line=dict(dash="dash", color="grey", width=1.5, shape="hv")), row=1, col=col)
        fig.update_xaxes(type="log", title_text=xlabel, row=1, col=col)
    fig.update_layout(height=420, margin=dict(l=40, r=20, t=40, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0))
    return _figure_html(fig, div_id)


CURVE_COLUMNS = 4  # loss subplots per row of the learning-curve figure


def curves_plot(rows: list[dict], div_id: str) -> str | None:
    """Each student's loss log (one subplot per loss, four to a row), or None when no row has one. A log point is the mean over a
    window of updates; it is placed at the window's last update."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    students = {}
    for r in rows:
        t = r.get("train") or {}
        if isinstance(t.get("losses"), dict) and t["losses"]:
            students.setdefault((r["label"], r.get("train_seed")), t)
    if not students:
        return None
    names = sorted({k for t in students.values() for k in t["losses"]})
    cols = min(CURVE_COLUMNS, len(names))  # losses wrap into rows: ADD and DMD2 log a dozen or more each
    nrows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=names, horizontal_spacing=0.07,
                        vertical_spacing=min(0.12, 0.5 / nrows))
    for i, ((label, seed), t) in enumerate(students.items()):
        name = label if seed is None else f"{label} (train seed {seed})"
        legend = True  # once per student: on its first loss
        for k, loss in enumerate(names):
            ys = t["losses"].get(loss)
            if not ys:
                continue
            updates, n = t.get("student_updates") or len(ys), len(ys)
            window = math.ceil(updates / n)
            xs = [min((j + 1) * window, updates) for j in range(n)]
            row, col = divmod(k, cols)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=legend, marker=dict(symbol=SYMBOLS[i % len(SYMBOLS)], size=5)),
                          row=row + 1, col=col + 1)
            legend = False
            fig.update_xaxes(title_text="student update", row=row + 1, col=col + 1)
    fig.update_layout(height=60 + 300 * nrows, margin=dict(l=40, r=20, t=40, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.25 / nrows, xanchor="left", x=0))
    return _figure_html(fig, div_id)


# --- samples ---------------------------------------------------------------------------------------


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _href(path: Path, page_dir: Path) -> str:
    return urllib.parse.quote(os.path.relpath(path.resolve(), page_dir.resolve()).replace(os.sep, "/"))


def _sample(img, href: str | None, png: bytes | None = None) -> Sample:
    """An image (PIL) as an embedded sample: small ones as they are (shown ×4, pixelated), large ones as a thumbnail."""
    w, h = img.size
    if max(w, h) > SMALL:
        img = img.copy()
        img.thumbnail((THUMB, THUMB))
        png = None
    if png is None:
        buf = _io.BytesIO()
        img.save(buf, format="PNG")
        png = buf.getvalue()
    small = max(w, h) <= SMALL
    return Sample(_png_uri(png), href, img.size[0] * 4 if small else img.size[0], small)


def _first_seed(config: dict) -> int:
    return int((config.get("suite", {}).get("seeds") or [0])[0])


def _saved_cells(run: Path) -> dict[tuple[str, int], Path]:
    """{(label, NFE): the cell's sample folder} of a run that saved its samples (the first training seed's)."""
    cells: dict[tuple[str, int], tuple] = {}
    for cell_json in sorted((run / "samples").glob("*/cell.json")):
        c = json.loads(cell_json.read_text())
        key, seed = (c["label"], int(c["nfe"])), c.get("train_seed")
        rank = (seed is not None, seed or 0)
        if key not in cells or rank < cells[key][0]:
            cells[key] = (rank, cell_json.parent)
    return {k: v[1] for k, v in cells.items()}


def _shipped_prompt_texts(config: dict, k: int) -> list[str] | None:
    """The first k prompt texts of a run whose prompts are a shipped set's first N (checked by the file's sha256)."""
    from prompts import load_prompts, prompt_sets

    p = config.get("prompts") or {}
    shipped = prompt_sets().get(p.get("set"))
    if shipped is None or shipped.get("sha256") != p.get("file_sha256"):
        return None
    return [q.text for q in load_prompts(p["set"])[:k]]


def prompt_grids(run: Path, agg: pd.DataFrame, config: dict, k: int, page_dir: Path) -> tuple[list[PromptGrid], str]:
    """Per prompt (the first k), methods × NFE at the first seed: from the saved samples when the run kept them,
    else decoded from its grids/*.png. ([], why) when it has neither."""
    from PIL import Image

    ok = agg[agg["status"] == "ok"] if not agg.empty else agg
    cells = [(r["label"], int(r["nfe"])) for r in ok.to_dict("records")]
    if not cells:
        return [], "This run has no measured cells."
    labels, nfes = list(dict.fromkeys(c[0] for c in cells)), sorted({c[1] for c in cells})
    seed = _first_seed(config)
    found: dict[tuple[str, int], list[Sample]] = {}
    texts: list[str] = []
    saved = _saved_cells(run)
    if saved:
        note = f"Seed {seed}; each image links to its lossless PNG under samples/."
        for cell in cells:
            folder = saved.get(cell)
            if folder is None:
                continue
            found[cell] = []
            for prompt_dir in sorted(p for p in folder.iterdir() if p.is_dir())[:k]:
                png = prompt_dir / "samples" / f"{seed:04d}.png"
                if not png.is_file():
                    break
                data = png.read_bytes()
                found[cell].append(_sample(Image.open(_io.BytesIO(data)), _href(png, page_dir), data))
                if len(texts) < len(found[cell]):
                    meta = (prompt_dir / "metadata.jsonl").read_text().splitlines()
                    texts.append(json.loads(meta[0]).get("prompt", "") if meta else "")
    else:
        count = images.grid_count(config)
        note = (f"Seed {seed}; the run did not save its samples (`flashbench run --save-samples`), so these are decoded "
                "from its grids/*.png (lossless), which each image links to.")
        for cell in cells:
            path = images.grid_path(run, *cell)
            if not path.is_file():
                continue
            try:
                tiles = images.grid_samples(path, count)[:k]
            except UserError:
                continue
            found[cell] = [_sample(Image.fromarray(t), _href(path, page_dir)) for t in tiles]
        n = max((len(v) for v in found.values()), default=0)
        texts = _shipped_prompt_texts(config, n) or [""] * n
    if not found:
        return [], "This run kept neither samples nor grids."
    n = max(len(v) for v in found.values())
    grids = []
    for i in range(n):
        rows = [(label, [found[(label, e)][i] if i < len(found.get((label, e), [])) else None for e in nfes])
                for label in labels]
        grids.append(PromptGrid(i, texts[i] if i < len(texts) else "", nfes, rows))
    return grids, note


# --- provenance ------------------------------------------------------------------------------------

_METRIC_FIELD = re.compile(r"_(ci_low|ci_high|iqr_ms)$")


def provenance(rows: list[dict]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(protocols: [(id, JSON)], rows: [(summary, JSON)]): every row's settings, training record, seeds and status
    (its numbers are in the tables), and once each, the protocols the rows name by id."""
    protocols = {str(p.get("id")): json.dumps(p, indent=1, sort_keys=True) for p in (r.get("protocol") or {} for r in rows)}
    out = []
    for r in rows:
        rec = {k: v for k, v in r.items() if k != "protocol" and k not in SPECS and not _METRIC_FIELD.search(k)}
        rec["protocol_id"] = (r.get("protocol") or {}).get("id")
        train = dict(rec.get("train") or {})
        if isinstance(train.get("losses"), dict):
            train["losses"] = {k: f"{len(v)} log points (plotted above)" for k, v in train["losses"].items()}
        if rec.get("train") is not None:
            rec["train"] = train
        seed = "" if r.get("train_seed") is None else f" · train seed {r['train_seed']}"
        summary = (f"{r.get('label')} · NFE {r.get('nfe')} · {r.get('steps')} steps · seed {r.get('seed')}{seed} · "
                   f"{r.get('status')} · protocol {rec['protocol_id']}")
        out.append((summary, json.dumps(rec, indent=1, sort_keys=True, default=str)))
    return sorted(protocols.items()), out


def _facts(config: dict) -> list[tuple[str, str]]:
    suite = config.get("suite") or {}
    versions = config.get("versions") or {}
    facts = [("suite", f"{suite.get('name', '')}: {suite.get('description', '')}".strip(": ")),
             ("command", config.get("command") or "(not recorded)"), ("started", str(config.get("started", "—"))),
             ("git", str(config.get("git", "—"))), ("device", f"{config.get('device', '—')}, {config.get('threads', '—')} "
                                                            "threads"),
             ("prompts", f"{(config.get('prompts') or {}).get('set')} (n = {(config.get('prompts') or {}).get('n')})"),
             ("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if k != "platform"))]
    return facts


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def section(run: Path, rows: list[dict], index: int, page_dir: Path, k: int) -> Section:
    """Everything the page shows of one run."""
    config = json.loads((run / CONFIG_FILE).read_text())
    floor = tables.load(run)[1]
    agg = tables.aggregate(pd.DataFrame(rows))
    anchor = f"run{index}"
    s = Section(run.resolve().name, anchor, config, _facts(config))
    if agg.empty:
        s.grid_note = "This run has no rows."
        s.protocols, s.rows = provenance(rows)
        return s
    s.tables = run_tables(agg, floor, anchor)
    for x, title, xlabel in (("nfe", "Quality against NFE", "NFE per image"),
                             ("latency_ms", "Quality against latency", "latency per image at batch 1 (ms)")):
        plot = quality_plot(agg, x, xlabel, f"{anchor}-plot-{x.split('_')[0]}")
        if plot is not None:
            s.plots.append((title, plot))
    s.curves = curves_plot(rows, f"{anchor}-curves")
    s.grids, s.grid_note = prompt_grids(run, agg, config, k, page_dir)
    s.claims = _markdown(claims.report(agg, s.name)[0])
    s.protocols, s.rows = provenance(rows)
    return s


def render(runs: list[Path], page_dir: Path, k: int = PROMPTS_SHOWN) -> str:
    """The page's HTML text for `runs` (checked), as it would be written into `page_dir`."""
    import jinja2
    import plotly.offline
    from itables import options
    from itables.javascript import generate_init_offline_itables_html

    rows = {run: load_rows(run) for run in runs}
    check_protocols(rows)
    sections = [section(run, rows[run], i, page_dir, k) for i, run in enumerate(runs)]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(
        sections=sections, plotly_js=jinja2.utils.markupsafe.Markup(plotly.offline.get_plotlyjs()),
        itables_init=jinja2.utils.markupsafe.Markup(generate_init_offline_itables_html(options.dt_bundle)),
        Markup=jinja2.utils.markupsafe.Markup)


def build(runs: list[Path], out: Path | None = None, k: int = PROMPTS_SHOWN) -> Path:
    """Write `out`/index.html (default: the first run's folder) for `runs`; every check comes before any write."""
    require_extra()
    if k < 1:
        raise UserError(f"--prompts must be a positive integer, got {k}")
    runs = check_runs([Path(r) for r in runs])
    page_dir = Path(out) if out is not None else runs[0]
    if page_dir.exists() and not page_dir.is_dir():
        raise UserError(f"--out {page_dir} is a file, not a folder")
    text = render(runs, page_dir, k)
    io.write_text(page_dir / PAGE, text)
    return page_dir / PAGE
