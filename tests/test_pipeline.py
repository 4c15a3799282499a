"""End-to-end, property and fault-injection tests of the adapters and the sequential quantization pipeline."""
import copy, json, math, os

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st

from fade_asr.families import CalibWindow, pack_utterances, padding_fraction, name_matches
from fade_asr.models import get_adapter
from fade_asr.testing import Utt, tiny_random_whisper
from fade_asr.pipeline import QuantConfig, QuantReport, quantize

os.environ.setdefault('FADE_ASR_QUIET', '1')
G32 = dict(bits=3, group_size=32)


@pytest.fixture(scope='module')
def tiny():
    return tiny_random_whisper(seed=1)


@pytest.fixture(scope='module')
def calib():
    rng = np.random.default_rng(1)
    return [Utt(i, s, rng) for i, s in enumerate([5.0, 6.0, 4.0, 5.5, 3.0, 6.0, 2.0, 5.0, 4.0])]


@pytest.fixture(scope='module')
def gptq_run(tiny, calib):
    "One GPTQ run with a callback recording, per collected layer, what each twin fed it and what was quantized."
    fp_state = {k: v.clone() for k, v in tiny.state_dict().items()}
    order = get_adapter(tiny).linear_names()
    log = []
    def cb(name, x_fp, x_q, win, qmodel):
        qp = dict(qmodel.named_parameters())
        changed = {n for n in order if not torch.equal(qp[n + '.weight'], fp_state[n + '.weight'])}
        extra = None
        if name.endswith('encoder_attn.k_proj') or name.endswith('encoder_attn.v_proj'):
            with torch.no_grad():
                extra = (tiny.model.encoder(win.features[None]).last_hidden_state[0],
                         qmodel.model.encoder(win.features[None]).last_hidden_state[0])
        log.append((name, changed, x_fp.clone(), x_q.clone(), extra))
    qm, rep = quantize(tiny, calib, QuantConfig.make(method='gptq', **G32), progress=False, callback=cb)
    return dict(qm=qm, rep=rep, log=log, fp_state=fp_state, order=order)


# ---------------------------------------------------------------- structure of the run

def test_report_has_every_linear_once(tiny, gptq_run):
    names = [r.name for r in gptq_run['rep'].layers]
    every = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear) and '.layers.' in n]
    assert len(names) == len(set(names)) == len(every) == 32
    assert set(names) == set(every)
    assert not any('proj_out' in n for n in names)


def test_true_sequential_order(gptq_run):
    rep, log = gptq_run['rep'], gptq_run['log']
    assert [r.name for r in rep.layers] == gptq_run['order']
    key = {r.name: (r.stack != 'encoder', r.block, r.group) for r in rep.layers}
    assert [k for k in key] == sorted(key, key=key.get)       # stacks, blocks, groups in order
    for name, changed, *_ in log:                               # earlier groups quantized, this and later ones not
        assert changed == {n for n in key if key[n] < key[name]}, name
    # decoder groups: self qkv < self out < cross qkv < cross out < fc1 < fc2
    d = [r.name.split('layers.0.')[1] for r in rep.layers if r.stack == 'decoder' and r.block == 0]
    assert d == ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.out_proj',
                 'encoder_attn.q_proj', 'encoder_attn.k_proj', 'encoder_attn.v_proj', 'encoder_attn.out_proj', 'fc1', 'fc2']


def test_cross_attention_reads_each_twins_encoder(gptq_run):
    hits = [(n, xf, xq, e) for n, _, xf, xq, e in gptq_run['log'] if e is not None]
    assert len(hits) == 2 * 2 * 2          # 2 decoder blocks x k,v x 2 windows
    for n, xf, xq, (e_fp, e_q) in hits:
        torch.testing.assert_close(xf, e_fp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xq, e_q, atol=1e-5, rtol=1e-5)
        assert (e_fp - e_q).abs().max() > 1e-4, "the quantized encoder output should differ from the FP one"


