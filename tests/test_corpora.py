"""Corpus loaders on small fixtures written in each corpus's own on-disk format: LibriSpeech (trans.txt + flac),
TED-LIUM 3 (stm + NIST SPHERE), SPGISpeech (csv + wav), a saved 🤗 dataset, a JSONL manifest; and their errors."""
import json
import warnings

import av
import numpy as np
import pytest

from fade_asr.data import (SAMPLE_RATE, calibration_subset, load_dataset, parse_data_spec, save_audio, tedlium_text)


def tone(seconds, sr=SAMPLE_RATE, f=330.0):
    return (0.3 * np.sin(2 * np.pi * f * np.arange(int(round(seconds * sr))) / sr)).astype(np.float32)


def write_wav(path, audio, sr):
    "16-bit PCM WAV at any sample rate (save_audio writes 16 kHz only through its `sr`)."
    save_audio(path, audio, sr=sr)


def write_sphere(path, audio, sr=SAMPLE_RATE):
    "A NIST SPHERE file as TED-LIUM ships them: a 1024-byte `NIST_1A` text header, then 16-bit little-endian PCM."
    pcm = (np.clip(audio, -1, 1) * 32767).astype('<i2')
    hdr = (f"NIST_1A\n   1024\nsample_count -i {len(pcm)}\nsample_n_bytes -i 2\nchannel_count -i 1\n"
           f"sample_byte_format -s2 01\nsample_rate -i {sr}\nsample_coding -s3 pcm\nend_head\n").encode()
    path.write_bytes(hdr.ljust(1024, b' ') + pcm.tobytes())


# ------------------------------------------------------------------ fixtures in each corpus's format
@pytest.fixture
def librispeech(tmp_path):
    root = tmp_path / 'LibriSpeech' / 'test-clean'
    spec = {('1089', '134686'): ['HE HOPED THERE WOULD BE STEW FOR DINNER', 'STUFF IT INTO YOU HIS BELLY COUNSELLED HIM'],
            ('121', '121726'): ['ALSO A POPULAR CONTRIVANCE']}
    for (spk, ch), texts in spec.items():
        d = root / spk / ch
        d.mkdir(parents=True)
        lines = []
        for i, t in enumerate(texts):
            uid = f"{spk}-{ch}-{i:04d}"
            save_audio(d / f"{uid}.flac", tone(0.5 + 0.25 * i))
            lines.append(f"{uid} {t}")
        (d / f"{spk}-{ch}.trans.txt").write_text('\n'.join(lines) + '\n')
    return root


def test_librispeech_loads_in_its_format(librispeech):
    ds = load_dataset(f"librispeech:{librispeech}")
    assert ds.ids == ['1089-134686-0000', '1089-134686-0001', '121-121726-0000']
    assert ds[0].text == 'HE HOPED THERE WOULD BE STEW FOR DINNER'
    assert [round(u.duration, 2) for u in ds] == [0.5, 0.75, 0.5]
    assert ds.skipped == [] and ds.name == f"librispeech:{librispeech}"
    assert len(load_dataset(f"librispeech:{librispeech}", limit=1)) == 1
    assert len(load_dataset(f"librispeech:{librispeech.parent}")) == 3      # the LibriSpeech root works too


def test_librispeech_problems_are_skipped_with_a_warning(librispeech):
    d = librispeech / '1089' / '134686'
    save_audio(d / '1089-134686-0009.flac', tone(0.5))                    # audio with no transcript line
    t = d / '1089-134686.trans.txt'
    t.write_text(t.read_text() + '1089-134686-0007 THIS FILE IS MISSING\n1089-134686-0008 \n')
    with pytest.warns(UserWarning, match='skipped 3 utterance') as w:
        ds = load_dataset(f"librispeech:{librispeech}")
    msg = str(w[0].message)
    assert 'missing transcript' in msg and 'empty transcript' in msg and 'not found' in msg
    assert len(ds) == 3 and len(ds.skipped) == 3


def test_librispeech_resamples_other_rates(tmp_path):
    d = tmp_path / 'ls' / '1' / '2'
    d.mkdir(parents=True)
    save_audio(d / '1-2-0000.flac', tone(1.0, sr=8000), sr=8000)
    (d / '1-2.trans.txt').write_text('1-2-0000 HELLO\n')
    (u,) = load_dataset(f"librispeech:{tmp_path / 'ls'}")
    assert abs(len(u.audio) - SAMPLE_RATE) <= 16


