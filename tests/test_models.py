"""Tests for fade_asr.whisper and fade_asr.models: the CTranslate2 reader, the CT2 -> HF Whisper converter and the conversion cache.

The central test (`test_greedy_tokens_equal_ctranslate2`) proves the conversion exact: on 10 real utterances
the converted model's greedy token ids equal those of the `ctranslate2` engine, token for token.
"""
import json, os, shutil, struct, time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

import fade_asr.whisper as M
from fade_asr.whisper import (Ct2File, Ct2FormatError, read_ct2, ct2_to_hf, bundled_model_dir, cache_entry_valid,
                              cache_root, CACHE_MARKER, hf_greedy_tokens, ct2_greedy_tokens)
from fade_asr.families import family_for
from fade_asr.models import load_model, source_format
from fade_asr.data import load_dataset

BUNDLED = bundled_model_dir()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def loaded(cache):
    "Bundled model through the cache: first call converts, the returned one is loaded back from the cache."
    first = load_model(cache_dir=cache)
    assert first.converted
    second = load_model(cache_dir=cache)
    assert not second.converted
    return second


@pytest.fixture(scope='module')
def raw_bin() -> bytes:
    return (BUNDLED / 'model.bin').read_bytes()


def ct2_copy(dst: Path, model_bin: bytes | None = None) -> Path:
    "A CT2 dir in `dst` with the bundled config/tokenizer and the given (maybe damaged) model.bin bytes."
    dst.mkdir(parents=True, exist_ok=True)
    for f in ('config.json', 'tokenizer.json', 'vocabulary.txt'):
        shutil.copy(BUNDLED / f, dst / f)
    if model_bin is None: shutil.copy(BUNDLED / 'model.bin', dst / 'model.bin')
    else: (dst / 'model.bin').write_bytes(model_bin)
    return dst


def first_var_offsets(b: bytes) -> dict:
    "Offsets (independent re-implementation of the header walk) of the first variable's fields."
    o = 4; n = struct.unpack_from('<H', b, o)[0]; o += 2 + n + 4
    count_at = o; o += 4
    n = struct.unpack_from('<H', b, o)[0]; o += 2 + n
    rank = b[o]; o += 1 + 4 * rank
    dtype_at = o; nbytes_at = o + 1
    return dict(count=count_at, dtype=dtype_at, nbytes=nbytes_at, data=o + 5)


# ---------------------------------------------------------------- THE PROOF
def test_greedy_tokens_equal_ctranslate2(loaded):
    "Converted (and cache-reloaded) model == ctranslate2 engine, greedy token ids, on 10 real utterances."
    ds = load_dataset('asterisk', split='test', limit=10)
    utts = list(ds)
    assert len(utts) == 10
    fe = loaded.processor.feature_extractor
    feats = fe([u.audio for u in utts], sampling_rate=16000, return_tensors='np').input_features
    assert feats.shape == (10, 80, 3000)
    ours = hf_greedy_tokens(loaded.model, feats)
    ref = ct2_greedy_tokens(BUNDLED, feats)
    for u, a, b in zip(utts, ours, ref):
        assert a == b, f"{u.id}: HF {a} != CT2 {b}"
    # and the tokens are real transcripts, not e.g. empty strings on both sides
    texts = loaded.processor.tokenizer.batch_decode(ours, skip_special_tokens=True)
    assert all(len(t.strip()) > 0 for t in texts)
    hits = sum(u.text.lower().split()[0].strip('.,') in t.lower() for u, t in zip(utts, texts))
    assert hits >= 8, list(zip([u.text for u in utts], texts))


def test_logits_close_to_ctranslate2_first_step(loaded):
    "Beyond argmax: first-step log-probs agree with CT2's to float32 tolerance."
    import ctranslate2
    u = next(iter(load_dataset('asterisk', split='test', limit=1)))
    feats = loaded.processor.feature_extractor(u.audio, sampling_rate=16000, return_tensors='np').input_features
    m = ctranslate2.models.Whisper(str(BUNDLED), device='cpu', compute_type='float32')
    enc = m.encode(ctranslate2.StorageView.from_array(feats.astype(np.float32)))
    ct2_enc = np.array(enc)
    with torch.inference_mode():
        hf_enc = loaded.model.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    np.testing.assert_allclose(hf_enc, ct2_enc, atol=2e-3, rtol=1e-3)


# ---------------------------------------------------------------- reader fault injection
def test_reader_reads_bundled(raw_bin):
    f = read_ct2(BUNDLED)
    assert (f.spec_name, f.version, f.revision) == ('WhisperSpec', 6, 3)
    assert len(f.variables) == 148 and f.aliases == {'decoder/projection/weight': 'decoder/embeddings/weight'}
    assert sum(v.nbytes for v in f.variables.values()) < len(raw_bin)