def test_first_block_sees_no_upstream_error(gptq_run):
    for n, _, xf, xq, _ in gptq_run['log']:
        if '.layers.0.self_attn.' in n and not n.endswith('out_proj'):
            assert torch.equal(xf, xq), n
        if 'encoder.layers.1.' in n:
            assert not torch.equal(xf, xq), n


def test_fp_twin_never_modified(tiny, gptq_run, calib):
    fp = gptq_run['fp_state']
    assert all(torch.equal(v, fp[k]) for k, v in tiny.state_dict().items())
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    quantize(tiny, calib, QuantConfig.make(method='fade', **G32), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


def test_only_scope_is_quantized(gptq_run):
    qsd, fp = gptq_run['qm'].state_dict(), gptq_run['fp_state']
    for k in fp:
        quantized = k.endswith('.weight') and k[:-7] in gptq_run['order']
        assert torch.equal(qsd[k], fp[k]) != quantized, k    # biases, norms, convs, embeddings stay FP


# ---------------------------------------------------------------- method identities

def test_alpha0_qep_equals_gptq(tiny, calib, gptq_run):
    q0, r0 = quantize(tiny, calib, QuantConfig.make(method='qep', alpha=0.0, **G32), progress=False)
    a, b = q0.state_dict(), gptq_run['qm'].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.loss for r in r0.layers] == [r.loss for r in gptq_run['rep'].layers]


def test_fp_cache_does_not_change_results(tiny, calib, gptq_run):
    "Keeping the FP twin's block inputs and replaying the solved parts (default), and re-running both per group, give the same model."
    q1, r1 = quantize(tiny, calib, QuantConfig.make(method='gptq', fp_cache_mb=0, **G32), progress=False)
    a, b = q1.state_dict(), gptq_run['qm'].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.rel_err for r in r1.layers] == pytest.approx([r.rel_err for r in gptq_run['rep'].layers], rel=1e-6)


def test_gptq_loss_le_rtn(tiny, calib, gptq_run):
    rep = gptq_run['rep']
    assert all(r.loss <= r.loss_rtn * (1 + 1e-6) for r in rep.layers)
    assert sum(r.loss for r in rep.layers) < 0.8 * sum(r.loss_rtn for r in rep.layers)
    # an RTN run reports, on the layers with identical inputs (first q/k/v), exactly GPTQ's loss_rtn
    _, rr = quantize(tiny, calib, QuantConfig.make(method='rtn', **G32), progress=False)
    for r in rr.layers:
        if '.layers.0.self_attn.' in r.name and not r.name.endswith('out_proj'):
            assert r.loss == pytest.approx(rep[r.name].loss_rtn, rel=1e-6)
            assert r.loss > rep[r.name].loss


def test_qep_alpha_changes_weights_and_skip(tiny, calib, gptq_run):
    qm, rep = quantize(tiny, calib, QuantConfig.make(method='qep', alpha=0.5, qep_skip=('mlp_down',), **G32), progress=False)
    assert all(r.alpha == (0.0 if r.name.endswith('fc2') else 0.5) for r in rep.layers)
    g = gptq_run['qm'].state_dict()
    assert not torch.equal(qm.state_dict()['model.encoder.layers.1.fc1.weight'], g['model.encoder.layers.1.fc1.weight'])


def test_alpha_override(tiny, calib):
    _, rep = quantize(tiny, calib, QuantConfig.make(method='fade', fade_use_r=False, alpha_override={'fc1': 0.77,
                      'model.encoder.layers.0.fc2': 0.11}, **G32), progress=False)
    assert all(r.alpha == 0.77 for r in rep.layers if r.name.endswith('fc1'))
    assert rep['model.encoder.layers.0.fc2'].alpha == 0.11


