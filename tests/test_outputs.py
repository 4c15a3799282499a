"""Outputs never cost a user a file: refused targets, concurrent writers, a writer killed mid-save (fault injection)."""
import json, os, signal, subprocess, sys, textwrap, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from fade_asr.util import OUTPUT_MARKER, atomic_dir, check_output_dir, clean_stale

from test_cli import run_cli


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}


def test_quantize_refuses_a_folder_of_user_files(tmp_path):
    out = tmp_path / 'mine'; (out / 'sub').mkdir(parents=True)
    (out / 'notes.txt').write_text('my notes'); (out / 'sub' / 'results.csv').write_text('1,2,3')
    before = _tree(tmp_path)
    r = run_cli('quantize', '--out', str(out), '--limit', '1')
    assert r.returncode != 0 and 'did not write' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = run_cli('quantize', '--out', str(out), '--overwrite', '--limit', '1')
    assert r.returncode != 0 and 'did not write' in r.stderr, r.stderr
    assert _tree(tmp_path) == before                       # both files kept, nothing hidden next to them


def test_quantize_refuses_a_file_at_the_output_path(tmp_path):
    f = tmp_path / 'out'; f.write_text('a user file')
    r = run_cli('quantize', '--out', str(f), '--limit', '1')
    assert r.returncode != 0 and 'is not a folder' in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out'] and f.read_text() == 'a user file'


@pytest.mark.parametrize('name', ['', '.', '..'])
def test_names_that_are_no_folder_are_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match='names no folder'):
        with atomic_dir(name): pass


def test_overwrite_replaces_only_our_own_output(tmp_path):
    out = tmp_path / 'ck'
    with atomic_dir(out) as d: (d / 'w.txt').write_text('v1'); (d / 'sub').mkdir(); (d / 'sub' / 'x').write_text('x')
    assert json.loads((out / OUTPUT_MARKER).read_text())['files'] == ['sub/x', 'w.txt']
    with pytest.raises(FileExistsError, match='--overwrite'):
        with atomic_dir(out) as d: (d / 'w.txt').write_text('v2')
    with atomic_dir(out, overwrite=True) as d: (d / 'w.txt').write_text('v2')
    assert (out / 'w.txt').read_text() == 'v2' and not (out / 'sub').exists()
    (out / OUTPUT_MARKER).write_text('{broken')
    with pytest.raises(FileExistsError, match='damaged'): check_output_dir(out, overwrite=True)


def _write(args):
    out, i = args
    with atomic_dir(out, overwrite=True) as d:
        for k in range(20): (d / f'f{k}.txt').write_text(f'{i}')
    return i


@pytest.mark.parametrize('round', range(4))
def test_sixty_concurrent_writers_all_succeed(round, tmp_path):
    "Without the folder lock about 1 write in 300 failed here (a check saw a folder mid-swap); 240 writes per run."
    out = tmp_path / 'ck'
    with ProcessPoolExecutor(8) as ex: done = list(ex.map(_write, [(out, i) for i in range(60)]))
    assert sorted(done) == list(range(60))
    texts = {p.read_text() for p in out.glob('f*.txt')}
    assert len(texts) == 1 and len(list(out.glob('f*.txt'))) == 20        # one writer's complete folder, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ck']           # no temporary or old folder left


def test_a_writer_killed_mid_save_leaves_nothing_behind_after_the_next_write(tmp_path):
    out = tmp_path / 'ck'
    code = textwrap.dedent(f"""
        import time
        from fade_asr.util import atomic_dir
        with atomic_dir({str(out)!r}) as d:
            (d / 'big.bin').write_bytes(b'x' * 1_000_000); print('writing', flush=True); time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'writing'
    os.kill(p.pid, signal.SIGKILL); p.wait()
    left = [q.name for q in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith('.ck.fade-tmp-') and not out.exists()
    with atomic_dir(out) as d: (d / 'w.txt').write_text('ok')
    assert sorted(q.name for q in tmp_path.iterdir()) == ['ck']
    assert clean_stale(out) == []


def test_bench_refuses_to_reuse_runs_of_another_model(tmp_path):
    "The issue's case: a rerun with another --model into the same --out used to report the first model's WER."
    import numpy as np
    from fade_asr.bench import BenchMethod, run_key, run_one
    from fade_asr.families import LoadedModel
    from fade_asr.testing import Utt, tiny_random_whisper
    from fade_asr.whisper import whisper_default_processor
    rng = np.random.default_rng(0)
    ds = {'noise': [Utt(0, 0.5, rng, 'a b'), Utt(1, 0.4, rng, 'c')]}
    fp = BenchMethod('FP', 'fp', seeded=False)
    for seed, ok in ((0, True), (0, True), (1, False)):
        m = tiny_random_whisper(seed=seed)
        lm = LoadedModel(m.eval(), whisper_default_processor(m), 'whisper', f'random-{seed}')
        if ok:
            rec = run_one(lm, fp, 4, 0, ds, tmp_path, limit=2)
            assert rec['label'] == 'FP' and set(rec['results']) == {'noise'}
        else:
            with pytest.raises(ValueError, match='different model_sha256'):
                run_one(lm, fp, 4, 0, ds, tmp_path, limit=2)
    assert json.loads((tmp_path / 'runs-limit2' / 'run_key.json').read_text()) == run_key(
        tiny_random_whisper(seed=0), ds, 0.5)


def test_a_file_system_without_locks_still_writes(tmp_path, monkeypatch):
    "Some NFS mounts refuse flock: the writer goes on without the lock (its checks still look twice), it does not fail."
    import fade_asr.util as U
    if U.fcntl is None: pytest.skip('no fcntl on this platform')
    def refuse(fd, op): raise OSError(37, 'No locks available')
    monkeypatch.setattr(U.fcntl, 'flock', refuse)
    with atomic_dir(tmp_path / 'ck') as d: (d / 'w.txt').write_text('ok')
    with atomic_dir(tmp_path / 'ck', overwrite=True) as d: (d / 'w.txt').write_text('v2')
    assert (tmp_path / 'ck' / 'w.txt').read_text() == 'v2' and sorted(p.name for p in tmp_path.iterdir()) == ['ck']
