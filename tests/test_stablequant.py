"""Activation quantization and StableQuant: properties of the histogram and the clip searches (hypothesis), the
decision logic of both stages on a model with an injected outlier channel, WxAy through the pipeline, the packed
round trip of the activation clips, and the errors bad inputs give."""
import copy, json, math, os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fade_asr import stablequant as SQ
from fade_asr.actquant import (AbsHistogram, _Observe, act_layers, act_quant, attach_act_quant, calibrate_clips, collect_act_stats,
                               fake_quant_act, act_qmax)
from fade_asr.testing import Utt, tiny_random_whisper
from fade_asr.pipeline import QuantConfig, quantize
from fade_asr.stablequant import quantize_model

os.environ.setdefault('FADE_ASR_QUIET', '1')
SETTINGS = dict(max_examples=40, deadline=None)


def tensors(draw, n_max=400):
    n = draw(st.integers(1, n_max))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    tail = draw(st.sampled_from([1.0, 2.0, 4.0]))       # Student-t-like heavy tails of varying weight
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) / torch.rand(n, generator=g).clamp_min(1e-3) ** (1 / tail)
    return scale * x


@settings(**SETTINGS)
@given(st.data())
def test_histogram_updates_commute_and_keep_count_and_max(data):
    a, b = tensors(data.draw), tensors(data.draw)
    h1 = AbsHistogram().update(a).update(b)
    h2 = AbsHistogram().update(torch.cat([b, a]))
    assert h1.n == h2.n == a.numel() + b.numel()
    assert h1.amax == h2.amax == float(torch.cat([a, b]).abs().max())
    assert np.array_equal(h1.counts, h2.counts) and h1.zeros == h2.zeros


@settings(**SETTINGS)
@given(st.data(), st.sampled_from([3, 4, 6, 8]))
def test_clip_searches_are_ordered_and_optimal_on_their_grid(data, bits):
    x = tensors(data.draw, 2000)
    h = AbsHistogram().update(x)
    if h.amax == 0: return
    ps = [h.percentile_clip(p) for p in (0, 0.1, 1, 10, 50)]
    assert all(a >= b - 1e-12 for a, b in zip(ps, ps[1:])), 'percentile clips fall as more is clipped'
    assert ps[0] == h.amax
    c = h.mse_clip(bits)
    assert 0 < c <= h.amax * (1 + 1e-12)
    e_best, e_max, e_p = h.quant_mse([c, h.amax, ps[2]], bits)
    assert e_best <= e_max * (1 + 1e-9) and e_best <= e_p * (1 + 1e-9) + 1e-30


@settings(**SETTINGS)
@given(st.data(), st.sampled_from([2, 4, 8]), st.floats(1e-3, 1e3))
def test_fake_quant_act_grid(data, bits, clip):
    x = tensors(data.draw)
    y = fake_quant_act(x, clip, bits)
    q, s = act_qmax(bits), clip / act_qmax(bits)
    assert y.abs().max() <= clip * (1 + 1e-6)
    assert torch.equal(fake_quant_act(y, clip, bits), y), 'quantizing twice changes nothing'
    inside = x.abs() <= clip
    assert ((y - x)[inside].abs() <= s / 2 * (1 + 1e-5) + 1e-6 * clip).all()
    codes = torch.round(y / s)
    assert codes.abs().max() <= q


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match='from 2 to 16'): QuantConfig.make(act_bits=17)
    with pytest.raises(ValueError, match='unknown'): QuantConfig.make(act_bits=8, act_calib='absmax')
    with pytest.raises(ValueError, match=r'\[0, 0.5\]'): QuantConfig.make(act_bits=8, act_grid=(0.0, 1.0))
    with pytest.raises(ValueError, match='test data'): QuantConfig(dev_split='test')
    with pytest.raises(ValueError, match='empty'): AbsHistogram().percentile_clip(1.0)
    with pytest.raises(ValueError, match='NaN'): AbsHistogram().update(torch.tensor([0.0, float('inf')]))
    with pytest.raises(ValueError, match='dev set is empty'): SQ.dev_windows([])
    with pytest.raises(ValueError, match='needs dev data'): calibrate_clips({}, 8, 'stablequant')
    m = tiny_random_whisper(seed=1).eval()
    with pytest.raises(ValueError, match='another model'): attach_act_quant(m, {'model.no.such.layer': 1.0}, 8)
    with pytest.raises(ValueError, match='calibration set is empty'): collect_act_stats(m, None, [])
    with pytest.raises(ValueError, match='calibration set is empty'):
        quantize_model(m, [], QuantConfig.make(method='fp', act_bits=8, act_calib='max'), progress=False)
    with pytest.raises(ValueError, match='stablequant.quantize_model'):
        quantize(m, [], QuantConfig.make(method='rtn', act_bits=8), progress=False)