def test_fade_alphas_and_diagnostics(tiny, calib):
    _, rep = quantize(tiny, calib, QuantConfig.make(method='fade', **G32), progress=False)
    al = [r.alpha for r in rep.layers]
    assert all(0.0 <= a <= 0.9 for a in al) and len({round(a, 6) for a in al}) > 10
    nan_cos = [r.name for r in rep.layers if not math.isfinite(r.r_cos)]
    assert nan_cos == [f'model.{s}.layers.0.self_attn.{p}_proj' for s in ('encoder', 'decoder') for p in 'qkv']
    assert rep.diagnostic_seconds > 0
    assert all(math.isfinite(r.rel_err) and 0 < r.rel_err < 1 for r in rep.layers)
    assert len(rep.blocks) == 4 and all(math.isfinite(b['rel_err']) for b in rep.blocks)
    # ablations: V only needs no diagnostic pass; one-pass noise-floor normalisation also works
    _, rv = quantize(tiny, calib, QuantConfig.make(method='fade', fade_use_r=False, **G32), progress=False)
    assert rv.diagnostic_seconds == 0
    _, rn = quantize(tiny, calib, QuantConfig.make(method='fade', fade_norm='noise_floor', **G32), progress=False)
    assert all(0.0 <= r.alpha <= 0.9 for r in rn.layers)


def test_fade_reliability_is_one_pass_and_absolute(tiny, calib):
    "fade_norm='reliability': no diagnostic pass, and α = α_max·σ(z(V) + logit ρ) from each layer's own H-cosine."
    from fade_asr.fade import alpha_from_score, r_score_reliability
    _, rep = quantize(tiny, calib, QuantConfig.make(method='fade', fade_norm='reliability', **G32), progress=False)
    assert rep.diagnostic_seconds == 0
    informative = [r for r in rep.layers if math.isfinite(r.r_cos_h)]
    assert len(informative) == len(rep.layers) - 6                     # all but the first blocks' q/k/v (δ = 0)
    assert all(-1 <= r.r_cos_h <= 1 for r in informative)
    for r in informative:
        assert r.alpha == pytest.approx(alpha_from_score(r.v_int_z + r_score_reliability(r.r_cos_h)), abs=1e-9)


# ---------------------------------------------------------------- the oracle ablation (per-layer alpha on dev data)

@pytest.fixture(scope='module')
def dev_utts():
    rng = np.random.default_rng(7)
    return [Utt(100 + i, s, rng) for i, s in enumerate([4.0, 5.0, 3.0, 4.5])]


ORACLE_PROBE = ('model.encoder.layers.1.fc1', 'model.decoder.layers.1.self_attn.out_proj')


@pytest.fixture(scope='module')
def oracle_run(tiny, calib, dev_utts):
    "One oracle run; a callback keeps, for the probed layers, every (x_fp, x_q, half) it was fed, in order."
    seen = {n: [] for n in ORACLE_PROBE}
    halves = []
    def cb(name, x_fp, x_q, win, qmodel):
        halves.append(win.half)
        if name in seen: seen[name].append((x_fp.clone(), x_q.clone(), win.half))
    qm, rep = quantize(tiny, calib, QuantConfig.make(method='oracle', **G32), dev=dev_utts, progress=False, callback=cb)
    return dict(qm=qm, rep=rep, seen=seen, halves=halves)


def test_oracle_alpha_minimises_dev_error(tiny, oracle_run):
    "Recompute, from the inputs the hooks saw, Q_alpha on the calibration moments and the dev error for every alpha."
    from fade_asr.qep import LayerStats, qep_correction
    from fade_asr.gptq import gptq
    rep, cfg = oracle_run['rep'], QuantConfig.make(method='oracle', **G32)
    assert {'A', 'B', 'dev'} <= set(oracle_run['halves'])
    assert rep.n_dev_utterances == 4 and rep.n_dev_windows >= 1
    assert all(r.alpha in cfg.oracle_grid and len(r.oracle_curve) == len(cfg.oracle_grid) for r in rep.layers)
    assert len({r.alpha for r in rep.layers}) > 1                       # per layer, not one global value
    for name in ORACLE_PROBE:
        rec, W = rep[name], tiny.get_submodule(name).weight.detach().float()
        st = LayerStats(W.shape[1])
        for xf, xq, h in oracle_run['seen'][name]:
            if h != 'dev': st.update(xf, xq, half=0 if h == 'A' else 1)
        mom = st.merged()
        Xd = torch.cat([xf for xf, _, h in oracle_run['seen'][name] if h == 'dev']).double()
        Xq = torch.cat([xq for _, xq, h in oracle_run['seen'][name] if h == 'dev']).double()
        assert not torch.equal(Xd, Xq)                                   # upstream error reaches the probed layer
        direct = []
        for a in cfg.oracle_grid:
            Q = gptq(qep_correction(W, mom.H, mom.C, a, damp=cfg.qep_damp), mom.H, cfg.spec, percdamp=cfg.percdamp).weight
            direct.append(float((Xd @ W.double().T - Xq @ Q.double().T).pow(2).sum()))
        ref = float((Xd @ W.double().T).pow(2).sum())
        assert rec.oracle_curve == pytest.approx([math.sqrt(d / ref) for d in direct], rel=1e-4)
        chosen = direct[cfg.oracle_grid.index(rec.alpha)]
        assert all(chosen <= d * (1 + 1e-6) for d in direct), (name, rec.alpha, direct)
        assert chosen <= direct[cfg.oracle_grid.index(0.45)] * (1 + 1e-6)
        assert max(direct) > min(direct) * (1 + 1e-4), "alpha should matter on this layer for the test to mean anything"


