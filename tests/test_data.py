"Tests of fade_asr.data: shipped-set integrity, split leakage, audio loading faults, manifests, calibration subsets."
import hashlib, json, os, warnings
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fade_asr import data as D

SETS = ('asterisk', 'harvard')
MIN_SIZES = {  # documented minimum split sizes (the pipeline draws 128 calibration utterances per seed)
    'asterisk': {'test': 300, 'calib': 150, 'dev': 40},
    'harvard': {'test': 128, 'calib': 128, 'dev': 20},
}


def rows_of(name):
    rows, bad = D.read_manifest(D.data_dir() / name / 'manifest.jsonl')
    assert bad == [], bad
    return rows


def tone(f=440., sr=16000, secs=1., amp=.5):
    t = np.arange(int(sr * secs)) / sr
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


def peak_hz(x, sr=16000): return np.argmax(np.abs(np.fft.rfft(x))) * sr / len(x)


# ---------------------------------------------------------------- shipped sets

def test_shipped_sets_present():
    assert set(SETS) <= set(D.shipped_datasets())


@pytest.mark.parametrize('name', SETS)
def test_manifest_integrity(name):
    rows, info = rows_of(name), D.dataset_info(name)
    d = D.data_dir() / name
    for f in ('LICENSE', 'ATTRIBUTION.md', 'info.json'):
        assert (d / f).stat().st_size > 100, f
    assert len(rows) == info['n_utterances']
    assert len({r['id'] for r in rows}) == len(rows)
    for r in rows:
        p = Path(r['file'])
        assert p.exists() and p.stat().st_size > 0, r['id']
        assert p.stat().st_size < 5e6
        assert r['text'].strip() and r['text'] == r['text'].strip()
        assert r['split'] in set(D.SPLITS) | {'long'}
        assert hashlib.sha256(p.read_bytes()).hexdigest() == r['sha256'], f"{r['id']} changed since the build"
    assert D.summarize_rows(rows) == info['splits']          # counts and durations as documented
    for s, n in MIN_SIZES[name].items(): assert info['splits'][s]['n'] >= n, (s, info['splits'][s])
    assert sum(p.stat().st_size for p in d.rglob('*') if p.is_file()) < 20e6


def test_asterisk_counts_and_long_split():
    info = D.dataset_info('asterisk')
    assert info['n_utterances'] == 551   # 569 entries - 15 bracketed - 2 beeps - 1 without audio
    assert info['splits']['long']['n'] == 3
    for s in D.SPLITS: assert info['splits'][s]['max_seconds'] <= 30.0   # Whisper's single window
    assert info['splits']['long']['max_seconds'] > 70


def test_total_shipped_size_under_budget():
    tot = sum(p.stat().st_size for p in D.data_dir().rglob('*') if p.is_file())
    assert tot < 30e6, tot / 1e6


@pytest.mark.parametrize('name', SETS)
def test_splits_disjoint(name):
    rows = rows_of(name)
    D.check_split_disjoint(rows, 'test')
    D.check_split_disjoint(rows, 'dev')
    test = [r for r in rows if r['split'] == 'test']
    other = [r for r in rows if r['split'] != 'test']
    assert not {r['id'] for r in test} & {r['id'] for r in other}
    fh = lambda r: hashlib.sha256(Path(r['file']).read_bytes()).hexdigest()  # recomputed, not trusted
    assert not {fh(r) for r in test} & {fh(r) for r in other}
    assert not {D.text_key(r['text']) for r in test} & {D.text_key(r['text']) for r in other}


@pytest.mark.parametrize('name', SETS)
def test_decoded_audio_disjoint(name):
    "No test recording appears in calib/dev even re-encoded: compare hashes of the decoded, quantised audio."
    ph = lambda a: hashlib.sha256((a * 32767).round().astype(np.int16).tobytes()).hexdigest()
    test = {ph(u.audio) for u in D.load_dataset(name, 'test')}
    for s in ('calib', 'dev'):
        assert not test & {ph(u.audio) for u in D.load_dataset(name, s)}


def test_check_split_disjoint_catches_leaks():
    base = [dict(id='a', split='test', text='Hello there', sha256='1'),
            dict(id='b', split='calib', text='Other words', sha256='2')]
    D.check_split_disjoint(base)
    for leak in (dict(id='a', split='calib', text='x', sha256='9'),
                 dict(id='z', split='dev', text='x', sha256='1'),
                 dict(id='z', split='dev', text='hello, THERE!', sha256='9')):
        with pytest.raises(ValueError, match='leak'): D.check_split_disjoint(base + [leak])


