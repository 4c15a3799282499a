"""The documentation site's navigation (_quarto.yml) must name every notebook once, in reading order."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _hrefs(items):
    for it in items:
        if isinstance(it, str): yield it
        elif isinstance(it, dict):
            if 'href' in it: yield it['href']
            yield from _hrefs(it.get('contents', []))


def test_sidebar_lists_every_notebook_in_order():
    cfg = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    side = list(_hrefs(cfg['website']['sidebar']['contents']))
    def numbered(sub=''): return sorted(f'nbs/{sub}{p.name}' for p in (ROOT / 'nbs' / sub).glob('[0-9][0-9]_*.ipynb'))
    # reading order: home, the tutorials (start here), the lessons, then the course labs
    nbs = ['nbs/index.ipynb'] + numbered('tutorials/') + numbered() + numbered('labs/')
    assert side == nbs, f"_quarto.yml sidebar {side} != notebooks in reading order {nbs}"


def test_navbar_links_exist():
    cfg = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    for link in cfg['website']['navbar']['left']:
        assert (ROOT / link['href']).exists(), link