def test_oracle_model_is_qep_with_its_alphas(tiny, calib, oracle_run, tmp_path):
    "The dev windows only choose alpha: QEP with the oracle's per-layer alphas fixed gives the same model."
    rep = oracle_run['rep']
    qx, rx = quantize(tiny, calib, QuantConfig.make(method='qep', alpha_override={r.name: r.alpha for r in rep.layers}, **G32),
                      progress=False)
    a, b = qx.state_dict(), oracle_run['qm'].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.loss for r in rx.layers] == [r.loss for r in rep.layers]
    back = QuantReport.from_json(rep.to_json(tmp_path / 'oracle.json'))
    assert [x for r in back.layers for x in r.oracle_curve] == pytest.approx([x for r in rep.layers for x in r.oracle_curve])
    assert [r.alpha for r in back.layers] == [r.alpha for r in rep.layers] and back.n_dev_windows == rep.n_dev_windows


def test_oracle_dev_data_does_not_change_calibration_statistics(tiny, calib, dev_utts):
    "With alpha fixed everywhere, an oracle run (dev windows flowing through) equals a QEP run: same H, same losses."
    names = get_adapter(tiny).linear_names()
    n_dev = []
    _, ro = quantize(tiny, calib, QuantConfig.make(method='oracle', alpha_override={n: 0.3 for n in names}, **G32),
                     dev=dev_utts, progress=False, callback=lambda n, xf, xq, w, q: n_dev.append(w.half == 'dev'))
    _, rq = quantize(tiny, calib, QuantConfig.make(method='qep', alpha=0.3, **G32), progress=False)
    assert sum(n_dev) > 0                                                # the dev windows did flow through the pass
    assert [r.loss for r in ro.layers] == [r.loss for r in rq.layers]
    assert [(r.n_tokens, r.r_calib, r.rel_err) for r in ro.layers] == [(r.n_tokens, r.r_calib, r.rel_err) for r in rq.layers]
    assert ro.blocks == rq.blocks
    assert all(r.alpha == 0.3 and r.oracle_curve == [] for r in ro.layers)


def test_oracle_never_reads_test_data(monkeypatch, tiny, calib, dev_utts):
    import fade_asr.data as D, fade_asr.pipeline as P
    calls = []
    def fake_load(name, split='test', limit=None):
        calls.append((name, split))
        if split == 'test': raise AssertionError("the oracle read the test split")
        return D.SpeechDataset(dev_utts[:2], name=name, split=split)
    monkeypatch.setattr(P, 'load_dataset', fake_load)      # the pipeline's own reference to data.load_dataset
    _, rep = quantize(tiny, calib, QuantConfig.make(method='oracle', **G32), progress=False)
    assert calls == [('asterisk', 'dev')] and rep.n_dev_utterances == 2
    with pytest.raises(ValueError, match='test data'):
        QuantConfig(method='oracle', dev_split='test')
    with pytest.raises(ValueError, match='dev set is empty'):
        quantize(tiny, calib, QuantConfig.make(method='oracle', **G32), dev=[], progress=False)
    calls.clear()
    quantize(tiny, calib, QuantConfig.make(method='qep', **G32), progress=False)   # other methods load no dev data
    assert calls == []


