"""Moonshine and Qwen3-ASR (small random configs built here: no weights can be downloaded) through the whole
RTN/GPTQ/QEP/FADE pipeline, GPTQ against RTN per layer, save -> quantize -> load -> generate; a multilingual
Whisper's language and task tokens."""
import numpy as np
import pytest
import torch

from fade_asr.models import get_adapter
from fade_asr.testing import tiny_random_moonshine, tiny_random_qwen3_asr, tiny_random_whisper, tiny_random_whisper_multilingual
from fade_asr.data import Utterance
from fade_asr.models import load_model
from fade_asr.pipeline import QuantConfig, quantize
from fade_asr.scoring import transcribe
from fade_asr.stablequant import quantize_model

BUILDERS = {'moonshine': tiny_random_moonshine, 'qwen3_asr': tiny_random_qwen3_asr}
TEXTS = ["the quick brown fox", "hello world", "she sells sea shells", "this is a test of speech",
         "the lazy dog", "numbers one two three", "it's the user's turn", "a b c d e"]


def utterances(n=8, seed=0):
    "Short noisy tones (0.8 to 2.2 s) with English texts: enough tokens per layer for H to be well conditioned."
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(int(16000 * (0.8 + 0.2 * i))) / 16000
        a = 0.2 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
        out.append(Utterance(f"u{i}", a.astype(np.float32), TEXTS[i % len(TEXTS)], 'synthetic'))
    return out


@pytest.fixture(scope='module', params=sorted(BUILDERS))
def family(request):
    # "realistic enough" for GPTQ vs RTN: d_in 64 and 256, several 32-column groups per row
    m, proc = BUILDERS[request.param](seed=0, hidden=64, ffn=256, layers=2)
    return request.param, m, proc


@pytest.mark.parametrize('method', ['rtn', 'gptq', 'qep', 'fade'])
def test_every_method_runs(family, method):
    name, m, proc = family
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q, rep = quantize(m, utterances(), QuantConfig.make(bits=3, group_size=32, method=method), processor=proc, progress=False)
    ad = get_adapter(m, proc)
    assert [r.name for r in rep.layers] == ad.linear_names() and len(rep.layers) == (32 if name == 'moonshine' else 26)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())          # the FP model is untouched
    for r in rep.layers:                                                            # every layer on the 3-bit grid
        w = q.get_submodule(r.name).weight.detach().reshape(r.shape[0], -1, 32)
        assert all(len(torch.unique(g)) <= 8 for row in w[:4] for g in row)   # per row and group
        assert np.isfinite(r.loss) and r.n_tokens > 0
    assert rep.n_windows == 8 and rep.n_utterances == 8
    if method == 'fade': assert len({round(r.alpha, 3) for r in rep.layers}) > 3   # per-layer alpha
    if method == 'qep': assert {r.alpha for r in rep.layers} == {0.5}
    with torch.no_grad():
        assert all(isinstance(t, str) for t in transcribe(q, proc, [u.audio for u in utterances(2)], progress=False))


DOWN_PROJ = {'moonshine': 'mlp.fc2', 'qwen3_asr': {'encoder': 'fc2', 'decoder': 'mlp.down_proj'}}


def test_qep_official_leaves_exactly_the_down_projections_uncorrected(family):
    "The shipped 'QEP official' recipe names a role (mlp_down), so each family's own down-projection is the one left at α = 0."
    from fade_asr.recipes import load_recipe
    name, m, proc = family
    cfg = load_recipe('qep-official-w3g128', group_size=32)
    _, rep = quantize(m, utterances(), cfg, processor=proc, progress=False)
    down = DOWN_PROJ[name]
    want = {r.name for r in rep.layers if r.name.endswith('.' + (down if isinstance(down, str) else down[r.stack]))}
    assert want and {r.name for r in rep.layers if r.alpha == 0.0} == want
    assert {r.role for r in rep.layers if r.name in want} == {'mlp_down'}
    assert {r.alpha for r in rep.layers if r.name not in want} == {0.5}


def test_gptq_not_worse_than_rtn_per_layer(family):
    """GPTQ minimises the same layer loss ‖W X − Q X‖² that RTN ignores, so per layer it should not be worse.
    It is a greedy, damped solver, so this is not a theorem: we allow 0.1 % per layer, and ask for a clear mean gain."""
    name, m, proc = family
    _, rep = quantize(m, utterances(), QuantConfig.make(bits=3, group_size=32, method='gptq'), processor=proc, progress=False)
    ratio = np.array([r.loss / r.loss_rtn for r in rep.layers])
    assert (ratio <= 1.001).all(), [(r.name, r.loss, r.loss_rtn) for r in rep.layers if r.loss > 1.001 * r.loss_rtn]
    assert ratio.mean() < 0.9, ratio.mean()


