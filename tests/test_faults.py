"""Fault injection: bad inputs get a one-line error that names the problem and the fix, never a silently wrong number."""
import json, shutil

import numpy as np
import pytest
import torch

from fade_asr.data import AudioError, load_audio, save_audio
from fade_asr.families import CheckpointError
from fade_asr.models import load_model
from fade_asr.scoring import EmptyReferenceError, transcribe, wer_report
from fade_asr.testing import FrameCountModel, tiny_random_whisper, tiny_tokenizer
from fade_asr.whisper import whisper_default_processor

from test_cli import run_cli


@pytest.mark.parametrize('ref', ['...', '!?', ' - ', '. . .'])
def test_punctuation_only_reference_is_empty(ref):
    with pytest.raises(EmptyReferenceError, match="'u2'"):
        wer_report(['fine', ref], ['fine', 'x'], ids=['u1', 'u2'])
    assert wer_report(['wait... what'], ['wait what']).wer == 0


def _float_wav(path, x):
    import av
    with av.open(str(path), 'w', format='wav') as c:
        s = c.add_stream('pcm_f32le', rate=16000, layout='mono')
        fr = av.AudioFrame.from_ndarray(x[None].astype(np.float32), format='flt', layout='mono'); fr.rate = 16000
        for p in s.encode(fr): c.mux(p)
        for p in s.encode(None): c.mux(p)


def test_non_finite_audio_is_refused_at_load_naming_the_file(tmp_path):
    x = np.zeros(16000, np.float32); x[100] = np.nan
    _float_wav(tmp_path / 'bad.wav', x)
    with pytest.raises(AudioError, match=r'bad\.wav holds 1 non-finite'):
        load_audio(tmp_path / 'bad.wav')


def test_non_finite_audio_arrays_are_refused_before_decoding():
    tok = tiny_tokenizer(['<|endoftext|>'], eos_token='<|endoftext|>')
    m = FrameCountModel(tok)
    proc = whisper_default_processor(tiny_random_whisper())
    a = np.zeros(8000, np.float32); a[5] = np.inf
    with pytest.raises(ValueError, match='audio 1 holds 1 non-finite'):
        transcribe(m, proc, [np.zeros(8000, np.float32), a], progress=False)


def test_calibration_with_nan_audio_names_the_utterance():
    from fade_asr.families import pack_utterances
    from fade_asr.testing import Utt
    us = [Utt(i, 1.0, np.random.default_rng(i)) for i in range(3)]; us[1].audio[3] = np.nan
    with pytest.raises(ValueError, match='u1 hold non-finite'):
        pack_utterances(us)


@pytest.fixture(scope='module')
def saved_whisper(tmp_path_factory):
    m = tiny_random_whisper(); proc = whisper_default_processor(m)
    d = tmp_path_factory.mktemp('ckpt') / 'w'
    m.save_pretrained(d); proc.save_pretrained(d)
    return d


def test_pickled_weights_are_never_loaded(saved_whisper, tmp_path):
    d = tmp_path / 'pickled'; shutil.copytree(saved_whisper, d)
    m = tiny_random_whisper()
    (d / 'model.safetensors').unlink(); torch.save(m.state_dict(), d / 'pytorch_model.bin')
    with pytest.raises(CheckpointError, match=r'only as pickles \(pytorch_model\.bin\).*safe_serialization=True'):
        load_model(d)