def test_oracle_dev_set_is_held_out_from_calibration(tiny, calib, dev_utts):
    "A corpus without splits hands the same rows to calibration and dev: the calibration ones leave the dev set."
    with pytest.warns(UserWarning, match='dropped 3 of 5 utterances'):
        _, rep = quantize(tiny, calib, QuantConfig.make(method='oracle', **G32), dev=dev_utts[:2] + calib[:3], progress=False)
    assert rep.n_dev_utterances == 2
    with pytest.raises(ValueError, match='every utterance of the oracle.s dev set is also a calibration utterance'):
        quantize(tiny, calib, QuantConfig.make(method='oracle', **G32), dev=calib[2:5], progress=False)


# ---------------------------------------------------------------- fault injection

def test_dead_inputs_are_handled(calib):
    m = tiny_random_whisper(seed=2)
    for lay in (m.model.encoder.layers[0], m.model.decoder.layers[1]):
        lay.fc1.weight.data[:5] = 0; lay.fc1.bias.data[:5] = -100.0    # gelu(-100) == 0 exactly: fc2 inputs 0..4 dead
    for meth in ('gptq', 'qep', 'fade'):
        qm, rep = quantize(m, calib, QuantConfig.make(method=meth, **G32), progress=False)
        assert rep['model.encoder.layers.0.fc2'].dead_inputs == 5
        assert rep['model.decoder.layers.1.fc2'].dead_inputs == 5
        assert all(torch.isfinite(p).all() for p in qm.parameters())
        assert all(math.isfinite(r.loss) for r in rep.layers)


def test_bad_inputs(tiny, calib):
    with pytest.raises(ValueError, match='calibration set is empty'):
        quantize(tiny, [], QuantConfig.make(method='gptq', **G32))
    with pytest.raises(ValueError, match='from 2 to 8'):
        QuantConfig.make(bits=9)
    with pytest.raises(ValueError, match='from 2 to 8'):
        QuantConfig.make(bits=1)
    with pytest.raises(ValueError, match='model.encoder.layers.0.self_attn.q_proj: group size 48 does not divide'):
        quantize(tiny, calib, QuantConfig.make(group_size=48, method='gptq'))
    bad = copy.deepcopy(tiny); bad.model.decoder.layers[1].fc1.weight.data[3, 5] = float('nan')
    with pytest.raises(ValueError, match=r'model\.decoder\.layers\.1\.fc1 has 1 NaN'):
        quantize(bad, calib, QuantConfig.make(method='rtn', **G32))
    bad = copy.deepcopy(tiny); bad.model.encoder.conv2.bias.data[0] = float('nan')   # out of scope, poisons activations
    with pytest.raises(ValueError, match=r'calibration inputs of layer model\.encoder\.layers\.0\.self_attn\.q_proj'):
        quantize(bad, calib, QuantConfig.make(method='gptq', **G32))
    with pytest.raises(ValueError, match='both halves'):
        quantize(tiny, calib[:1], QuantConfig.make(method='fade', **G32))
    with pytest.raises(ValueError, match="unknown model family 'Linear'; supported: moonshine, qwen3_asr, whisper"):
        quantize(nn.Linear(2, 2), calib, QuantConfig.make(method='rtn', **G32))
    with pytest.raises(ValueError, match="method 'awq' is unknown"):          # checked before any work
        quantize(tiny, calib, QuantConfig(method='awq'))
    with pytest.raises(ValueError, match='teacher'):
        QuantConfig(teacher='oracle')
    with pytest.raises(ValueError, match='no linear layer is in scope'):
        quantize(tiny, calib, QuantConfig.make(method='rtn', include=('nothing.*',), **G32))


def test_long_utterances_skipped_with_warning():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match='longer than'):
        ws = pack_utterances([Utt(0, 31, rng), Utt(1, 2, rng)])
    assert [w.ids for w in ws] == [['u1']]