def test_save_quantize_load_generate_round_trip(family, tmp_path):
    name, m, proc = family
    src = tmp_path / 'fp'
    m.save_pretrained(src); proc.save_pretrained(src)
    lm = load_model(src)
    assert lm.family == name
    q, _ = quantize(lm.model, utterances(), QuantConfig.make(bits=4, group_size=32, method='gptq'), processor=lm.processor,
                    progress=False)
    out = tmp_path / 'q'
    q.save_pretrained(out); lm.processor.save_pretrained(out)
    back = load_model(out)
    assert back.family == name and type(back.model) is type(q)
    sd = q.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.model.state_dict().items())
    audios = [u.audio for u in utterances(3)]
    a = transcribe(q, lm.processor, audios, progress=False, max_tokens_per_s=4)
    b = transcribe(back.model, back.processor, audios, progress=False, max_tokens_per_s=4)
    assert a == b and len(a) == 3


def test_token_budget_applies_to_other_families(family):
    name, m, proc = family
    audio = [utterances(1)[0].audio]                      # 0.8 s: budget ceil(0.8 * 1) + 16 = 17 text tokens
    long = transcribe(m, proc, audio, progress=False, max_tokens_per_s=None, max_new_tokens=60)
    short = transcribe(m, proc, audio, progress=False, max_tokens_per_s=1.0)
    assert len(proc.tokenizer.encode(short[0], add_special_tokens=False)) <= 17 + 2
    assert long[0].startswith(short[0][:10])


def test_teacher_greedy_and_reference(family):
    name, m, proc = family
    ad = get_adapter(m, proc)
    ref = ad.prepare(ad.make_windows(utterances(2)), teacher='reference')
    gr = ad.prepare(ad.make_windows(utterances(2)), teacher='greedy')
    tok = proc.tokenizer
    n_prompt = len(ref[0].tokens) - len(tok.encode(TEXTS[0], add_special_tokens=False))
    assert tok.decode(ref[0].tokens[n_prompt:]) == TEXTS[0]
    assert torch.equal(gr[0].tokens[:n_prompt], ref[0].tokens[:n_prompt])       # same prompt, the model's own text


def test_qwen3_asr_quantizes_only_block_linears():
    m, proc = tiny_random_qwen3_asr()
    names = get_adapter(m, proc).linear_names()
    assert all(n.startswith(('model.audio_tower.layers.', 'model.language_model.layers.')) for n in names)
    q, _ = quantize(m, utterances(4), QuantConfig.make(bits=3, group_size=32, method='rtn'), processor=proc, progress=False)
    for keep in ('model.multi_modal_projector.linear_1.weight', 'model.audio_tower.conv_out.weight', 'lm_head.weight'):
        assert torch.equal(q.state_dict()[keep], m.state_dict()[keep])


def test_adapter_needs_a_processor():
    m, _ = tiny_random_moonshine()
    with pytest.raises(ValueError, match="needs the model's processor"):
        quantize(m, utterances(2), QuantConfig.make(bits=4, group_size=32, method='rtn'), progress=False)


# ------------------------------------------------------------------ Whisper: multilingual and English-only
def test_multilingual_whisper_language_and_task():
    m, proc = tiny_random_whisper_multilingual()
    v = proc.tokenizer.get_vocab()
    for lang, task in (('en', 'transcribe'), ('de', 'translate')):
        ad = get_adapter(m, proc, language=lang, task=task)
        (w, *_) = ad.prepare(ad.make_windows(utterances(2)))
        assert w.tokens[:4].tolist() == [v['<|startoftranscript|>'], v[f'<|{lang}|>'], v[f'<|{task}|>'], v['<|notimestamps|>']]
    seen = {}
    gen = m.generate
    def spy(*a, **k):
        seen.update(k); return gen(*a, **k)
    m.generate = spy
    transcribe(m, proc, [utterances(1)[0].audio], progress=False)
    assert (seen['language'], seen['task']) == ('en', 'transcribe')     # told, not detected
    q, rep = quantize(m, utterances(4), QuantConfig.make(bits=4, group_size=32, method='gptq'), processor=proc, progress=False)
    assert len(rep.layers) == 2 * 6 + 2 * 10


