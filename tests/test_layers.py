"""The package is one layered whole: each module imports only from modules of earlier notebooks, at its top.

The notebook a module is exported from (its `File to edit: ../nbs/NN_name.ipynb` header) gives its layer NN. An import
of a later (or the same-numbered) layer, a package import inside a function (outside the CLI, which imports late for
start-up time), or a module that assigns into another module's namespace fails here.
"""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'fade_asr'
LATE_OK = {'cli'}                     # the CLI imports inside its commands, for start-up time


def layers() -> dict[str, int]:
    "{module: notebook number} for every exported module."
    out = {}
    for p in PKG.glob('*.py'):
        m = re.search(r'File to edit: \.\./nbs/(\d+)_\w+\.ipynb', p.read_text())
        if m: out[p.stem] = int(m.group(1))
    return out


def package_imports(tree: ast.Module):
    "(node, target module, at top level?) for every import of a fade_asr module."
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  targets = [node.module or '']                       # relative: from .x import y
            elif node.module == 'fade_asr': targets = [a.name for a in node.names]
            elif (node.module or '').startswith('fade_asr.'): targets = [node.module.split('.')[1]]
        elif isinstance(node, ast.Import):
            targets = [a.name.split('.')[1] for a in node.names if a.name.startswith('fade_asr.')]
        for t in targets: yield node, t, id(node) in top


LAYERS = layers()


def test_every_module_has_a_layer():
    mods = {p.stem for p in PKG.glob('*.py')} - {'__init__', '_modidx'}
    assert mods == set(LAYERS), f"modules without a notebook header: {sorted(mods - set(LAYERS))}"
    assert len(set(LAYERS.values())) == len(LAYERS), "two modules share a notebook number"


@pytest.mark.parametrize('mod', sorted(LAYERS))
def test_imports_point_backwards_and_sit_at_the_top(mod):
    tree = ast.parse((PKG / f'{mod}.py').read_text())
    for node, target, at_top in package_imports(tree):
        where = f"{mod}.py line {node.lineno}: imports fade_asr.{target}"
        if target in LAYERS:
            assert LAYERS[target] < LAYERS[mod], f"{where}, a later layer ({LAYERS[target]:02d} >= {LAYERS[mod]:02d})"
        assert at_top or mod in LATE_OK, f"{where} inside a function; import it at the top of the module"


@pytest.mark.parametrize('mod', sorted(LAYERS))
def test_no_module_patches_another(mod):
    "No `othermodule.name = ...`: a module never reaches into another's namespace at run time."
    tree = ast.parse((PKG / f'{mod}.py').read_text())
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == 'fade_asr'
               for a in n.names} | {'fade_asr'}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id in aliases:
                        pytest.fail(f"{mod}.py line {node.lineno}: assigns {el.value.id}.{el.attr}")


def test_the_check_can_fail(tmp_path):
    "The parser sees a late import inside a function, and the header of a module."
    tree = ast.parse("import os\ndef f():\n    from fade_asr.cli import main\n")
    (node, target, at_top), = package_imports(tree)
    assert (target, at_top, node.lineno) == ('cli', False, 3)
    assert list(package_imports(ast.parse("from .quantizer import rtn\nfrom fade_asr import fade as F"))) != []


NBS = PKG.parent / 'nbs'


def prose_words(text: str) -> int:
    "Words of a markdown cell's prose: table rows and fenced code do not count."
    n, fence = 0, False
    for line in text.split('\n'):
        if line.strip().startswith('```'): fence = not fence; continue
        if not fence and not line.lstrip().startswith('|'): n += len(line.split())
    return n


def test_lessons_keep_markdown_cells_short():
    "A lesson reads in small steps: no markdown cell holds more than 150 words of prose."
    import json
    long = []
    for p in sorted(NBS.rglob('*.ipynb')):
        if any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts): continue
        for c in json.loads(p.read_text())['cells']:
            if c['cell_type'] == 'markdown' and prose_words("".join(c["source"])) > 150:
                long.append(f"{p.relative_to(NBS)} cell {c.get('id')}")
    assert not long, f"markdown cells over 150 words (split them at a paragraph): {long}"