# ---------------------------------------------------------------- scope, config, report

def test_exclude_scope(tiny, calib):
    qm, rep = quantize(tiny, calib, QuantConfig.make(method='gptq', exclude=('fc2', 'model.decoder.layers.1.*'), **G32),
                       progress=False)
    names = [r.name for r in rep.layers]
    assert not any(n.endswith('fc2') or n.startswith('model.decoder.layers.1.') for n in names) and len(names) == 19
    assert torch.equal(qm.model.encoder.layers[0].fc2.weight, tiny.model.encoder.layers[0].fc2.weight)
    assert not torch.equal(qm.model.encoder.layers[0].fc1.weight, tiny.model.encoder.layers[0].fc1.weight)


def test_name_matches():
    assert name_matches('model.encoder.layers.2.fc2', 'fc2')
    assert name_matches('model.encoder.layers.2.self_attn.k_proj', 'self_attn.*')
    assert not name_matches('model.encoder.layers.2.fc1', ('fc2', 'out_proj'))


def test_report_json_and_table(tmp_path, gptq_run):
    rep = gptq_run['rep']
    p = rep.to_json(tmp_path / 'r.json')
    d = json.loads(open(p).read())
    assert d['method'] == 'gptq' and len(d['layers']) == 32 and d['config']['spec']['bits'] == 3
    back = QuantReport.from_json(p)
    assert [r.name for r in back.layers] == [r.name for r in rep.layers]
    assert [r.shape for r in back.layers] == [r.shape for r in rep.layers]
    assert not list(tmp_path.glob('.*tmp'))          # atomic write leaves no temp file
    t = rep.table()
    assert t.count('\n| ') == 32 and t.startswith('| name') and 'peak RSS' in t
    assert rep.peak_rss_mb > 0 and rep.seconds > 0


def test_recipe_names_map_to_config():
    from fade_asr.recipes import load_recipe
    cfg = load_recipe('qep-official-w3g128')
    assert cfg.method == 'qep' and cfg.spec.bits == 3 and cfg.qep_skip == ('mlp_down',) and cfg.alpha == 0.5
    cfg = load_recipe('fade-w4g128', seed=3)
    assert cfg.method == 'fade' and cfg.seed == 3 and cfg.fade_norm == 'diagnostic'


def test_fp_method_returns_unchanged_copy(tiny, calib):
    qm, rep = quantize(tiny, calib, QuantConfig(method='fp'))
    assert qm is not tiny and rep.layers == []
    assert all(torch.equal(a, b) for a, b in zip(qm.state_dict().values(), tiny.state_dict().values()))


def test_greedy_teacher(tiny, calib):
    ad = get_adapter(tiny)
    ws = ad.prepare(ad.make_windows(calib[:3]), teacher='greedy')
    assert ws[0].tokens[:2].tolist() == [50257, 50362] and len(ws[0].tokens) >= 2
    qm, rep = quantize(tiny, calib[:4], QuantConfig.make(method='gptq', teacher='greedy', **G32), progress=False)
    assert len(rep.layers) == 32


def test_unpacked_windows_alternate_halves(tiny, calib):
    _, rep = quantize(tiny, calib[:4], QuantConfig.make(method='gptq', pack=False, **G32), progress=False)
    assert rep.n_windows == 4 and rep.padding_fraction > 0.8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.05, 35.0), min_size=1, max_size=40), st.booleans())