@pytest.mark.parametrize('make,match', [
    (lambda p: p.mkdir(), 'is empty'),
    (lambda p: (p.mkdir(), (p / 'a.flac').write_bytes(b'x')), r'holds no \*\.trans\.txt'),
    (lambda p: p.write_text('hello'), 'is a file'),
    (lambda p: None, 'does not exist'),
])
def test_librispeech_errors(tmp_path, make, match):
    p = tmp_path / 'x'
    make(p)
    with pytest.raises((FileNotFoundError, NotADirectoryError), match=match):
        load_dataset(f"librispeech:{p}")


def test_corpus_where_nothing_loads_is_an_error(librispeech):
    for f in librispeech.rglob('*.flac'): f.unlink()
    with pytest.raises(ValueError, match='none of the 3 utterance'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        load_dataset(f"librispeech:{librispeech}")


# ------------------------------------------------------------------ TED-LIUM 3
@pytest.fixture
def tedlium(tmp_path):
    root = tmp_path / 'TEDLIUM_release-3' / 'legacy' / 'test'
    (root / 'stm').mkdir(parents=True)
    (root / 'sph').mkdir()
    rng = np.random.default_rng(0)
    write_sphere(root / 'sph' / 'AimeeMullins_2009P.sph', (0.1 * rng.standard_normal(8 * SAMPLE_RATE)).astype(np.float32))
    (root / 'stm' / 'AimeeMullins_2009P.stm').write_text(
        ";; a comment line\n"
        "AimeeMullins_2009P 1 AimeeMullins 0.00 2.00 <o,f0,female> ignore_time_segment_in_scoring\n"
        "AimeeMullins_2009P 1 AimeeMullins 2.00 4.50 <o,f0,female> i 'd like to share <unk> with you\n"
        "AimeeMullins_2009P 1 AimeeMullins 4.50 7.25 <o,f0,female> that 's what they 've said\n")
    return root


def test_sphere_is_read_by_pyav(tedlium):
    with av.open(str(tedlium / 'sph' / 'AimeeMullins_2009P.sph')) as c:
        assert c.format.name == 'nistsphere' and c.streams.audio[0].rate == SAMPLE_RATE


def test_tedlium_segments(tedlium):
    ds = load_dataset(f"tedlium:{tedlium}")
    assert ds.texts == ["i'd like to share with you", "that's what they've said"]   # ignored segment left out
    assert [round(u.duration, 3) for u in ds] == [2.5, 2.75]
    full = load_dataset(f"manifest:{_manifest_for(tedlium)}")[0].audio
    np.testing.assert_array_equal(ds[0].audio, full[2 * SAMPLE_RATE: int(4.5 * SAMPLE_RATE)])
    assert ds.ids[0] == 'AimeeMullins_2009P-000002.00-000004.50'


def _manifest_for(tedlium):
    m = tedlium / 'whole.jsonl'
    m.write_text(json.dumps({'path': 'sph/AimeeMullins_2009P.sph', 'text': 'whole talk'}) + '\n')
    return m


def test_tedlium_text_cleaning():
    assert tedlium_text("it 's <unk> a test  <sil>") == "it's a test"
    assert tedlium_text("<unk>") == ''
    assert tedlium_text("we 're sure they don 't") == "we're sure they don't"
    assert tedlium_text("the ' quote '") == "the ' quote '"           # a lone apostrophe is no contraction


def test_tedlium_errors(tedlium, tmp_path):
    (tedlium / 'sph' / 'AimeeMullins_2009P.sph').unlink()
    with pytest.raises(ValueError, match='none of the 2'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        load_dataset(f"tedlium:{tedlium}")
    with pytest.raises(FileNotFoundError, match=r'has no stm/\*.stm'):
        load_dataset(f"tedlium:{tmp_path}")
    (tedlium / 'stm' / 'AimeeMullins_2009P.stm').write_text(
        "AimeeMullins_2009P 1 AimeeMullins 0.00 2.00 <o,f0,female> ignore_time_segment_in_scoring\n")
    with pytest.raises(ValueError, match='no utterance with a transcript'):
        load_dataset(f"tedlium:{tedlium}")


# ------------------------------------------------------------------ SPGISpeech
@pytest.fixture
def spgi(tmp_path):
    root = tmp_path / 'spgispeech'
    rows = [('e2b8/1.wav', 'Good morning, and welcome to the Q3 earnings call.'), ('e2b8/2.wav', 'Revenue grew 12%.')]
    for f, _ in rows:
        (root / 'val' / f).parent.mkdir(parents=True, exist_ok=True)
        write_wav(root / 'val' / f, tone(0.6, sr=44100), sr=44100)           # not 16 kHz: resampled on loading
    lines = ['wav_filename|wav_filesize|transcript'] + [f"{f}|{(root / 'val' / f).stat().st_size}|{t}" for f, t in rows]
    (root / 'val.csv').write_text('\n'.join(lines) + '\n')
    return root


def test_spgispeech_csv_and_wavs(spgi):
    for spec in (f"spgispeech:{spgi / 'val.csv'}", f"spgispeech:{spgi}"):
        ds = load_dataset(spec)
        assert ds.ids == ['e2b8/1', 'e2b8/2'] and ds[1].text == 'Revenue grew 12%.'
        assert all(abs(u.duration - 0.6) < 0.01 for u in ds)


def test_spgispeech_errors(spgi):
    (spgi / 'test.csv').write_text('wav_filename|wav_filesize|transcript\n')
    with pytest.raises(FileNotFoundError, match='holds 2 csv files'):
        load_dataset(f"spgispeech:{spgi}")
    (spgi / 'bad.csv').write_text('file,text\na.wav,hello\n')
    with pytest.raises(ValueError, match=r'wav_filename\|wav_filesize\|transcript'):
        load_dataset(f"spgispeech:{spgi / 'bad.csv'}")


# ------------------------------------------------------------------ a saved 🤗 dataset
def test_hf_saved_dataset(tmp_path, librispeech):
    datasets = pytest.importorskip('datasets')
    files = sorted(librispeech.rglob('*.flac'))
    ds = datasets.Dataset.from_dict({'audio': [str(f) for f in files], 'text': ['a', 'b c', ''],
                                     'id': [f.stem for f in files]}).cast_column('audio', datasets.Audio(sampling_rate=16000))
    arr = datasets.Dataset.from_dict({'audio': [{'array': tone(0.5, sr=8000), 'sampling_rate': 8000}], 'sentence': ['hi']})
    datasets.DatasetDict({'test': ds, 'train': arr}).save_to_disk(str(tmp_path / 'dd'))
    with pytest.warns(UserWarning, match='empty transcript'):
        te = load_dataset(f"hf:{tmp_path / 'dd'}")
    assert te.ids == [f.stem for f in files][:2] and te.texts == ['a', 'b c']
    assert [round(u.duration, 2) for u in te] == [0.5, 0.75]
    (u,) = calibration_subset(f"hf:{tmp_path / 'dd'}", 1, seed=0)         # calibration reads the train split
    assert u.text == 'hi' and abs(u.duration - 0.5) < 0.01
    assert len(load_dataset(f"hf:{tmp_path / 'dd' / 'train'}")) == 1       # one split's own folder
    with pytest.raises(ValueError, match="holds the splits"):
        load_dataset(f"hf:{tmp_path / 'dd'}", split='validation')
    datasets.Dataset.from_dict({'wav': ['x'], 'label': [1]}).save_to_disk(str(tmp_path / 'nocols'))
    with pytest.raises(ValueError, match='need an audio column'):
        load_dataset(f"hf:{tmp_path / 'nocols'}")
    (tmp_path / 'plain').mkdir()
    with pytest.raises(FileNotFoundError, match='save_to_disk'):
        load_dataset(f"hf:{tmp_path / 'plain'}")


# ------------------------------------------------------------------ a JSONL manifest, specs, calibration
def test_manifest_spec(tmp_path, librispeech):
    files = sorted(librispeech.rglob('*.flac'))
    m = tmp_path / 'list.jsonl'
    m.write_text(''.join(json.dumps({'path': str(f), 'text': f"utt {i}"}) + '\n' for i, f in enumerate(files)))
    ds = load_dataset(f"manifest:{m}")
    assert ds.texts == ['utt 0', 'utt 1', 'utt 2']
    sub = calibration_subset(f"manifest:{m}", 2, seed=0)
    assert len(sub) == 2 and sub.ids == calibration_subset(f"manifest:{m}", 2, seed=0).ids


def test_calibration_from_a_corpus_decodes_only_the_draw(librispeech, monkeypatch):
    import fade_asr.data as D
    calls = []
    real = D.audio_chunks                       # every reader decodes through it
    monkeypatch.setattr(D, 'audio_chunks', lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    sub = calibration_subset(f"librispeech:{librispeech}", 2, seed=3)
    assert len(sub) == 2 and len(calls) == 2 and sub.seed == 3
    with pytest.raises(ValueError, match='n=5 but'):
        calibration_subset(f"librispeech:{librispeech}", 5, seed=0)


def test_spec_parsing():
    assert parse_data_spec('asterisk') is None
    assert parse_data_spec('librispeech:/a/b')[0] == 'librispeech'
    with pytest.raises(ValueError, match="unknown corpus kind 'libri'"):
        parse_data_spec('libri:/a')
    with pytest.raises(ValueError, match='has no path'):
        parse_data_spec('tedlium:')
    with pytest.raises(ValueError, match="librispeech:/data/LibriSpeech/test-clean"):
        load_dataset('librispeech')                          # a bare name: not shipped; the message shows the spec