def test_nan_weights_upstream_name_the_problem():
    from fade_asr.whisper import whisper_default_processor
    m = tiny_random_whisper(seed=1).eval()
    with torch.no_grad(): m.model.encoder.conv1.weight[0, 0, 0] = float('nan')
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='conv2.*non-finite'):
        collect_act_stats(m, whisper_default_processor(m), [Utt(0, 2.0, rng)], layers=['model.encoder.conv2'])


@pytest.fixture(scope='module')
def w8a8_run():
    model = tiny_random_whisper(seed=3).eval()
    rng = np.random.default_rng(3)
    calib = [Utt(i, s, rng) for i, s in enumerate([3.0, 4.0, 2.0, 5.0])]
    cfg = QuantConfig.make(method='rtn', bits=8, group_size=-1, sym=True, n_calib=4, act_bits=8, act_calib='mse', act_n_calib=4)
    qm, rep = quantize_model(model, calib, cfg, progress=False)
    return model, qm, rep, rep.solutions


def test_wxay_quantizes_every_layer_input_and_every_weight(w8a8_run):
    model, qm, rep, sols = w8a8_run
    assert set(rep.act['clips']) == set(act_layers(qm)) and qm._fade_act['bits'] == 8
    assert set(rep.act['per_channel_weights']) == {'model.encoder.conv1', 'model.encoder.conv2'}
    for n in ('model.encoder.conv1', 'model.encoder.conv2'):       # the front end's weights are on a per-channel 8-bit grid
        w = qm.get_submodule(n).weight.reshape(qm.get_submodule(n).weight.shape[0], -1)
        assert max(len(torch.unique(r)) for r in w) <= 256
        assert not torch.equal(w, model.get_submodule(n).weight.reshape(w.shape))
    assert not hasattr(model, '_fade_act') and not any(mod._forward_pre_hooks for mod in model.modules())


def test_packed_checkpoint_keeps_activation_clips(w8a8_run, tmp_path):
    from fade_asr.packing import pack_model, save_packed, load_packed, ACT_QUANT
    _, qm, rep, sols = w8a8_run
    feats, dec = torch.randn(1, 80, 3000), torch.tensor([[50257, 11, 12]])
    with torch.no_grad():
        ref = qm(input_features=feats, decoder_input_ids=dec).logits
        pm = pack_model(copy.deepcopy(qm), sols, scale_dtype=torch.float32, backend='torch')
        assert torch.equal(pm(input_features=feats, decoder_input_ids=dec).logits, ref), 'hooks follow the packed layers'
        out = save_packed(pm, tmp_path / 'ckpt')
        lm, _ = load_packed(out)
        assert lm._fade_act['clips'] == qm._fade_act['clips']
        assert torch.equal(lm(input_features=feats, decoder_input_ids=dec).logits, ref)
        (out / ACT_QUANT).write_text('{"bits": 8, "clips": [1, 2]')      # a half-written file
        with pytest.raises(ValueError, match='damaged'): load_packed(out)