def test_nan_weights_are_refused_naming_the_tensor(saved_whisper, tmp_path):
    from safetensors.torch import load_file, save_file
    d = tmp_path / 'nan'; shutil.copytree(saved_whisper, d)
    sd = load_file(d / 'model.safetensors'); k = 'model.encoder.layers.1.fc2.weight'
    sd[k][0, 0] = float('nan'); save_file(sd, d / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(CheckpointError, match=rf'tensor {k} holds 1 NaN/inf'):
        load_model(d)


def test_unexpected_weights_are_refused(saved_whisper, tmp_path):
    from safetensors.torch import load_file, save_file
    d = tmp_path / 'extra'; shutil.copytree(saved_whisper, d)
    sd = load_file(d / 'model.safetensors'); sd['model.encoder.layers.9.fc2.weight'] = torch.zeros(2, 2)
    save_file(sd, d / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(CheckpointError, match='unexpected keys: model.encoder.layers.9.fc2.weight'):
        load_model(d)


@pytest.fixture(scope='module')
def packed_model():
    from fade_asr.packing import pack_model
    from fade_asr.pipeline import QuantConfig, quantize
    from fade_asr.testing import Utt
    m = tiny_random_whisper(); proc = whisper_default_processor(m)
    rng = np.random.default_rng(0)
    qm, rep = quantize(m, [Utt(i, 1.0, rng) for i in range(4)], QuantConfig.make(method='rtn', bits=4, group_size=32),
                       processor=proc, progress=False)
    return pack_model(qm, rep.solutions), proc


@pytest.fixture(scope='module')
def packed(packed_model, tmp_path_factory):
    from fade_asr.packing import save_packed
    d = tmp_path_factory.mktemp('packed') / 'p'
    save_packed(*packed_model[:1], d, packed_model[1])
    return d


def _edit_packed(src, dst, tensors=None, qc=None):
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if tensors:
        sd = load_file(dst / 'model.safetensors'); tensors(sd)
        save_file(sd, dst / 'model.safetensors', metadata={'format': 'pt'})
    if qc: (dst / 'quantize_config.json').write_text(qc(json.loads((dst / 'quantize_config.json').read_text())))
    return dst


@pytest.mark.parametrize('case,tensors,qc,msg', [
    ('nan-scales', lambda sd: sd['model.encoder.layers.0.fc1.scales'].view(-1).__setitem__(0, float('nan')), None,
     'tensor model.encoder.layers.0.fc1.scales holds NaN/inf'),
    ('g_idx', lambda sd: sd['model.encoder.layers.0.fc1.g_idx'].view(-1).__setitem__(0, 99), None, 'g_idx points outside'),
    ('array', None, lambda q: '[1, 2]', 'must hold a JSON object'),
    ('bits', None, lambda q: json.dumps({**q, 'bits': 'four'}), "bits is 'four'"),
])
def test_damaged_packed_checkpoints_are_refused(packed, tmp_path, case, tensors, qc, msg):
    from fade_asr.packing import load_packed
    d = _edit_packed(packed, tmp_path / case, tensors, qc)
    with pytest.raises(ValueError, match=msg):
        load_packed(d)
    r = run_cli('eval', '--model', str(d), '--limit', '1', '--data', 'asterisk')
    assert r.returncode != 0 and msg.split()[0] in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_activation_clips_nan_or_missing_are_refused():
    from fade_asr.actquant import attach_act_quant, restore_act_quant
    m = tiny_random_whisper()
    names = ['model.encoder.layers.0.fc1', 'model.encoder.layers.0.fc2']
    with pytest.raises(ValueError, match="clip of 'model.encoder.layers.0.fc2' is nan"):
        attach_act_quant(m, {names[0]: 1.0, names[1]: float('nan')}, 8)
    attach_act_quant(m, {n: 1.0 for n in names}, 8)
    state = json.loads(json.dumps(m._fade_act)); state['clips'].pop(names[1])
    with pytest.raises(ValueError, match='holds 2 activation clips but lists 1'):
        restore_act_quant(m, state)


def test_bare_command_prints_help():
    r = run_cli()
    assert r.returncode == 0 and 'usage: fade-asr' in r.stdout and 'quantize' in r.stdout, r.stderr


def test_ctrl_c_is_one_line_and_no_traceback(tmp_path):
    import os, signal, subprocess, sys, time
    env = {**os.environ, 'FADE_ASR_QUIET': '1'}
    p = subprocess.Popen([sys.executable, '-c', 'import sys; from fade_asr.cli import main; sys.exit(main())', 'quantize',
                          '--out', str(tmp_path / 'o'), '--limit', '1'], stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores SIGINT
    time.sleep(8); p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and 'interrupted' in err and 'Traceback' not in err, err
    assert not (tmp_path / 'o').exists() and list(tmp_path.iterdir()) == []


def test_bench_limit_reports_its_runs_and_names_a_damaged_run(tmp_path, saved_whisper):
    out = tmp_path / 'b'
    base = ('bench', '--methods', 'FP', '--bits', '4', '--seeds', '1', '--data', 'asterisk', '--limit', '2', '--out', str(out))
    r = run_cli(*base)
    assert r.returncode == 0 and '| FP |' in r.stdout, r.stderr[-2000:]
    assert (out / 'report-limit2' / 'results.md').is_file() and not (out / 'results.md').exists()
    r = run_cli(*base, '--model', str(saved_whisper))           # another model into the same --out: refused
    assert r.returncode != 0 and 'different model_sha256' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    run = next((out / 'runs-limit2').glob('w4/*.json')); run.write_text('{"label": "FP", ')
    r = run_cli(*base, '--report-only')
    assert r.returncode != 0 and f'benchmark run {run} is damaged' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_non_utf8_recipes_file_is_named(tmp_path):
    ini = tmp_path / 'r.ini'; ini.write_bytes(b'[fade-x]\nmethod = fade\n# caf\xe9\n')
    r = run_cli('recipes', '--recipes', str(ini))
    assert r.returncode != 0 and f'recipes file {ini} is not UTF-8' in r.stderr, r.stderr


def test_a_full_disk_is_one_clear_error_and_changes_nothing(packed_model, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError
    from fade_asr.packing import save_packed
    pm, proc = packed_model
    def full(*a, **k): raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull })')
    monkeypatch.setattr(safetensors.torch, 'save_file', full)
    with pytest.raises(OSError, match='is the disk full or read-only'):
        save_packed(pm, tmp_path / 'p', proc)
    assert list(tmp_path.iterdir()) == []


def test_damaged_ct2_variables_name_the_file(monkeypatch):
    import fade_asr.whisper as W
    real = W.read_ct2
    def edit(rename=False, nan=False):
        def fake(path):
            f = real(path); v = dict(f.variables)
            if rename: v['encoder/layer_0/ffn/linear_0/weighX'] = v.pop('encoder/layer_0/ffn/linear_0/weight')
            if nan:
                w = v['decoder/layer_1/ffn/linear_1/weight'].copy(); w[0, 0] = np.nan; v['decoder/layer_1/ffn/linear_1/weight'] = w
            return W.Ct2File(f.spec_name, f.version, f.revision, v, f.aliases)
        return fake
    d = W.bundled_model_dir()
    monkeypatch.setattr(W, 'read_ct2', edit(rename=True))
    with pytest.raises(W.Ct2FormatError, match=r"model\.bin: CT2 variable 'encoder/layer_0/ffn/linear_0/weight' is missing"):
        W.ct2_to_hf(d)
    monkeypatch.setattr(W, 'read_ct2', edit(nan=True))
    with pytest.raises(W.Ct2FormatError, match=r'decoder/layer_1/ffn/linear_1/weight holds NaN/inf'):
        W.ct2_to_hf(d)


@pytest.mark.parametrize('case,tensors,qc,msg', [
    ('v1-over-v2', None, lambda q: json.dumps({**q, 'fade_asr': {**q['fade_asr'], 'format': 'v1'}}), 'decodes to other weights'),
    ('edited-weights', lambda sd: sd['model.decoder.layers.1.fc2.bias'].view(-1).__setitem__(0, 0.5), None,
     'is not the file that was saved'),
])
def test_checkpoints_that_do_not_decode_to_what_was_saved_are_refused(packed, tmp_path, case, tensors, qc, msg):
    from fade_asr.packing import load_packed
    with pytest.raises(ValueError, match=msg):
        load_packed(_edit_packed(packed, tmp_path / case, tensors, qc))


# ---------------------------------------------------------------- other languages
def test_the_language_reaches_generate_calibration_and_scoring(monkeypatch):
    import fade_asr.pipeline as P
    from fade_asr.pipeline import QuantConfig, quantize
    from fade_asr.scoring import evaluate
    from fade_asr.data import Utterance
    from fade_asr.testing import Utt, tiny_random_whisper_multilingual
    m, proc = tiny_random_whisper_multilingual()
    fr = proc.tokenizer.convert_tokens_to_ids('<|fr|>')
    seen = []
    real_generate = m.generate
    def spy(*a, **k): seen.append((k.get('language'), k.get('task'))); return real_generate(*a, **k)
    monkeypatch.setattr(m, 'generate', spy)
    transcribe(m, proc, [np.zeros(8000, np.float32)], language='fr', progress=False)
    assert seen[-1] == ('fr', 'transcribe')
    # each utterance in its own language (a manifest's lang column), scored with that language's normaliser
    rng = np.random.default_rng(0)
    utts = [Utterance('a', Utt(0, 0.5, rng).audio, "C'est l'été!", 'x', 'fr'), Utterance('b', Utt(1, 0.5, rng).audio, 'Hello, Mr. Smith.', 'x')]
    seen.clear()
    r = evaluate(m, proc, {'mixed': utts}, progress=False, max_new_tokens=3)['mixed']
    assert sorted(seen) == [('en', 'transcribe'), ('fr', 'transcribe')] and r.normalizer == 'basic+english'
    # calibration prompts carry the language
    adapters = []
    real = P.get_adapter
    monkeypatch.setattr(P, 'get_adapter', lambda *a, **k: adapters.append(real(*a, **k)) or adapters[-1])
    quantize(m, [Utt(i, 1.0, rng) for i in range(4)], QuantConfig.make(method='rtn', bits=4, group_size=32, language='fr'),
             processor=proc, progress=False)
    assert fr in adapters[-1].prompt_ids()


def test_english_only_models_refuse_another_language():
    r = run_cli('eval', '--language', 'fr', '--limit', '1', '--data', 'asterisk')
    assert r.returncode != 0 and 'English-only' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_multilingual_checkpoint_without_processor_builds_one_from_tokenizer_json(tmp_path):
    from fade_asr.models import get_adapter
    from fade_asr.testing import tiny_random_whisper_multilingual
    m, proc = tiny_random_whisper_multilingual()
    d = tmp_path / 'w'; m.save_pretrained(d); proc.tokenizer.save_pretrained(d)
    assert not (d / 'preprocessor_config.json').exists()
    lm = load_model(d)
    ad = get_adapter(lm.model, lm.processor, language='de')
    assert lm.processor.tokenizer.convert_ids_to_tokens(ad.prompt_ids()) == [
        '<|startoftranscript|>', '<|de|>', '<|transcribe|>', '<|notimestamps|>']
    (d / 'tokenizer.json').unlink()
    r = run_cli('eval', '--model', str(d), '--limit', '1', '--data', 'asterisk')
    assert r.returncode != 0 and 'tokenizer.json' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_transformers_never_loads_a_packed_checkpoint_silently_wrong(packed):
    "config.json says the linears are GPTQ-packed: transformers needs its GPTQ backend, and says so, instead of random weights."
    from transformers import WhisperForConditionalGeneration
    qc = json.loads((packed / 'config.json').read_text())['quantization_config']
    assert (qc['quant_method'], qc['bits'], qc['group_size'], qc['checkpoint_format']) == ('gptq', 4, 32, 'gptq_v2')
    assert qc['block_name_to_quantize'] == ['model.decoder.layers', 'model.encoder.layers']     # both stacks, not only the decoder
    try: import optimum  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match='optimum'):
            WhisperForConditionalGeneration.from_pretrained(packed)


def test_a_safetensors_failure_anywhere_is_one_line(monkeypatch, capsys):
    import fade_asr.cli as C
    from safetensors import SafetensorError
    def boom(a): raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull })')
    monkeypatch.setattr(C, 'cmd_recipes', boom)
    with pytest.raises(SystemExit, match='fade-asr recipes: error: a safetensors file could not be read or written.*disk full'):
        C.main(['recipes'])