def test_english_only_whisper_gets_no_language():
    m = tiny_random_whisper()
    from fade_asr.whisper import whisper_default_processor
    seen = {}
    gen = m.generate
    def spy(*a, **k):
        seen.update(k); return gen(*a, **k)
    m.generate = spy
    transcribe(m, whisper_default_processor(m), [utterances(1)[0].audio], progress=False)
    assert 'language' not in seen and 'task' not in seen


def test_packed_checkpoint_round_trip(family, tmp_path):
    "quantize -> pack -> save -> load_packed gives the same transcripts (non-persistent buffers such as rotary tables rebuilt)."
    from fade_asr.packing import load_packed, pack_model, save_packed
    name, m, proc = family
    q, rep = quantize(m, utterances(), QuantConfig.make(bits=4, group_size=32, method='gptq'), processor=proc, progress=False)
    q = pack_model(q, rep.solutions, scale_dtype=torch.float32)
    save_packed(q, tmp_path / 'p', proc)
    back, bproc = load_packed(tmp_path / 'p')
    assert type(back) is type(q)
    audios = [u.audio for u in utterances(3)]
    assert transcribe(back, proc, audios, progress=False, max_tokens_per_s=4) == \
           transcribe(q, proc, audios, progress=False, max_tokens_per_s=4)


def test_weights_and_activations(family):
    "W8A8 with MSE clips: every quantizable layer of the family gets an input clip, the layers outside the weight pipeline (front end, projector) per-channel weights."
    from fade_asr.actquant import act_layers
    name, m, proc = family
    q, rep = quantize_model(m, utterances(4), QuantConfig.make(bits=8, group_size=-1, sym=True, method='rtn', act_bits=8, act_calib='mse',
                                                          act_n_calib=4), processor=proc, progress=False)
    assert set(rep.act['clips']) == set(act_layers(q)) and q._fade_act['bits'] == 8
    assert set(rep.act['per_channel_weights']) == set(act_layers(q)) - {r.name for r in rep.layers}
    assert rep.act['per_channel_weights'], 'the front end is quantized too'
    assert not any(mod._forward_pre_hooks for mod in m.modules()), 'the FP model is untouched'
    with torch.no_grad():
        assert all(isinstance(t, str) for t in transcribe(q, proc, [u.audio for u in utterances(2)], progress=False))


# ---------------------------------------------------------------- one registry
def test_one_registry_serves_loading_and_adapters():
    "Every shipped family registers its loader and its adapter in one place, and each family's module does it."
    from fade_asr.families import FAMILIES
    from fade_asr import whisper, moonshine, qwen3_asr
    from fade_asr.whisper import WhisperAdapter
    from fade_asr.moonshine import MoonshineAdapter
    from fade_asr.qwen3_asr import Qwen3ASRAdapter
    assert {k: v.adapter for k, v in FAMILIES.items()} == {
        'whisper': WhisperAdapter, 'moonshine': MoonshineAdapter, 'qwen3_asr': Qwen3ASRAdapter}
    assert all(callable(f.load) for f in FAMILIES.values())
    assert [m.__name__ for m in (whisper, moonshine, qwen3_asr)] == [f"fade_asr.{f}" for f in ('whisper', 'moonshine', 'qwen3_asr')]


def test_a_new_family_is_one_registration(tmp_path):
    "A family registered once is found by both `load_model` and `get_adapter`, with no other change."
    import json
    from fade_asr.families import FAMILIES, ModelFamily, register_family
    from fade_asr.whisper import WhisperAdapter

    class ToyAdapter(WhisperAdapter): family = 'toy'
    m = tiny_random_whisper()
    m.config.model_type = 'toy_whisper'
    loaded = []
    def load(d, dtype):
        loaded.append(d); return m, None
    register_family(ModelFamily('toy', ('toy_whisper',), load, ToyAdapter))
    try:
        (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'toy_whisper'}))
        lm = load_model(tmp_path)
        assert (lm.family, lm.model, loaded) == ('toy', m, [tmp_path])
        ad = get_adapter(lm.model)
        assert type(ad) is ToyAdapter and len(ad.linear_names()) == 2 * 6 + 2 * 10
    finally:
        del FAMILIES['toy']
    with pytest.raises(ValueError, match="unknown model family 'toy_whisper'"):
        get_adapter(m)
