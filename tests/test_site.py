"""The offline documentation site: `make docs` builds it (tools/build_site.py), and every page is checked in headless
Chromium: it loads, its links resolve, KaTeX typeset its math, its plots are embedded images.

Screenshots of every page go to `_docs/screenshots/` (and to `$CI_ARTIFACTS/site_screenshots/` when that is set).
Without Chromium the test skips locally, but fails under CI (`.ci/run` installs it).
"""
import json, os, re, shutil, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS, PROC = ROOT / '_docs', ROOT / '_proc'
sys.path.insert(0, str(ROOT / 'tools'))
import build_site  # noqa: E402


def _chromium():
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        if p := shutil.which(name): return p
    msg = "headless Chromium is needed to check the site: `apt-get install -y chromium`"
    if os.environ.get('CI'): pytest.fail(msg + " (CI must have it: .ci/run installs it)")
    pytest.skip(msg)


def _browser(chrome, *args):
    "Run headless Chromium with no network at all, so the page must work from its own files."
    cmd = [chrome, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
           '--disable-dev-shm-usage', '--hide-scrollbars', '--host-resolver-rules=MAP * ~NOTFOUND',
           '--virtual-time-budget=5000', '--window-size=1280,2000', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def site():
    "Build the site once per session (all notebooks execute on their fast path: minutes)."
    chrome = _chromium()
    cmd = (['make', 'docs', f'PYTHON={sys.executable}', 'JOBS=2'] if shutil.which('make')     # the documented command
           else [sys.executable, str(ROOT / 'tools' / 'build_site.py'), '--jobs', '2'])
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"`make docs` failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    title, navbar, sidebar = build_site.load_nav(ROOT)
    nbs = build_site.sidebar_pages(sidebar)
    pages = {}
    for nb in nbs:
        fm = build_site._front_matter(_read_nb(PROC / nb))
        pages[nb] = DOCS / build_site.page_path(nb, fm)
    shots = DOCS / 'screenshots'
    shots.mkdir(exist_ok=True)
    return dict(chrome=chrome, pages=pages, navbar=navbar, shots=shots)


def _read_nb(path):
    import nbformat
    return nbformat.read(path, as_version=4)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.srcs = [], []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'a' and a.get('href'): self.hrefs.append(a['href'])
        if tag in ('img', 'script', 'link') and (a.get('src') or a.get('href')): self.srcs.append(a.get('src') or a.get('href'))


def _outside_code(dom):
    "The DOM's text with code, pre and KaTeX's MathML annotations cut out (they may legitimately hold `$`)."
    for tag in ('pre', 'code', 'annotation', 'script', 'style'):
        dom = re.sub(rf'<{tag}\b.*?</{tag}>', '', dom, flags=re.S)
    return dom


def test_every_sidebar_page_is_built(site):
    for nb, page in site['pages'].items():
        assert page.exists(), f"{nb}: no page {page} was written"


def test_pages_in_chromium(site):
    "Every page loads in Chromium, its local links resolve, its math is typeset, its plots are images."
    chrome, problems = site['chrome'], []
    art = Path(os.environ['CI_ARTIFACTS']) / 'site_screenshots' if os.environ.get('CI_ARTIFACTS') else None
    if art: art.mkdir(parents=True, exist_ok=True)
    for nb, page in site['pages'].items():
        src = page.read_text()
        # links and assets: every relative target exists
        p = _Links(); p.feed(src)
        for h in p.hrefs + p.srcs:
            if re.match(r'^([a-z]+:|#)', h): continue
            target = (page.parent / h.split('#')[0]).resolve()
            if not target.exists(): problems.append(f"{nb}: link {h!r} -> missing {target}")
        # the navbar names every navbar notebook
        for text, href in site['navbar']:
            if f'>{text}</a>' not in src: problems.append(f"{nb}: navbar link {text!r} missing")
        # the page after its scripts ran
        r = _browser(chrome, '--dump-dom', page.as_uri())
        dom = r.stdout
        if r.returncode or '<main class="content">' not in dom:
            problems.append(f"{nb}: Chromium did not load {page} (rc {r.returncode}): {r.stderr[-500:]}"); continue
        if 'data-math="done"' not in dom: problems.append(f"{nb}: the math script did not run (KaTeX not loaded?)")
        body_src = _outside_code(src.split('<main class="content">', 1)[1])
        has_math = '$' in body_src or '\\(' in body_src
        text = _outside_code(dom)
        if has_math and 'class="katex"' not in dom: problems.append(f"{nb}: the page has TeX but KaTeX typeset none of it")
        if '$$' in text: problems.append(f"{nb}: raw `$$` left after KaTeX ran: {text[text.index('$$') - 80:][:200]!r}")
        if 'katex-error' in dom:
            bad = re.findall(r'katex-error[^>]*title="([^"]*)"', dom)[:3]
            problems.append(f"{nb}: KaTeX could not parse: {bad}")
        # plots: every PNG output of the executed notebook is an embedded image
        n_png = sum('image/png' in o.get('data', {}) for c in _read_nb(PROC / nb).cells for o in c.get('outputs', []))
        n_img = len(re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,', dom))
        if n_img < n_png: problems.append(f"{nb}: {n_png} plots executed but {n_img} embedded PNG images on the page")
        # screenshot
        shot = site['shots'] / (page.relative_to(DOCS).as_posix().replace('/', '__').removesuffix('.html') + '.png')
        r = _browser(chrome, f'--screenshot={shot}', page.as_uri())
        if r.returncode or not shot.exists() or shot.read_bytes()[:8] != b'\x89PNG\r\n\x1a\n':
            problems.append(f"{nb}: no screenshot ({r.stderr[-300:]})")
        elif art: shutil.copy2(shot, art / shot.name)
    assert not problems, "site problems:\n" + "\n".join(problems)


def test_site_has_plots_and_math(site):
    "The lessons this site exists for: at least one page with a plot and typeset math."
    doms = {nb: p.read_text() for nb, p in site['pages'].items()}
    assert any('data:image/png;base64,' in d for d in doms.values()), "no page has an embedded plot"
    assert any('$$' in d for d in doms.values()), "no page has display math"


def test_hidden_cells_are_not_rendered(site):
    "`#| hide` cells (the labs' reference solutions) run in CI but never appear on the site."
    import html as _html
    checked = 0
    for nb, page in site['pages'].items():
        text = _html.unescape(re.sub(r'<[^>]+>', '', page.read_text()))
        for c in _read_nb(ROOT / nb).cells:
            lines = c.source.splitlines()
            if c.cell_type != 'code' or not any(re.match(r'#\|\s*hide\s*$', l) for l in lines): continue
            body = [l.strip() for l in lines if l.strip() and not l.startswith('#|') and len(l.strip()) > 12]
            for l in body[:3]:
                assert l not in text, f"{nb}: hidden cell line {l!r} appears on {page.name}"
                checked += 1
    assert checked, "no #| hide cell was checked; the labs' solutions should be hidden cells"