def test_a_long_recording_is_streamed_and_still_checked_at_load(tmp_path, monkeypatch):
    "A manifest's recording longer than LONG_AUDIO_S is never held whole, and a damaged one is still refused when read."
    import fade_asr.data as D
    from fade_asr.data import load_manifest
    monkeypatch.setattr(D, 'LONG_AUDIO_S', 1.0)
    save_audio(tmp_path / 'long.wav', 0.1 * np.sin(np.arange(3 * 16000) / 5.0))
    (tmp_path / 'm.jsonl').write_text(json.dumps({'file': str(tmp_path / 'long.wav'), 'text': 'a tone', 'duration': 3.0}) + '\n')
    ds = load_manifest(tmp_path / 'm.jsonl')
    assert type(ds[0].audio).__name__ == 'StreamedAudio' and ds[0].duration == 3.0
    assert np.array_equal(np.asarray(ds[0].audio), load_audio(tmp_path / 'long.wav'))
    b = (tmp_path / 'long.wav').read_bytes(); (tmp_path / 'cut.wav').write_bytes(b[:len(b) // 2])
    with pytest.raises(AudioError, match='cut.wav is truncated'):
        D.read_audio(tmp_path / 'cut.wav')


@pytest.mark.parametrize('args, msg', [
    (['quantize', '--seed', '-1'], 'argument --seed: must be a non-negative integer, not -1'),
    (['eval', '--batch-size', '0'], 'argument --batch-size: must be a positive integer, not 0'),
    (['eval', '--limit', 'many'], "argument --limit: 'many' is not an integer"),
    (['quantize', '--recipes', '{tmp}'], 'is a folder; pass the INI file itself'),
    (['quantize', '--recipes', '{tmp}/r.ini', '--recipe', 'x'], 'percdamp = inf must be a finite number'),
    (['eval', '--data', 'manifest:{tmp}/m.jsonl'], 'the audio path must be a non-empty string, not 123'),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, msg):
    "Each is refused at once, in one line that names the value: no model is loaded, nothing runs."
    (tmp_path / 'r.ini').write_text('[x]\nmethod = gptq\npercdamp = inf\n')
    (tmp_path / 'm.jsonl').write_text('{"file": 123, "text": "x"}\n')
    r = run_cli(*[a.format(tmp=tmp_path) for a in args])
    last = r.stderr.strip().splitlines()[-1]                        # argparse prints its usage above the error
    assert r.returncode != 0 and msg in last and last.startswith('fade-asr'), r.stderr
    assert 'Traceback' not in r.stderr, r.stderr
