"""The `fade-asr` command end to end, and the errors a newcomer meets."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from fade_asr.cli import main, render_readme
from fade_asr.recipes import load_recipe, list_recipes

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    env = {**os.environ, 'FADE_ASR_QUIET': '1'}
    return subprocess.run([sys.executable, '-c', 'import sys; from fade_asr.cli import main; sys.exit(main())', *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=1200)


def test_readme_is_the_home_page():
    assert (ROOT / 'README.md').read_text() == render_readme(ROOT / 'nbs' / 'index.ipynb'), \
        'README.md is out of step with nbs/index.ipynb: run `fade-asr readme`'


def test_every_shipped_recipe_loads():
    names = list_recipes()
    assert {'fp', 'rtn-w4g128', 'gptq-w4g128', 'qep-w3g128', 'fade-w3g128'} <= set(names)
    for n in names: load_recipe(n)


@pytest.mark.parametrize('args,msg', [
    (['eval', '--model', '/no/such/model', '--limit', '1'], 'does not exist'),
    (['quantize', '--recipe', 'no-such-recipe'], 'unknown recipe'),
    (['eval', '--data', 'no-such-set', '--limit', '1'], 'no-such-set'),
    (['bench', '--workers', '0'], 'need at least one worker'),
    (['quantize', '--calib-data', 'libri:/x', '--limit', '1'], "unknown corpus kind 'libri'"),
    (['bench', '--workers', '2', '--scheduler', 'tcp://127.0.0.1:9'], 'give one of them'),
    (['bench', '--suite', 'base'], 'never made on test speech: add --split dev'),
    (['bench', '--suite', 'cost', '--workers', '2'], 'drop --workers'),
])
def test_clear_errors(args, msg):
    r = run_cli(*args)
    assert r.returncode != 0
    assert msg in r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr, 'a user error must not end in a traceback'


def test_eval_model_dir_that_is_a_text_file(tmp_path):
    f = tmp_path / 'notes.txt'; f.write_text('hello')
    r = run_cli('eval', '--model', str(f), '--limit', '1')
    assert r.returncode != 0 and 'Traceback' not in r.stderr and 'notes.txt' in r.stderr


def test_console_script_exits_zero_on_success():
    r = subprocess.run([sys.executable, '-c', 'import sys; from fade_asr.cli import main; sys.exit(main())', 'recipes'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'fade-w3g128' in r.stdout


def test_quantize_end_to_end_small(tmp_path):
    "RTN W4 on a few utterances: prints the table, saves a packed checkpoint that `eval --model` loads back and runs packed."
    out = tmp_path / 'q'
    r = run_cli('quantize', '--recipe', 'rtn-w4g128', '--n-calib', '8', '--data', 'asterisk', '--limit', '3', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert '| FP |' in r.stdout and '| rtn-w4g128 |' in r.stdout
    for f in ('model.safetensors', 'config.json', 'quantize_config.json', 'report.json', 'wer.md', 'wer.json'): assert (out / f).exists(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')], 'no temporary directories left behind'
    rep = json.loads((out / 'report.json').read_text())
    assert rep['method'] == 'rtn' and len(rep['layers']) > 0
    r2 = run_cli('eval', '--model', str(out), '--data', 'asterisk', '--limit', '3', '--json', str(tmp_path / 'e.json'))
    assert r2.returncode == 0, r2.stderr[-3000:]
    q = json.loads((out / 'wer.json').read_text())['results']['rtn-w4g128']['asterisk']['wer']
    e = json.loads((tmp_path / 'e.json').read_text())['results']['packed']['asterisk']['wer']
    assert q == e, 'the saved quantized model must reproduce the WER it was reported with'
    again = ('quantize', '--recipe', 'rtn-w4g128', '--n-calib', '8', '--data', 'asterisk', '--limit', '1', '--out', str(out))
    r3 = run_cli(*again)                                   # the same --out again: refused, before any work
    assert r3.returncode != 0 and 'pass --overwrite' in r3.stderr and 'Traceback' not in r3.stderr, r3.stderr[-2000:]
    r4 = run_cli(*again, '--overwrite')
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert json.loads((out / 'wer.json').read_text())['results']['rtn-w4g128']['asterisk']['n_utts'] == 1


def test_fp_results_are_decoded_once(tmp_path, monkeypatch):
    "quantize's FP results come from the cache when nothing that decides them changed; other settings or a damaged entry decode again."
    import fade_asr.scoring as S
    from fade_asr.cli import cached_evaluate
    from fade_asr.data import load_dataset
    from fade_asr.models import load_model
    lm = load_model()
    monkeypatch.setenv('FADE_ASR_CACHE', str(tmp_path / 'cache'))
    ds = {'asterisk': list(load_dataset('asterisk', 'test', limit=2))}
    calls, real = [], S.evaluate
    monkeypatch.setattr(S, 'evaluate', lambda *a, **k: calls.append(1) or real(*a, **k))
    r1 = cached_evaluate(lm.model, lm.processor, ds)
    r2 = cached_evaluate(lm.model, lm.processor, ds)
    assert len(calls) == 1
    assert r2['asterisk'].hyps == r1['asterisk'].hyps and r2['asterisk'].stats.wer == r1['asterisk'].stats.wer
    cached_evaluate(lm.model, lm.processor, ds, batch_size=1)
    assert len(calls) == 2                                                   # another decoding setting: decoded again
    for f in (tmp_path / 'cache' / 'eval').iterdir(): f.write_text('{')      # damaged entries: decoded again
    cached_evaluate(lm.model, lm.processor, ds)
    assert len(calls) == 3


def test_bench_speed_writes_its_report(tmp_path):
    "The speed suite through the CLI, on a saved tiny random Whisper: the report, its profile plot, and a packed model that decodes as its dense self."
    from fade_asr.testing import tiny_random_whisper
    from fade_asr.whisper import whisper_default_processor
    m = tiny_random_whisper(); d = tmp_path / 'w'
    m.save_pretrained(d); whisper_default_processor(m).save_pretrained(d)
    r = run_cli('bench-speed', '--model', str(d), '--group-size', '32', '--n-calib', '4', '--limit', '2', '--out', str(tmp_path / 's'))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / 's' / 'results.json').read_text())
    assert res['n_calib'] == 4 and res['n_dev'] == {'asterisk': 2, 'harvard': 2}
    assert res['packed']['identical'] == res['packed']['utterances'] == 4
    assert (tmp_path / 's' / 'profile.png').stat().st_size > 0 and 'FADE (one pass, reliability)' in r.stdout


def test_bench_on_local_dask_workers(tmp_path):
    """`fade-asr bench --workers 2` runs the grid in two Dask worker processes; its records hold the same transcripts
    and α as the same runs made in this process, and a second call finds them all stored."""
    from fade_asr.bench import bench_datasets, default_methods, run_one
    from fade_asr.gptq import torch_threads
    from fade_asr.models import load_model
    args = ['bench', '--workers', '2', '--methods', 'FP', 'RTN', '--bits', '3', '--seeds', '1', '--data', 'harvard',
            '--limit', '2', '--out', str(tmp_path / 'b')]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    stored = {p.stem: json.loads(p.read_text()) for p in (tmp_path / 'b' / 'runs-limit2' / 'w3').glob('*.json')}
    assert set(stored) == {'fp-seedna', 'rtn-seedna'}
    assert (tmp_path / 'b' / 'report-limit2' / 'results.md').is_file()
    lm, ds = load_model(), bench_datasets(['harvard'], 'test', limit=2)
    with torch_threads(1):
        here = run_one(lm, next(m for m in default_methods(3) if m.label == 'RTN'), 3, 0, ds, tmp_path / 'here', limit=2)
    untimed = lambda rec: {d: {k: v for k, v in res.items() if k != 'seconds'} for d, res in rec['results'].items()}
    assert untimed(stored['rtn-seedna']) == untimed(here)                   # transcripts and WER
    assert [l['alpha'] for l in stored['rtn-seedna']['report']['layers']] == [l['alpha'] for l in here['report']['layers']]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / 'b' / 'runs-limit2' / 'w3').glob('*.json')}
    assert run_cli(*args).returncode == 0                                  # resumed: nothing run again
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
