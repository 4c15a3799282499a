#!/usr/bin/env python
"""Build the documentation site offline: `make docs` (or `python tools/build_site.py`).

Quarto renders the site from `_quarto.yml` for those who have it (`nbdev-docs`). This script builds the same site
without Quarto, from the same notebooks and the same `_quarto.yml` navigation:

1. **Execute** every notebook the sidebar names, as `nbdev-test` does (execnb's `CaptureShell`, the notebook's folder
   as working directory), skipping the cells flagged with pyproject's `tst_flags` (`#| slow`, `#| notest`).
   The saved notebooks carry no outputs (`clear_all`), so every output on the site is regenerated here.
2. **Process** each executed notebook with nbdev's own docs processors (`FilterDefaults`, what `nbdev-proc-nbs`
   runs): front matter from the title cell, `show_doc` API cells for exported code, `#| hide` and `#| export`
   cells dropped. The processed notebooks go to `_proc/` (cached: a notebook is re-executed only when it, or the
   package, changed; `--force` re-executes all).
3. **Convert** each to HTML with nbconvert's `basic` template (PNG plots embedded as data URIs) and wrap it in a page
   with `_quarto.yml`'s navbar and sidebar. Math is typeset in the browser by KaTeX, shipped in
   `tools/site_assets/katex/` (npm package `katex`, MIT licence), so no page needs a network.

The site goes to `_docs/`; `tests/test_site.py` builds it and checks every page in headless Chromium.
"""
from __future__ import annotations

import argparse, html, os, re, shutil, sys, tempfile, time, warnings
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / 'site_assets'
KATEX_VERSION = '0.16.22'  # npm: katex@0.16.22 (dist/katex.min.{js,css}, contrib/auto-render.min.js, fonts/*.woff2)


# ---------------------------------------------------------------- navigation from _quarto.yml
def load_nav(root: Path = ROOT):
    "Title, navbar links [(text, notebook)] and sidebar tree from `_quarto.yml`; notebooks are paths relative to `root`."
    cfg = yaml.safe_load((root / '_quarto.yml').read_text())
    site = cfg.get('website', {})
    navbar = [(it['text'], it['href']) for it in site.get('navbar', {}).get('left', [])]
    def tree(items):
        out = []
        for it in items:
            if isinstance(it, str): out.append(('page', it))
            elif 'section' in it: out.append(('section', it['section'], tree(it.get('contents', []))))
            elif 'href' in it: out.append(('page', it['href']))
            else: raise ValueError(f"_quarto.yml sidebar entry {it!r}: expected a path, {{href: ...}} or {{section: ..., contents: [...]}}")
        return out
    sidebar = tree(site.get('sidebar', {}).get('contents', []))
    return site.get('title', root.name), navbar, sidebar


def sidebar_pages(sidebar) -> list[str]:
    "The notebooks the sidebar names, in reading order."
    out = []
    for it in sidebar:
        if it[0] == 'page': out.append(it[1])
        else: out.extend(sidebar_pages(it[2]))
    return out


# ---------------------------------------------------------------- 1+2: execute and process (one notebook per process)
def _fingerprint(root: Path) -> float:
    "Newest mtime among the package sources and settings: a processed notebook older than this is stale."
    files = [*(root / 'fade_asr').rglob('*.py'), root / 'settings.ini', root / 'pyproject.toml']
    return max(f.stat().st_mtime for f in files if f.exists())