def _output_error_counts(feats):
    "A stand-in for dev WER: 100 x relative error of the encoder output against the model without quantizers, as (errors, words)."
    def f(model, processor, windows):
        with torch.no_grad():
            y = model.model.encoder(feats).last_hidden_state
            with act_quant(model, {}, 8): y0 = model.model.encoder(feats).last_hidden_state   # restores the quantizers after
        return np.array([100 * float((y - y0).norm() / y0.norm())]), np.array([100.0])
    return f


def test_stages_flag_the_injected_layer_and_search_the_grid(monkeypatch):
    torch.manual_seed(0)
    m = tiny_random_whisper(seed=4).eval()
    feats = torch.randn(2, 80, 3000)
    before = m.model.encoder(feats).last_hidden_state.detach()
    target = SQ.inject_outlier_channel(m, 'model.encoder.layers.1.self_attn', channel=3, factor=1e4)
    assert torch.allclose(m.model.encoder(feats).last_hidden_state, before, atol=1e-3), 'the injection keeps the function'
    monkeypatch.setattr(SQ, 'dev_counts', _output_error_counts(feats))
    layers = [n for n in act_layers(m) if n.startswith('model.encoder.layers.')]
    hists = {n: AbsHistogram() for n in layers}
    hooks = [m.get_submodule(n).register_forward_pre_hook(_Observe(n, hists[n])) for n in layers]
    with torch.no_grad(): m.model.encoder(feats)
    for h in hooks: h.remove()
    scr = SQ.screen_layers(m, None, hists, 6, windows=[], gamma=1.0, progress=False)   # 'WER' here: % output error
    assert scr['flagged'] == [target] and scr['n_passes'] == len(layers) + 1
    assert SQ.flagged_by_dev_size(scr) == [dict(windows=1, words=100, flagged=[target])]
    srch = SQ.percentile_search(m, None, hists, 6, scr['flagged'], windows=[], progress=False)
    assert set(srch['curve']) == set(SQ.ACT_GRID) and srch['curve'][srch['best_pct']] == min(srch['curve'].values())
    clips = SQ.stage2_clips(hists, 6, scr['flagged'], srch['best_pct'])
    assert clips[target] < hists[target].amax and all(clips[n] == hists[n].amax for n in layers if n != target)


def test_stablequant_dev_set_is_held_out_from_calibration():
    "Stage 1 and 2 choose on dev WER: a dev set made of the calibration utterances is refused before any pass."
    from fade_asr.whisper import whisper_default_processor
    m = tiny_random_whisper(seed=5).eval()
    rng = np.random.default_rng(5)
    calib = [Utt(i, 2.0, rng) for i in range(3)]
    cfg = QuantConfig.make(method='fp', act_bits=8, act_calib='stablequant', act_n_calib=3)
    with pytest.raises(ValueError, match="every utterance of the StableQuant's dev set is also a calibration utterance"):
        SQ.quantize_activations(m, whisper_default_processor(m), calib, cfg, dev=calib[::-1], progress=False)


def test_fake_quantized_checkpoint_keeps_activation_clips(w8a8_run, tmp_path):
    from fade_asr.whisper import whisper_default_processor
    from fade_asr.cli import save_quantized
    from fade_asr.models import load_model
    from fade_asr.packing import ACT_QUANT, load_act_quant
    _, qm, rep, _ = w8a8_run
    out = save_quantized(qm, whisper_default_processor(qm), rep, tmp_path / 'fq')
    assert json.loads((out / ACT_QUANT).read_text())['clips'] == qm._fade_act['clips']
    lm = load_model(str(out))
    load_act_quant(lm.model, out / ACT_QUANT)
    feats, dec = torch.randn(1, 80, 3000), torch.tensor([[50257, 11, 12]])
    with torch.no_grad():
        assert torch.equal(lm.model(input_features=feats, decoder_input_ids=dec).logits,
                           qm(input_features=feats, decoder_input_ids=dec).logits)