def test_packing_properties(secs, pack):
    class U:
        def __init__(s, i, n): s.id, s.audio, s.text = str(i), np.zeros(int(n * 16000), np.float32), f"w{i}"
    us = [U(i, s) for i, s in enumerate(secs)]
    ok = [u for u in us if 0 < len(u.audio) <= 480000]
    if not ok:
        with pytest.raises(ValueError): pack_utterances(us, pack=pack)
        return
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ws = pack_utterances(us, pack=pack)
    assert sorted(i for w in ws for i in w.ids) == sorted(u.id for u in ok)    # every usable utterance exactly once
    assert all(len(w.audio) <= 480000 for w in ws)
    assert all(len(w.audio) == sum(len(us[int(i)].audio) for i in w.ids) + 4800 * (len(w.ids) - 1) for w in ws)
    assert all(w.ids == sorted(w.ids, key=int) for w in ws)                     # input order inside a window
    assert [w.half for w in ws] == ['AB'[i % 2] for i in range(len(ws))]
    assert all(w.text == ' '.join(f"w{i}" for i in w.ids) for w in ws)
    if not pack: assert [w.ids for w in ws] == [[u.id] for u in ok]
    elif len(ws) == 2 and sum(len(u.audio) for u in ok) + 4800 * (len(ok) - 1) <= 480000:
        assert sorted(ws[0].ids + ws[1].ids, key=int) == [u.id for u in ok]   # would fit one window: split for A/B
    else:  # first fit: of any two windows, one could not take the other's shortest utterance
        short = [min(len(us[int(i)].audio) for i in w.ids) for w in ws]
        for x in range(len(ws)):
            for y in range(x + 1, len(ws)):
                assert (len(ws[x].audio) + 4800 + short[y] > 480000) or (len(ws[y].audio) + 4800 + short[x] > 480000)
    assert 0.0 <= padding_fraction(ws) < 1.0


# ---------------------------------------------------------------- the real tiny.en

@pytest.fixture(scope='module')
def real():
    from fade_asr.models import load_model
    from fade_asr.data import calibration_subset
    return load_model(), calibration_subset('asterisk', 12, 0)


def test_packing_on_real_calibration_data():
    from fade_asr.data import calibration_subset
    cal = calibration_subset('asterisk', 128, 0)
    ad = get_adapter(tiny_random_whisper())
    pu, pp = padding_fraction(ad.make_windows(cal, pack=False)), padding_fraction(ad.make_windows(cal, pack=True))
    assert pu > 0.85 and pp < 0.2


@pytest.mark.slow
def test_real_tiny_en_fade(real):
    lm, cal = real
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    qm, rep = quantize(lm.model, cal, QuantConfig.make(bits=4, group_size=128, method='fade'), processor=lm.processor,
                       progress=False)
    assert len(rep.layers) == 4 * 6 + 4 * 10
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert all(math.isfinite(r.loss) and r.loss <= r.loss_rtn * (1 + 1e-6) for r in rep.layers)
    assert all(r.rel_err < 0.5 for r in rep.layers)
    # the quantized model still transcribes a calibration prompt (4-bit: the words should mostly survive)
    ad = get_adapter(qm, lm.processor)
    w = ad.prepare(ad.make_windows(cal[:1]))[0]
    hyp = lm.processor.tokenizer.decode(ad.greedy_ids(qm, w.features, ad.prompt_ids()), skip_special_tokens=True)
    ref = set(cal[0].text.lower().replace(',', '').replace('.', '').split())
    got = set(hyp.lower().replace(',', '').replace('.', '').split())
    assert len(ref & got) >= 0.5 * len(ref), (hyp, cal[0].text)


def test_same_model_on_one_and_two_threads(real):
    "One recipe and seed give the same codes on 1 and 2 threads: the solve runs on one thread (03_gptq's `torch_threads(1)`)."
    lm, cal = real
    old, states = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            qm, _ = quantize(lm.model, cal, 'fade-w3g128', processor=lm.processor, progress=False,
                             include=['model.encoder.layers.[01].*'])      # two blocks: enough to flip codes
            states.append(qm.state_dict())
    finally: torch.set_num_threads(old)
    differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not differ, f"{len(differ)} tensors differ between 1 and 2 threads, first {differ[:3]}"


def test_gptq_solver_dispatch():
    "CPU weights take the torch GPTQ loop; CUDA weights would take the fused block kernel (07_kernels)."
    from fade_asr import gptq as g, kernels as k
    from fade_asr.pipeline import _gptq_solver
    assert _gptq_solver(torch.zeros(2, 2)) is g.gptq
    if torch.cuda.is_available():
        assert _gptq_solver(torch.zeros(2, 2, device='cuda')) is k.gptq_gpu