def execute_and_process(src: str, dst: str, cell_timeout: int | None = None) -> tuple[str, float]:
    "Execute notebook `src` (skipping `tst_flags` cells), run nbdev's docs processors on it, write it to `dst`."
    import logging
    from fastcore.nbio import write_nb
    from nbdev.process import NBProcessor
    from fastcore.xtras import working_directory
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.test import _skip_cell
    warnings.filterwarnings('ignore', message='Found cells containing imports')
    logging.getLogger('matplotlib').setLevel(logging.WARNING)
    os.environ['IN_TEST'] = '1'
    src, t0 = Path(src), time.time()
    cfg = get_config(src.parent)
    os.chdir(cfg.config_path)  # nbdev's processors call get_config() with no path
    cell_timeout = cell_timeout or int(cfg.get('cell_timeout', 600))
    if str(cfg.config_path) not in sys.path: sys.path.insert(0, str(cfg.config_path))
    nb = NBProcessor(src, rm_directives=False, process=True).nb   # as nbdev-test reads it: cells know their directives
    skip = _skip_cell(nb, cfg.tst_flags.split(), None)
    shell = CaptureShell(src)
    with working_directory(src.parent):
        try: shell.run_all(nb, exc_stop=True, preproc=skip, cell_timeout=cell_timeout)
        except Exception as e:
            failed = next((c for c in nb.cells if c.get('outputs') and any(o.get('output_type') == 'error' for o in c.outputs)), None)
            where = f" in cell:\n{failed.source}" if failed is not None else ''
            raise RuntimeError(f"{src.name} failed{where}\n{type(e).__name__}: {e}\n"
                               f"Reproduce with `nbdev-test {src.relative_to(cfg.config_path)}`.") from e
        for c in nb.cells:  # execnb leaves multi-line outputs as lists of lines; nbdev's processors want strings
            c.metadata.pop('execution', None)  # execnb's timings (`total` is a float; nbformat wants strings)
            for o in c.get('outputs', []):
                if isinstance(o.get('text'), list): o['text'] = ''.join(o['text'])
                for k, v in o.get('data', {}).items():
                    if isinstance(v, list) and not k.endswith('json'): o['data'][k] = ''.join(v)
        shell.run_cell('from nbdev.showdoc import show_doc')
        _SiteProcs(shell)(nb)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    write_nb(nb, tmp)
    os.replace(tmp, dst)
    return str(src), time.time() - t0


def _SiteProcs(shell):
    "nbdev's docs processors, with `show_doc` cells run in the shell that executed the notebook."
    from nbdev.process import Processor
    from nbdev.processors import FilterDefaults, exec_show_docs, _show_docs
    # nbdev's `exec_show_docs` re-runs only the export and import cells in a fresh shell, which breaks when a cell mixes
    # imports with code that needs earlier cells; the executed notebook's own shell already holds every name.
    class exec_show_docs_in_shell(Processor):
        def __call__(self, cell):
            if cell.cell_type != 'code' or not _show_docs(cell.parsed_() or []): return
            shell.cell(cell)
            if shell.exc: raise RuntimeError(f"show_doc cell failed:\n{cell.source}\n{shell.exc!r}") from shell.exc
    class procs(FilterDefaults):
        def base_procs(self): return [exec_show_docs_in_shell if p is exec_show_docs else p for p in super().base_procs()]
    return procs()


# ---------------------------------------------------------------- 3: notebook -> HTML
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_SHOWDOC_ATTRS = re.compile(r'(\]\([^)\s]*\))\{[^}]*\}')  # pandoc link attributes in show_doc markdown: [source](url){target=...}


def _front_matter(nb) -> dict:
    "Front matter from nbdev's raw `---` cell (removed from the notebook)."
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            nb.cells.pop(i)
            return yaml.safe_load(c.source.strip().strip('-')) or {}
    return {}


def _apply_directives(nb):
    "Turn the Quarto cell options nbdev leaves (`#| echo: false`, `#| output: asis`, ...) into nbconvert tags."
    keep = []
    for c in nb.cells:
        for k in [k for k in c if k not in ('cell_type', 'id', 'metadata', 'source', 'outputs', 'execution_count', 'attachments')]:
            del c[k]  # nbdev's bookkeeping (`has_sd`), not nbformat
        c.metadata.pop('execution', None)
        if c.cell_type != 'code':
            keep.append(c); continue
        lines, opts = c.source.splitlines(), {}
        while lines and (m := _DIRECTIVE.match(lines[0])):
            opts[m.group(1)] = m.group(2).strip('"\''); lines.pop(0)
        c.source = '\n'.join(lines).strip('\n')
        tags = set(c.metadata.get('tags', []))
        if opts.get('echo') == 'false' or not c.source: tags.add('remove_input')
        if opts.get('output') == 'false': tags.add('remove_output')
        if opts.get('include') == 'false' or (not c.source and not c.get('outputs')): continue
        for o in c.get('outputs', []):
            md = o.get('data', {}).get('text/markdown')
            if md is not None:
                md = ''.join(md) if isinstance(md, list) else md
                o['data'] = {'text/markdown': _SHOWDOC_ATTRS.sub(r'\1', md)}
                if opts.get('output') == 'asis': tags.add('asis')
        c.metadata['tags'] = sorted(tags)
        keep.append(c)
    nb.cells = keep