@pytest.mark.parametrize('name', SETS)
def test_load_dataset(name):
    ds = D.load_dataset(name, 'test', limit=10)
    assert len(ds) == 10 and ds.skipped == [] and ds.split == 'test' and ds.name == name
    for u in ds:
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1 and 0.2 < u.duration < 30
        assert np.abs(u.audio).max() <= 1.0 and np.abs(u.audio).max() > 0.01 and u.text
    assert name in repr(ds) and 'n=10' in repr(ds)
    full = D.load_dataset(name, 'dev')
    assert len(full) == D.dataset_info(name)['splits']['dev']['n']
    assert abs(full.total_seconds - D.dataset_info(name)['splits']['dev']['seconds']) < 0.5


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="shipped sets: .*asterisk"): D.load_dataset('librispeech')
    with pytest.raises(ValueError, match="valid splits: .*calib.*dev.*long.*test"): D.load_dataset('asterisk', 'train')
    with pytest.raises(ValueError, match='valid splits'): D.load_dataset('harvard', 'long')
    with pytest.raises(ValueError, match='limit'): D.load_dataset('asterisk', limit=0)


def test_calibration_subset():
    calib_ids = set(D.load_dataset('asterisk', 'calib').ids)
    subs = [D.calibration_subset('asterisk', 128, s) for s in range(5)]
    for s in subs:
        assert len(s) == 128 and set(s.ids) <= calib_ids and len(set(s.ids)) == 128 and s.split == 'calib'
    assert len({tuple(s.ids) for s in subs}) == 5                      # seeds differ
    assert D.calibration_subset('asterisk', 128, 3).ids == subs[3].ids  # and are reproducible
    test_ids = set(D.load_dataset('asterisk', 'test').ids)
    assert not test_ids & set().union(*(set(s.ids) for s in subs))
    with pytest.raises(ValueError, match='calibration utterances'): D.calibration_subset('asterisk', 10_000, 0)


# ---------------------------------------------------------------- load_audio and fault injection

def test_stereo_44k_resampled_and_downmixed(tmp_path):
    x = tone(440, sr=44100, secs=1.0)
    D.save_audio(tmp_path / 's.wav', np.stack([x, x]), sr=44100)
    y = D.load_audio(tmp_path / 's.wav')
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == 16000
    assert abs(peak_hz(y) - 440) < 1.5
    assert abs(np.abs(y[500:-500]).max() - 0.5) < 0.01           # mean downmix keeps the level
    # different tones on each channel: both survive at half amplitude
    D.save_audio(tmp_path / 'lr.wav', np.stack([tone(300, 44100), tone(1000, 44100)]), sr=44100)
    F = np.abs(np.fft.rfft(D.load_audio(tmp_path / 'lr.wav')))
    top = sorted(np.argsort(F)[-2:])
    assert [round(t) for t in top] == [300, 1000]


@pytest.mark.parametrize('ext,codec,sr', [('.flac', 'flac', 22050), ('.ogg', 'libopus', 48000),
                                          ('.opus', 'libopus', 48000), ('.mp3', 'libmp3lame', 44100),
                                          ('.g722', 'g722', 16000)])
def test_formats(tmp_path, ext, codec, sr):
    x = tone(440, sr=sr, secs=1.0)
    p = tmp_path / f"t{ext}"
    fmt = {'.g722': 'g722', '.ogg': 'ogg', '.opus': 'ogg', '.mp3': 'mp3', '.flac': 'flac'}[ext]
    with av.open(str(p), 'w', format=fmt) as c:
        s = c.add_stream(codec, rate=sr, layout='mono')
        fr = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16)[None], format='s16', layout='mono')
        fr.sample_rate = sr
        try:
            for pk in s.encode(fr): c.mux(pk)
            for pk in s.encode(None): c.mux(pk)
        except av.FFmpegError as e: pytest.skip(f"encoder {codec}: {e}")
    y = D.load_audio(p)
    assert abs(len(y) / 16000 - 1.0) < 0.1 and abs(peak_hz(y) - 440) < 3


def test_missing_file(tmp_path):
    with pytest.raises(D.AudioError, match='not found'): D.load_audio(tmp_path / 'nope.wav')
    with pytest.raises(FileNotFoundError): D.load_audio(tmp_path / 'nope.wav')


def test_empty_and_garbage_files(tmp_path):
    (tmp_path / 'e.wav').write_bytes(b'')
    with pytest.raises(D.AudioError, match='empty'): D.load_audio(tmp_path / 'e.wav')
    (tmp_path / 'g.wav').write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(D.AudioError, match=r'g\.wav.*(corrupt|zero)'): D.load_audio(tmp_path / 'g.wav')
    (tmp_path / 'txt.flac').write_text('this is not audio\n' * 50)
    with pytest.raises(D.AudioError, match='build-data'): D.load_audio(tmp_path / 'txt.flac')


def test_zero_length_audio(tmp_path):
    import wave
    with wave.open(str(tmp_path / 'z.wav'), 'wb') as w:   # a valid header and no samples
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(b'')
    assert (tmp_path / 'z.wav').stat().st_size == 44
    with pytest.raises(D.AudioError, match='zero audio samples'): D.load_audio(tmp_path / 'z.wav')