@pytest.mark.parametrize('cut', [3, 10, 30, 1000, 'half', -5])
def test_truncated_file(tmp_path, raw_bin, cut):
    n = len(raw_bin) // 2 if cut == 'half' else cut
    (tmp_path / 'model.bin').write_bytes(raw_bin[:n])
    with pytest.raises(Ct2FormatError, match='truncated'):
        read_ct2(tmp_path)


def test_truncated_dir_not_converted_or_cached(tmp_path, raw_bin):
    d = ct2_copy(tmp_path / 'm', raw_bin[:len(raw_bin) // 3])
    with pytest.raises(Ct2FormatError, match='truncated'):
        load_model(d, cache_dir=tmp_path / 'c')
    assert not any((tmp_path / 'c').glob('ct2-*'))


def test_bad_dtype_byte(tmp_path, raw_bin):
    b = bytearray(raw_bin); b[first_var_offsets(raw_bin)['dtype']] = 9
    (tmp_path / 'model.bin').write_bytes(bytes(b))
    with pytest.raises(Ct2FormatError, match='unknown dtype code 9'):
        read_ct2(tmp_path)


def test_wrong_but_known_dtype_byte(tmp_path, raw_bin):
    off = first_var_offsets(raw_bin)
    b = bytearray(raw_bin); b[off['dtype']] = 0 if raw_bin[off['dtype']] != 0 else 1
    (tmp_path / 'model.bin').write_bytes(bytes(b))
    with pytest.raises(Ct2FormatError, match='should have'):
        read_ct2(tmp_path)


def test_trailing_garbage(tmp_path, raw_bin):
    (tmp_path / 'model.bin').write_bytes(raw_bin + b'\0junk')
    with pytest.raises(Ct2FormatError, match='trailing garbage'):
        read_ct2(tmp_path)


def test_nonsense_count(tmp_path, raw_bin):
    b = bytearray(raw_bin); struct.pack_into('<I', b, first_var_offsets(raw_bin)['count'], 2**31)
    (tmp_path / 'model.bin').write_bytes(bytes(b))
    with pytest.raises(Ct2FormatError, match='impossible'):
        read_ct2(tmp_path)


def test_nonsense_nbytes(tmp_path, raw_bin):
    b = bytearray(raw_bin); struct.pack_into('<I', b, first_var_offsets(raw_bin)['nbytes'], 2**31)
    (tmp_path / 'model.bin').write_bytes(bytes(b))
    with pytest.raises(Ct2FormatError, match='should have'):
        read_ct2(tmp_path)


def test_unsupported_version(tmp_path, raw_bin):
    (tmp_path / 'model.bin').write_bytes(struct.pack('<I', 99) + raw_bin[4:])
    with pytest.raises(Ct2FormatError, match='version 99 is not supported'):
        read_ct2(tmp_path)


def test_empty_model_bin(tmp_path):
    (tmp_path / 'model.bin').write_bytes(b'')
    with pytest.raises(Ct2FormatError, match='truncated'):
        read_ct2(tmp_path)


def test_format_error_is_value_error():
    assert issubclass(Ct2FormatError, ValueError)


# ---------------------------------------------------------------- source errors
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model(tmp_path / 'nope', cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match='no CTranslate2 model.bin'):
        read_ct2(tmp_path / 'nope')


def test_text_file_as_model_dir(tmp_path):
    p = tmp_path / 'notes.txt'; p.write_text('hello')
    with pytest.raises(NotADirectoryError, match='is a file'):
        load_model(p, cache_dir=tmp_path)
    with pytest.raises(NotADirectoryError):
        ct2_to_hf(p)


def test_model_bin_file_hints_parent(tmp_path):
    with pytest.raises(NotADirectoryError, match='pass its directory'):
        load_model(BUNDLED / 'model.bin', cache_dir=tmp_path)


def test_empty_dir(tmp_path):
    d = tmp_path / 'empty'; d.mkdir()
    with pytest.raises(FileNotFoundError, match='is empty'):
        load_model(d, cache_dir=tmp_path)


def test_dir_without_model_files(tmp_path):
    d = tmp_path / 'x'; d.mkdir(); (d / 'readme.txt').write_text('hi')
    with pytest.raises(FileNotFoundError, match='neither model.bin nor config.json'):
        load_model(d, cache_dir=tmp_path)


def test_ct2_dir_missing_tokenizer(tmp_path):
    d = ct2_copy(tmp_path / 'm'); (d / 'tokenizer.json').unlink()
    with pytest.raises(FileNotFoundError, match='tokenizer.json'):
        load_model(d, cache_dir=tmp_path / 'c')


def test_unknown_family(tmp_path):
    d = tmp_path / 'bert'; d.mkdir(); (d / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
    with pytest.raises(ValueError, match="unsupported model family 'bert': fade_asr quantizes moonshine, qwen3_asr, whisper"):
        load_model(d)


def test_config_without_model_type(tmp_path):
    d = tmp_path / 'x'; d.mkdir(); (d / 'config.json').write_text('{}')
    with pytest.raises(ValueError, match='no .model_type.'):
        source_format(d)
    (d / 'config.json').write_text('not json')
    with pytest.raises(ValueError, match='not a valid JSON'):
        source_format(d)


def test_hf_dir_without_weights(tmp_path, loaded):
    d = tmp_path / 'hf'; d.mkdir(); shutil.copy(loaded.cache_dir / 'config.json', d / 'config.json')
    with pytest.raises(ValueError, match='could not load the whisper checkpoint'):
        load_model(d)


# ---------------------------------------------------------------- strict conversion
def _patched_read(monkeypatch, edit):
    real = M.read_ct2
    def fake(path):
        f = real(path); v = dict(f.variables); edit(v)
        return Ct2File(f.spec_name, f.version, f.revision, v, f.aliases)
    monkeypatch.setattr(M, 'read_ct2', fake)


def test_extra_tensor_is_refused(monkeypatch):
    _patched_read(monkeypatch, lambda v: v.__setitem__('encoder/layer_0/extra/weight', np.zeros(3, np.float16)))
    with pytest.raises(Ct2FormatError, match=r"not used.*encoder/layer_0/extra/weight"):
        ct2_to_hf(BUNDLED)


def test_missing_tensor_is_refused(monkeypatch):
    _patched_read(monkeypatch, lambda v: v.pop('decoder/layer_3/ffn/linear_1/bias'))
    with pytest.raises(Ct2FormatError, match='decoder/layer_3/ffn/linear_1/bias.*missing'):
        ct2_to_hf(BUNDLED)


def test_nonzero_k_bias_is_refused(monkeypatch):
    def edit(v):
        b = v['encoder/layer_1/self_attention/linear_0/bias'].copy(); b[384 + 7] = 0.5
        v['encoder/layer_1/self_attention/linear_0/bias'] = b
    _patched_read(monkeypatch, edit)
    with pytest.raises(Ct2FormatError, match='non-zero key block'):
        ct2_to_hf(BUNDLED)


def test_wrong_architecture_scalar_is_refused(monkeypatch):
    _patched_read(monkeypatch, lambda v: v.__setitem__('decoder/activation', np.array(1, np.int8)))
    with pytest.raises(Ct2FormatError, match='decoder/activation'):
        ct2_to_hf(BUNDLED)


def test_hf_strict_load_catches_dropped_key(monkeypatch):
    "Even if the name mapping dropped a tensor, load_state_dict(strict=True) refuses."
    real = M._whisper_state_dict
    def fake(t, config):
        sd = real(t, config); sd.pop('model.encoder.layers.0.fc1.bias'); return sd
    monkeypatch.setattr(M, '_whisper_state_dict', fake)
    with pytest.raises(RuntimeError, match='fc1.bias'):
        ct2_to_hf(BUNDLED)


def test_hf_strict_load_catches_extra_key(monkeypatch):
    real = M._whisper_state_dict
    def fake(t, config):
        sd = real(t, config); sd['model.encoder.layers.0.self_attn.k_proj.bias'] = np.zeros(384, np.float16); return sd
    monkeypatch.setattr(M, '_whisper_state_dict', fake)
    with pytest.raises(RuntimeError, match='k_proj.bias'):
        ct2_to_hf(BUNDLED)


def test_converted_weights_match_file(loaded):
    f = read_ct2(BUNDLED); sd = loaded.model.state_dict(); d = 384
    w = f.variables['encoder/layer_2/self_attention/linear_0/weight'].astype(np.float32)
    for j, n in enumerate('qkv'):
        np.testing.assert_array_equal(sd[f'model.encoder.layers.2.self_attn.{n}_proj.weight'].numpy(), w[j*d:(j+1)*d])
    np.testing.assert_array_equal(sd['proj_out.weight'].numpy(), f.variables['decoder/embeddings/weight'].astype(np.float32))
    assert loaded.model.proj_out.weight.data_ptr() == loaded.model.model.decoder.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert not loaded.model.training


def test_every_tensor_survives_cache_roundtrip(loaded):
    "Every tensor of the cache-loaded model equals the CT2 value it came from (nothing re-initialised by HF)."
    d = BUNDLED; f = read_ct2(d); t = M._Take(f)
    cfg = json.loads((d / 'config.json').read_text())
    config = M._whisper_config(t, cfg, M._special_ids(d / 'tokenizer.json'))
    ref = M._whisper_state_dict(t, config); t.finish()
    sd = loaded.model.state_dict()
    assert set(sd) == set(ref)
    bad = [k for k in ref if not np.array_equal(sd[k].numpy(), ref[k].astype(np.float32))]
    assert bad == []


def test_generation_config(loaded):
    g = loaded.generation_config
    cfg = json.loads((BUNDLED / 'config.json').read_text())
    assert g.decoder_start_token_id == 50257 and g.no_timestamps_token_id == 50362 and g.eos_token_id == 50256
    assert list(g.suppress_tokens) == cfg['suppress_ids'] and list(g.begin_suppress_tokens) == cfg['suppress_ids_begin']
    assert g.is_multilingual is False and g.max_length == 448


# ---------------------------------------------------------------- cache
def test_cache_hit_does_not_reconvert(loaded, cache, monkeypatch):
    def boom(*a, **k): raise AssertionError('reconverted on a cache hit')
    monkeypatch.setattr(M, 'ct2_to_hf', boom)
    t0 = time.perf_counter(); lm = load_model(cache_dir=cache); dt = time.perf_counter() - t0
    assert not lm.converted and lm.cache_dir == loaded.cache_dir
    print(f"cache load {dt:.2f} s")


def test_cache_layout(loaded, cache):
    e = loaded.cache_dir
    assert e.parent == cache and e.name == 'ct2-' + M.file_sha256(BUNDLED / 'model.bin')[:16]
    names = {p.name for p in e.iterdir()}
    assert {'model.safetensors', 'config.json', 'generation_config.json', 'processor_config.json',
            'tokenizer.json', CACHE_MARKER} <= names
    assert cache_entry_valid(e)


def test_cache_is_keyed_by_content_not_path(loaded, cache, tmp_path, monkeypatch):
    d = ct2_copy(tmp_path / 'moved')
    monkeypatch.setattr(M, 'ct2_to_hf', lambda *a, **k: (_ for _ in ()).throw(AssertionError('reconverted')))
    lm = load_model(d, cache_dir=cache)
    assert lm.cache_dir == loaded.cache_dir and not lm.converted and lm.source == str(d)


def test_env_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv('FADE_ASR_CACHE', str(tmp_path / 'envcache'))
    assert cache_root() == tmp_path / 'envcache'
    assert cache_root(tmp_path / 'x') == tmp_path / 'x'
    lm = load_model()
    assert lm.converted and lm.cache_dir.parent == tmp_path / 'envcache' and cache_entry_valid(lm.cache_dir)


def _entry_copy(loaded, root: Path) -> Path:
    e = root / loaded.cache_dir.name; shutil.copytree(loaded.cache_dir, e); return e


@pytest.mark.parametrize('damage', ['no_marker', 'short_weights', 'old_version', 'garbage_marker', 'garbage_weights', 'poisoned'])
def test_bad_cache_entry_is_rebuilt(loaded, tmp_path, damage):
    root = tmp_path / 'c'; e = _entry_copy(loaded, root)
    st_ = e / 'model.safetensors'; mk = e / CACHE_MARKER
    if damage == 'no_marker': mk.unlink()
    elif damage == 'short_weights': st_.write_bytes(st_.read_bytes()[:1000])
    elif damage == 'old_version':
        m = json.loads(mk.read_text()); m['converter_version'] = -1; mk.write_text(json.dumps(m))
    elif damage == 'garbage_marker': mk.write_text('{not json')
    elif damage == 'garbage_weights': st_.write_bytes(b'\x07' * st_.stat().st_size)  # same size, sizes look fine
    elif damage == 'poisoned':                       # same size, still a valid safetensors file: other weights
        b = bytearray(st_.read_bytes()); b[-100] ^= 0x40; st_.write_bytes(bytes(b))
    assert not cache_entry_valid(e)                  # found by its content hash, before anything loads it
    lm = load_model(cache_dir=root)
    assert lm.converted and cache_entry_valid(e)
    assert sorted(p.name for p in root.iterdir()) == [e.name]  # no temp/trash dirs left
    assert not load_model(cache_dir=root).converted


def test_stale_temp_dir_is_ignored(loaded, tmp_path):
    root = tmp_path / 'c'; root.mkdir()
    junk = root / f'.tmp-{loaded.cache_dir.name}-dead'; junk.mkdir(); (junk / 'config.json').write_text('{}')
    lm = load_model(cache_dir=root)
    assert lm.converted and lm.cache_dir == root / loaded.cache_dir.name


def test_crash_while_writing_leaves_no_entry(tmp_path, monkeypatch):
    from transformers import WhisperProcessor
    def crash(self, *a, **k): raise RuntimeError('disk full')
    monkeypatch.setattr(WhisperProcessor, 'save_pretrained', crash)
    root = tmp_path / 'c'
    with pytest.raises(RuntimeError, match='disk full'):
        load_model(cache_dir=root)
    assert list(root.iterdir()) == []  # neither a final entry nor a leftover temp dir


def test_cache_entry_is_a_loadable_hf_checkpoint(loaded):
    lm = load_model(loaded.cache_dir)
    assert lm.family == 'whisper' and lm.cache_dir is None
    assert family_for('whisper').name == 'whisper'


# ---------------------------------------------------------------- reader properties
_DT = {0: '<f4', 1: 'i1', 2: '<i2', 3: '<i4', 4: '<f2'}


def _write_ct2(path: Path, arrays: dict, codes: dict, aliases: dict):
    "An independent writer of the CT2 layout."
    s = lambda x: struct.pack('<H', len(x.encode()) + 1) + x.encode() + b'\0'
    b = struct.pack('<I', 6) + s('TestSpec') + struct.pack('<II', 1, len(arrays))
    for n, a in arrays.items():
        raw = np.ascontiguousarray(a, dtype=_DT[codes[n]]).tobytes()
        b += s(n) + struct.pack('<B', a.ndim) + struct.pack(f'<{a.ndim}I', *a.shape) + struct.pack('<BI', codes[n], len(raw)) + raw
    b += struct.pack('<I', len(aliases)) + b''.join(s(k) + s(v) for k, v in aliases.items())
    path.write_bytes(b); return b


_var = st.tuples(st.sampled_from(sorted(_DT)), st.lists(st.integers(0, 4), min_size=0, max_size=3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.dictionaries(st.text('abc/_é', min_size=1, max_size=8), _var, min_size=1, max_size=5), data=st.data())
def test_roundtrip_and_every_truncation_fails_cleanly(tmp_path, spec, data):
    rng = np.random.default_rng(0)
    arrays = {n: (rng.standard_normal(dims) * 50).astype(_DT[c]) for n, (c, dims) in spec.items()}
    codes = {n: c for n, (c, _) in spec.items()}
    names = list(arrays)
    aliases = {'alias_' + names[0]: names[0]}
    p = tmp_path / 'model.bin'
    b = _write_ct2(p, arrays, codes, aliases)
    f = read_ct2(p)
    assert list(f.variables) == names and f.aliases == aliases
    for n in names:
        np.testing.assert_array_equal(f.variables[n], arrays[n]); assert f.variables[n].dtype == np.dtype(_DT[codes[n]])
    cut = data.draw(st.integers(0, len(b) - 1))
    p.write_bytes(b[:cut])
    with pytest.raises(Ct2FormatError):
        read_ct2(p)


def test_bfloat16_widens_exactly(tmp_path):
    x = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    bf = (x.view(np.uint32) >> 16).astype('<u2')
    s = lambda t: struct.pack('<H', len(t) + 1) + t.encode() + b'\0'
    b = struct.pack('<I', 6) + s('S') + struct.pack('<II', 1, 1) + s('w') + struct.pack('<BI', 1, 4)
    b += struct.pack('<BI', 5, 8) + bf.tobytes() + struct.pack('<I', 0)
    (tmp_path / 'model.bin').write_bytes(b)
    np.testing.assert_array_equal(read_ct2(tmp_path).variables['w'], x)


def test_inert_alibi_flags_of_current_ctranslate2_are_accepted(monkeypatch):
    "Current CTranslate2 writes two inert scalars; at their neutral value they convert exactly, otherwise they are refused."
    def add(val):
        return lambda v: v.update({'decoder/alibi_use_positive_positions': np.array(val, np.int8),
                                   'decoder/scale_alibi': np.array(0, np.int8)})
    _patched_read(monkeypatch, add(0))
    model, _ = ct2_to_hf(BUNDLED)
    assert model.config.decoder_layers == 4
    _patched_read(monkeypatch, add(1))
    with pytest.raises(Ct2FormatError, match="alibi_use_positive_positions"):
        ct2_to_hf(BUNDLED)