def notebook_body(nb_path: Path) -> tuple[dict, str]:
    "Front matter and the HTML body of a processed notebook."
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    nb = nbformat.read(nb_path, as_version=4)
    fm = _front_matter(nb)
    _apply_directives(nb)
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    c.TagRemovePreprocessor.remove_all_outputs_tags = {'remove_output'}
    c.TagRemovePreprocessor.remove_cell_tags = {'remove_cell'}
    exp = HTMLExporter(config=c, template_name='basic', exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exp.from_notebook_node(nb)
    return fm, body


def page_path(nb_rel: str, fm: dict | None = None) -> str:
    "Where the page for notebook `nb_rel` (e.g. `nbs/tutorials/x.ipynb`) goes in the site, relative to its root."
    p = Path(nb_rel)
    if p.parts and p.parts[0] == 'nbs': p = Path(*p.parts[1:])
    return (p.parent / ((fm or {}).get('output-file') or p.with_suffix('.html').name)).as_posix()


def _rel(from_page: str, to: str) -> str:
    return os.path.relpath(to, start=os.path.dirname(from_page) or '.').replace(os.sep, '/')


def render_page(site_title, page, title, description, body, navbar, sidebar, titles, pages) -> str:
    "One HTML page: navbar, sidebar, content; links relative so the site works from `file://`."
    def href(nb): return _rel(page, pages[nb])
    def side(items):
        out = []
        for it in items:
            if it[0] == 'page':
                cur = ' class="active"' if pages[it[1]] == page else ''
                out.append(f'<li><a{cur} href="{href(it[1])}">{html.escape(titles[it[1]])}</a></li>')
            else:
                out.append(f'<li class="section"><span>{html.escape(it[1])}</span><ul>{"".join(side(it[2]))}</ul></li>')
        return out
    nav = ''.join(f'<a href="{href(nb)}">{html.escape(text)}</a>' for text, nb in navbar)
    a = _rel(page, 'site_assets')
    desc = re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(description))   # inline code, as Quarto shows it
    desc = f'<p class="description">{desc}</p>' if description else ''
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} – {html.escape(site_title)}</title>
<link rel="stylesheet" href="{a}/katex/katex.min.css">
<link rel="stylesheet" href="{a}/pygments.css">
<link rel="stylesheet" href="{a}/site.css">
<script defer src="{a}/katex/katex.min.js"></script>
<script defer src="{a}/katex/contrib/auto-render.min.js"></script>
<script defer src="{a}/render-math.js"></script>
</head><body>
<header class="navbar"><a class="brand" href="{_rel(page, 'index.html')}">{html.escape(site_title)}</a><nav>{nav}</nav></header>
<div class="layout">
<aside class="sidebar"><ul>{''.join(side(sidebar))}</ul></aside>
<main class="content"><h1 class="title">{html.escape(title)}</h1>{desc}
{body}
</main></div></body></html>
"""


def _localise_links(body: str, page: str, pages: dict[str, str], doc_url: str) -> str:
    "Links to the published site and to other notebooks become relative links inside this site."
    by_file = {Path(nb).name: p for nb, p in pages.items()}
    def fix(m):
        url = m.group(2)
        if doc_url and url.startswith(doc_url): url = _rel(page, url[len(doc_url):].lstrip('/') or 'index.html')
        elif not re.match(r'^[a-z]+:', url) and (mm := re.match(r'^([^#]*?)([^/#]+\.ipynb)(#.*)?$', url)) and mm.group(2) in by_file:
            url = _rel(page, by_file[mm.group(2)]) + (mm.group(3) or '')
        return f'{m.group(1)}"{url}"'
    return re.sub(r'(href=)"([^"]*)"', fix, body)


def _localise_files(body: str, nb: str, page: str, out: Path, root: Path = ROOT) -> str:
    "Images a notebook links from the repository (e.g. `../bench/act/x.png`) are copied into the site under `_files/`."
    def fix(m):
        url = m.group(2)
        if re.match(r'^([a-z]+:|#|/)', url): return m.group(0)
        src = ((root / nb).parent / url).resolve()
        if not src.is_file() or root.resolve() not in src.parents: return m.group(0)
        rel = Path('_files') / src.relative_to(root.resolve())
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / rel)
        return f'{m.group(1)}"{_rel(page, rel.as_posix())}"'
    return re.sub(r'(<img\b[^>]*?\bsrc=)"([^"]*)"', fix, body)


def write_assets(out: Path):
    from pygments.formatters import HtmlFormatter
    dst = out / 'site_assets'
    if dst.exists(): shutil.rmtree(dst)
    shutil.copytree(ASSETS, dst)
    (dst / 'pygments.css').write_text(HtmlFormatter(style='default').get_style_defs('.highlight'))


# ---------------------------------------------------------------- driver
def build(out: Path = ROOT / '_docs', proc: Path = ROOT / '_proc', only: str | None = None,
          jobs: int = 1, force: bool = False, cell_timeout: int = 0, root: Path = ROOT) -> list[Path]:
    "Build the site into `out`; returns the HTML pages written."
    from nbdev.config import get_config
    site_title, navbar, sidebar = load_nav(root)
    nbs = sidebar_pages(sidebar)
    nbs += [nb for _, nb in navbar if nb not in nbs]
    missing = [nb for nb in nbs if not (root / nb).exists()]
    if missing: raise FileNotFoundError(f"_quarto.yml names notebooks that do not exist: {missing}; fix the sidebar or navbar")
    todo = [nb for nb in nbs if only is None or re.search(only, nb)]
    fp = _fingerprint(root)
    def stale(nb):
        d = proc / nb
        return force or not d.exists() or d.stat().st_mtime < max(fp, (root / nb).stat().st_mtime)
    run = [nb for nb in todo if stale(nb)]
    print(f"site: {len(todo)} notebooks, {len(run)} to execute ({len(todo) - len(run)} cached in {proc.name}/)", flush=True)
    t0 = time.time()
    if run:
        def one(nb):  # a fresh interpreter per notebook, as `nbdev-test` gives each its own shell
            t = time.time()
            env = {'FADE_ASR_QUIET': '1', 'HF_HUB_OFFLINE': '1', **os.environ}   # no progress bars on the pages; never a hub
            if jobs > 1: env.setdefault('OMP_NUM_THREADS', '1')   # parallel notebooks: one thread each, no oversubscription
            r = subprocess.run([sys.executable, __file__, '--execute-one', str(root / nb), str(proc / nb), str(cell_timeout)],
                               capture_output=True, text=True, env=env)
            if r.returncode: raise RuntimeError(f"executing {nb} failed:\n{r.stdout[-3000:]}{r.stderr[-6000:]}")
            print(f"  executed {nb} in {time.time() - t:.0f} s", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            futs = [ex.submit(one, nb) for nb in run]
            for f in futs:
                if f.exception() is not None:          # stop at the first failing notebook
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise f.exception()
    print(f"site: notebooks ready in {time.time() - t0:.0f} s; writing HTML", flush=True)

    bodies, titles, pages = {}, {}, {}
    for nb in nbs:
        if not (proc / nb).exists(): continue  # `--only`: pages not built this time keep their sidebar entry
        fm, body = notebook_body(proc / nb)
        bodies[nb] = fm, body
    for nb in nbs:
        fm = bodies.get(nb, ({},))[0]
        titles[nb] = fm.get('title') or Path(nb).stem
        pages[nb] = page_path(nb, fm)
    cfg = get_config(root)
    doc_url = (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')).rstrip('/')
    out.mkdir(parents=True, exist_ok=True)
    write_assets(out)
    written = []
    for nb, (fm, body) in bodies.items():
        if only is not None and not re.search(only, nb): continue
        page = pages[nb]
        body = _localise_files(_localise_links(body, page, pages, doc_url), nb, page, out, root)
        text = render_page(site_title, page, titles[nb], fm.get('description', ''), body, navbar, sidebar, titles, pages)
        dst = out / page
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix='.tmp')
        with os.fdopen(fd, 'w') as f: f.write(text)
        os.replace(tmp, dst)
        written.append(dst)
    print(f"site: wrote {len(written)} pages to {out} (open {out / 'index.html'})", flush=True)
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--execute-one']: return execute_and_process(argv[1], argv[2], int(argv[3]))
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=ROOT / '_docs', help='site folder (default: _docs/)')
    p.add_argument('--proc', type=Path, default=ROOT / '_proc', help='executed, processed notebooks (default: _proc/)')
    p.add_argument('--only', help='only build notebooks whose path matches this regular expression')
    p.add_argument('--jobs', type=int, default=1, help='notebooks executed in parallel (default: 1)')
    p.add_argument('--force', action='store_true', help='re-execute every notebook, ignoring the _proc/ cache')
    p.add_argument('--cell-timeout', type=int, default=0, help="seconds one cell may run (default: pyproject's cell_timeout)")
    a = p.parse_args(argv)
    build(a.out, a.proc, a.only, a.jobs, a.force, a.cell_timeout)


if __name__ == '__main__':
    main()