@pytest.mark.parametrize('ext', ['.wav', '.flac'])
def test_truncated_file(tmp_path, ext):
    D.save_audio(tmp_path / f'full{ext}', tone(secs=3.0))
    b = (tmp_path / f'full{ext}').read_bytes()
    (tmp_path / f'cut{ext}').write_bytes(b[:len(b) // 2])
    with pytest.raises(D.AudioError, match='truncated|corrupt'): D.load_audio(tmp_path / f'cut{ext}')
    assert len(D.load_audio(tmp_path / f'full{ext}')) == 48000


def test_truncated_shipped_g722_is_skipped(tmp_path):
    "Headerless G.722 cannot declare its length; the manifest's duration catches a truncated copy."
    rows = [r for r in rows_of('asterisk') if r['split'] == 'test'][:3]
    man = []
    for r in rows:
        b = Path(r['file']).read_bytes()
        (tmp_path / Path(r['file']).name).write_bytes(b[:len(b) // 2] if r is rows[0] else b)
        man.append({**r, 'file': Path(r['file']).name})
    D.write_manifest(man, tmp_path / 'm.jsonl')
    with pytest.warns(UserWarning, match='skipped 1'):
        ds = D.load_manifest(tmp_path / 'm.jsonl')
    assert len(ds) == 2 and ds.skipped[0][0] == rows[0]['id'] and 'truncated' in ds.skipped[0][1]


# ---------------------------------------------------------------- manifests

def test_user_manifest_faults(tmp_path):
    D.save_audio(tmp_path / 'a.wav', tone())
    (tmp_path / 'sub').mkdir(); D.save_audio(tmp_path / 'sub' / 'b.flac', tone(880, secs=.5))
    (tmp_path / 'junk.wav').write_bytes(b'\x00garbage' * 100)
    lines = [json.dumps({'path': 'a.wav', 'text': 'first'}),
             json.dumps({'path': 'sub/b.flac', 'text': 'second', 'id': 'b'}),
             '{"path": "a.wav", "text": ',                              # line 3: corrupt
             json.dumps({'path': 'a.wav', 'text': ''}),                  # line 4: empty transcript
             json.dumps({'path': 'gone.wav', 'text': 'missing'}),        # missing file
             json.dumps({'path': 'junk.wav', 'text': 'garbage'}),        # garbage bytes named .wav
             json.dumps({'text': 'no path'}),                            # line 7
             json.dumps({'path': 'a.wav', 'text': 'dup', 'id': 'b'})]    # line 8: duplicate id
    (tmp_path / 'm.jsonl').write_text('\n'.join(lines) + '\n')
    with pytest.warns(UserWarning, match='skipped 6'):
        ds = D.load_manifest(tmp_path / 'm.jsonl')
    assert ds.ids == ['a.wav', 'b'] and ds.texts == ['first', 'second']
    assert abs(ds[1].duration - 0.5) < 1e-3
    reasons = ' | '.join(f"{i}: {w}" for i, w in ds.skipped)
    for frag in ('line 3', 'line 4', 'line 7', 'line 8', 'gone.wav', 'junk.wav', 'not valid JSON', 'empty'):
        assert frag in reasons, frag
    # relative paths resolve against the manifest's folder, not the cwd
    cwd = os.getcwd(); os.chdir('/')
    try:
        with pytest.warns(UserWarning, match='skipped 4'):
            assert len(D.load_manifest(tmp_path / 'm.jsonl', limit=2)) == 2
    finally: os.chdir(cwd)


def test_manifest_nothing_loadable(tmp_path):
    (tmp_path / 'm.jsonl').write_text(json.dumps({'path': 'x.wav', 'text': 'x'}) + '\n')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='No utterance'): D.load_manifest(tmp_path / 'm.jsonl')
    with pytest.raises(FileNotFoundError): D.load_manifest(tmp_path / 'none.jsonl')


def test_write_manifest_refuses_bad_rows(tmp_path):
    p = tmp_path / 'm.jsonl'
    with pytest.raises(ValueError, match='empty transcript'):
        D.write_manifest([{'id': 'a', 'file': 'a.wav', 'text': '  '}], p)
    with pytest.raises(ValueError, match='Duplicate'):
        D.write_manifest([{'id': 'a', 'file': 'a.wav', 'text': 'x'}] * 2, p)
    with pytest.raises(ValueError, match="no 'text'"):
        D.write_manifest([{'id': 'a', 'file': 'a.wav'}], p)
    assert not p.exists() and list(tmp_path.iterdir()) == []      # nothing half-written


def test_builder_pure_parts_end_to_end(tmp_path, monkeypatch):
    "Parse -> select -> split -> finalize on a fixture, then load through load_dataset via FADE_ASR_DATA_DIR."
    entries = D.parse_asterisk_transcripts(
        "; comment\nhello: Hello.\nbeep: [beep]\nbye: Goodbye!\nagain: Hello!\nkey: press # now\n")
    kept, dropped = D.select_prompts(entries)
    assert [k for k, _ in kept] == ['hello', 'bye', 'again', 'key'] and dropped[0][0] == 'beep'
    assert dict(kept)['key'] == 'press pound now'
    tmp = tmp_path / 'build'; (tmp / 'audio').mkdir(parents=True)
    rows = []
    splits = D.assign_splits([D.text_key(t) for _, t in kept], {'dev': .25, 'calib': .25, 'test': .5}, 'x')
    for i, ((k, t), s) in enumerate(zip(kept, splits)):
        f = f"audio/{k}.flac"; D.save_audio(tmp / f, tone(200 + 100 * i, secs=.5))
        rows.append(dict(id=k, file=f, text=t, split=s, duration=.5, source='fixture',
                         sha256=hashlib.sha256((tmp / f).read_bytes()).hexdigest()))
    assert splits[0] == splits[2]      # "Hello." and "Hello!" share a split
    out = tmp_path / 'data'; out.mkdir()
    info = D.finalize_set(tmp, out / 'toy', rows, {'name': 'toy'}, 'licence text', 'attribution')
    assert not tmp.exists() and info['n_utterances'] == 4
    monkeypatch.setenv('FADE_ASR_DATA_DIR', str(out))
    assert D.shipped_datasets() == ['toy']
    got = sum(len(D.load_dataset('toy', s)) for s in info['splits'])
    assert got == 4
    # rebuilding replaces the set atomically
    tmp2 = tmp_path / 'build2'; (tmp2 / 'audio').mkdir(parents=True)
    D.save_audio(tmp2 / 'audio/one.flac', tone(secs=.5))
    D.finalize_set(tmp2, out / 'toy', [dict(id='one', file='audio/one.flac', text='one', split='test',
                                            duration=.5)], {'name': 'toy'}, 'l', 'a')
    assert len(D.load_dataset('toy', 'test')) == 1 and [p.name for p in out.iterdir()] == ['toy']
    # an empty transcript is a build error
    tmp3 = tmp_path / 'build3'; (tmp3 / 'audio').mkdir(parents=True)
    D.save_audio(tmp3 / 'audio/one.flac', tone(secs=.5))
    with pytest.raises(ValueError, match='empty transcript'):
        D.finalize_set(tmp3, out / 'toy', [dict(id='one', file='audio/one.flac', text='', split='test',
                                                duration=.5)], {}, 'l', 'a')
    assert len(D.load_dataset('toy', 'test')) == 1      # the old set survives


def test_select_sentences_deterministic():
    s = [f"Sentence number {i}." for i in range(50)] + ['Sentence number 3!', '']
    a, b = D.select_sentences(s, 20), D.select_sentences(list(reversed(s)), 20)
    assert len(a) == 20 and {D.text_key(x) for x in a} == {D.text_key(x) for x in b}
    assert len(D.select_sentences(s, None)) == 50


# ---------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet='abc d', min_size=1, max_size=6), min_size=1, max_size=60),
       st.sampled_from([{'dev': .1, 'calib': .3, 'test': .6}, {'calib': .5, 'test': .5}]))
def test_assign_splits_properties(keys, fr):
    sp = D.assign_splits(keys, fr, 'salt')
    assert len(sp) == len(keys) and set(sp) <= set(fr)
    by_key = {}
    for k, s in zip(keys, sp): assert by_key.setdefault(k, s) == s     # a key never straddles splits
    n = len(set(keys))
    counts = {s: len({k for k, t in zip(keys, sp) if t == s}) for s in fr}
    for s in list(fr)[:-1]: assert counts[s] == round(fr[s] * n) or n < 2


@given(st.text(max_size=80))
def test_clean_prompt_text_properties(t):
    c = D.clean_prompt_text(t)
    assert c == c.strip() and '  ' not in c and '#' not in c and '*' not in c
    assert D.clean_prompt_text(c) == c or any(b in c for b in '[]()<>')


def test_atomic_dir_keeps_the_old_directory_on_failure(tmp_path):
    from fade_asr.util import atomic_dir
    out = tmp_path / 'ckpt'
    with atomic_dir(out) as d: (d / 'a.txt').write_text('v1')
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as d:
            (d / 'a.txt').write_text('half'); raise RuntimeError('crash mid-write')
    assert (out / 'a.txt').read_text() == 'v1' and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
    with atomic_dir(out, overwrite=True) as d: (d / 'b.txt').write_text('v2')
    assert sorted(p.name for p in out.iterdir()) == ['.fade_asr_output.json', 'b.txt']
