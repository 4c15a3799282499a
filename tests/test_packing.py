"""The packed format: bit-exact round trips (hypothesis), an independent decoder of the GPTQ layout, QuantLinear against the
fake-quantized reference, the report's solutions exact, and the errors a damaged checkpoint gives."""
import copy, json, os

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st

from fade_asr.quantizer import QuantSpec, QuantResult, rtn
from fade_asr.gptq import gptq
from fade_asr.pack_format import PACK_BITS, chunk_size, pack_bits, unpack_bits, pack_layer, unpack_layer, dequantize_packed
from fade_asr.pipeline import quantize
from fade_asr.testing import Utt
from fade_asr.packing import (QuantLinear, pack_model, save_packed, load_packed, packed_layers, set_backend, resolve_backend, WEIGHTS, QUANTIZE_CONFIG, tensor_bytes)

os.environ.setdefault('FADE_ASR_QUIET', '1')
SETTINGS = dict(max_examples=40, deadline=None)


def random_result(seed, bits, m, n, G, act_order, min_zero=0):
    "A QuantResult with random codes, integer zeros (from `min_zero`), positive fp32 scales and (optionally) a permuted g_idx."
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    ng = n // G
    codes = torch.randint(0, maxq + 1, (m, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(min_zero, maxq + 1, (m, ng), generator=g).float()
    scales = torch.rand(m, ng, generator=g) * 0.1 + 1e-3
    g_idx = torch.arange(n, dtype=torch.int32) // G
    if act_order: g_idx = g_idx[torch.randperm(n, generator=g)]
    res = QuantResult(torch.empty(0), codes, scales, zeros, g_idx, QuantSpec(bits=bits, group_size=G))
    res.weight = res.dequantize()
    return res


@st.composite
def layouts(draw):
    bits = draw(st.sampled_from(PACK_BITS))
    p = chunk_size(bits)[0]
    G = draw(st.sampled_from([32, 64, 128]))
    n = G * draw(st.integers(1, 4))
    m = 32 * draw(st.integers(1, 4))          # multiple of every chunk size, as qzeros needs along the outputs
    return bits, m, n, G, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(**SETTINGS)
@given(bits=st.sampled_from(PACK_BITS), chunks=st.integers(1, 6), cols=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_pack_bits_round_trip(bits, chunks, cols, seed):
    p, nw = chunk_size(bits)
    codes = torch.randint(0, 2**bits, (chunks * p, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (chunks * nw, cols)
    assert torch.equal(unpack_bits(words, bits), codes)


@settings(**SETTINGS)
@given(layouts(), st.sampled_from(['v1', 'v2']))
def test_layer_round_trip_bit_exact(layout, fmt):
    bits, m, n, G, act, seed = layout
    res = random_result(seed, bits, m, n, G, act, min_zero=int(fmt == 'v1'))      # v1 cannot hold a zero of 0
    p = pack_layer(res, fmt=fmt, scale_dtype=torch.float32)
    assert p.qweight.shape == (n * bits // 32, m) and p.qzeros.shape == (n // G, m * bits // 32)
    assert p.scales.shape == (n // G, m) and p.g_idx.shape == (n,)
    q, z, s = unpack_layer(p, fmt)
    assert torch.equal(q, res.codes.T) and torch.equal(z, res.zeros.T.int()) and torch.equal(s, res.scales.T)
    assert torch.equal(dequantize_packed(p, fmt), res.weight)
    ql = QuantLinear.from_packed(p, G, fmt)
    assert torch.equal(ql.dequantize(), res.weight)


# --- an independent decoder, written from the documented AutoGPTQ / GPTQModel unpacking (not our unpack) ---
def gptq_reference_dequant(qweight, qzeros, scales, g_idx, bits, v1=True):
    "AutoGPTQ's torch dequantization (qlinear_cuda_old/TorchQuantLinear pattern): returns W^T [in, out] in fp32."
    if bits in (2, 4, 8):
        wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
        zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits), wf.unsqueeze(0))
        zeros = torch.bitwise_and(zeros.to(torch.int16 if bits == 8 else torch.int8), (2**bits) - 1)
        weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1))
        weight = torch.bitwise_and(weight.to(torch.int16 if bits == 8 else torch.int8), (2**bits) - 1)
        zeros = zeros.to(torch.int32)
        zeros = zeros.reshape(-1, zeros.shape[1] * zeros.shape[2])
        weight = weight.reshape(-1, weight.shape[2]).to(torch.int32)
    else:
        wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                           [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12)
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        zeros = zeros >> wf.unsqueeze(0)
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = zeros & 0x7
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2)
        zeros = zeros.reshape(-1, zeros.shape[1] * zeros.shape[2])
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        weight = (weight >> wf.unsqueeze(-1)) & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = weight & 0x7
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
        weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    if v1: zeros = torch.bitwise_and(zeros + 1, (2**bits) - 1)          # v1 stores zero - 1
    gi = g_idx.long()
    return scales.float()[gi] * (weight.float() - zeros.float()[gi]), weight, zeros


@settings(**SETTINGS)
@given(layouts(), st.sampled_from(['v1', 'v2']))
def test_independent_gptq_decoder_reads_our_tensors(layout, fmt):
    bits, m, n, G, act, seed = layout
    res = random_result(seed, bits, m, n, G, act, min_zero=int(fmt == 'v1'))
    p = pack_layer(res, fmt=fmt)                                   # the ecosystem's fp16 scales
    Wt, q, z = gptq_reference_dequant(p.qweight, p.qzeros, p.scales, p.g_idx, bits, v1=(fmt == 'v1'))
    assert torch.equal(q, res.codes.T) and torch.equal(z, res.zeros.T.int())
    assert torch.equal(Wt.T, dequantize_packed(p, fmt))


def test_v1_refuses_a_zero_of_zero():
    """v1 stores zero-1, so a zero point of 0 would be stored as 2^b-1: AutoGPTQ reads 2^b back and GPTQModel's whole-word
    +0x11111111 carries into the next field. It is refused (naming v2); v2 holds it; v1 with zeros >= 1 is what both read."""
    res = random_result(0, 4, 32, 64, 32, False)
    res.zeros[:, 0] = 0; res.weight = res.dequantize()
    with pytest.raises(ValueError, match='cannot hold a zero point of 0.*v2'): pack_layer(res, fmt='v1')
    assert torch.equal(unpack_layer(pack_layer(res, fmt='v2'), 'v2')[1], res.zeros.T.int())
    res.zeros.clamp_(min=1); res.weight = res.dequantize()
    p = pack_layer(res, fmt='v1')
    word = p.qzeros.to(torch.int64) & 0xFFFFFFFF                   # GPTQModel's v1 -> v2: add 0x11111111 to the whole word
    v2 = ((word + 0x11111111) & 0xFFFFFFFF)
    assert torch.equal(v2, pack_layer(res, fmt='v2').qzeros.to(torch.int64) & 0xFFFFFFFF)


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from(PACK_BITS), G=st.sampled_from([32, 64]), act=st.booleans(), seed=st.integers(0, 1000))
def test_quantlinear_equals_fake_quant_linear(bits, G, act, seed):
    torch.manual_seed(seed)
    n, m = 128, 64
    X = torch.randn(300, n); W = torch.randn(m, n); b = torch.randn(m)
    res = gptq(W, 2 * X.T @ X / len(X), QuantSpec(bits=bits, group_size=G), act_order=act)
    ref = nn.Linear(n, m); ref.weight.data.copy_(res.weight); ref.bias.data.copy_(b)
    with torch.no_grad():
        exact = QuantLinear.from_packed(pack_layer(res, b, scale_dtype=torch.float32), G, backend='torch')
        assert torch.equal(exact(X), ref(X))                      # fp32 scales: bit-identical
        half = QuantLinear.from_packed(pack_layer(res, b), G, backend='torch')
        torch.testing.assert_close(half(X), ref(X), rtol=2e-3, atol=2e-3 * float(ref(X).abs().max()))


def test_pack_errors():
    with pytest.raises(ValueError, match='multiple of 32'): pack_bits(torch.zeros(16, 2, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match='use one of'): pack_bits(torch.zeros(32, 2, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match=r'\[0, 3\]'): pack_bits(torch.full((16, 1), 4), 2)
    with pytest.raises(ValueError, match='int32'): unpack_bits(torch.zeros(3, 2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="'v1'"): pack_layer(rtn(torch.randn(32, 64), QuantSpec(bits=4, group_size=32)), fmt='v3')
    with pytest.raises(ValueError, match='backend'): resolve_backend('numba', torch.device('cpu'))
    with pytest.raises(ValueError, match='CUDA device'): resolve_backend('cupy', torch.device('cpu'))
    assert resolve_backend('auto', torch.device('cpu')) == 'torch'


# --- a whole (tiny random) Whisper through the real pipeline ---
@pytest.fixture(scope='module')
def packed_run():
    from fade_asr.testing import tiny_random_whisper
    from fade_asr.pipeline import QuantConfig
    model = tiny_random_whisper(seed=2)
    rng = np.random.default_rng(2)
    calib = [Utt(i, s, rng) for i, s in enumerate([4.0, 5.0, 3.0, 6.0])]
    cfg = QuantConfig.make(bits=3, group_size=32, method='qep', n_calib=4)
    qm, rep = quantize(model, calib, cfg, progress=False)
    return model, qm, rep, rep.solutions


def test_report_carries_every_solution_exactly(packed_run):
    model, qm, rep, sols = packed_run
    assert set(sols) == {r.name for r in rep.layers}
    for name, res in sols.items():
        assert torch.equal(qm.get_submodule(name).weight.detach(), res.dequantize())


def test_packed_model_save_load_identical(packed_run, tmp_path):
    model, qm, rep, sols = packed_run
    feats, dec = torch.randn(1, 80, 3000), torch.tensor([[50257, 11, 12]])
    with torch.no_grad():
        ref = qm(input_features=feats, decoder_input_ids=dec).logits
        pm = pack_model(copy.deepcopy(qm), sols, scale_dtype=torch.float32, backend='torch')
        assert len(packed_layers(pm)) == len(sols)
        assert torch.equal(pm(input_features=feats, decoder_input_ids=dec).logits, ref)
        out = save_packed(pm, tmp_path / 'ckpt')
        qc = json.loads((out / QUANTIZE_CONFIG).read_text())
        assert (qc['bits'], qc['group_size'], qc['desc_act'], qc['checkpoint_format']) == (3, 32, False, 'gptq_v2')
        lm, _ = load_packed(out)
        assert torch.equal(lm(input_features=feats, decoder_input_ids=dec).logits, ref)
        gc = lambda m: {k: v for k, v in m.generation_config.to_dict().items() if k != 'transformers_version'}
        assert gc(lm) == gc(qm), 'greedy decoding needs the saved generation settings back'
        assert tensor_bytes(lm) < tensor_bytes(qm)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')], 'no temporary directories left behind'


def test_pack_model_refuses_foreign_codes(packed_run):
    model, qm, rep, sols = packed_run
    with pytest.raises(ValueError, match='do not rebuild'):
        pack_model(copy.deepcopy(model), sols)                    # the FP model: its weights are not the codes'
    with pytest.raises(ValueError, match='no quantized layers'): pack_model(copy.deepcopy(qm), {})


@pytest.fixture()
def saved(packed_run, tmp_path):
    _, qm, _, sols = packed_run
    return save_packed(pack_model(copy.deepcopy(qm), sols), tmp_path / 'ckpt')


def test_truncated_file_is_refused(saved):
    f = saved / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match='truncated or corrupt'): load_packed(saved)


def test_mismatched_config_is_refused(saved):
    qc = json.loads((saved / QUANTIZE_CONFIG).read_text())
    qc['bits'] = 4
    (saved / QUANTIZE_CONFIG).write_text(json.dumps(qc))
    with pytest.raises(ValueError, match='does not match its config'): load_packed(saved)


def test_missing_tensor_is_refused(saved):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(saved / WEIGHTS))
    del sd[next(k for k in sd if k.endswith('fc1.qweight'))]
    save_file(sd, str(saved / WEIGHTS))
    with pytest.raises(ValueError, match='lacks'): load_packed(saved)


def test_missing_files_are_refused(saved, tmp_path):
    (saved / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS): load_packed(saved)
    with pytest.raises(FileNotFoundError, match=QUANTIZE_CONFIG): load_packed(tmp_path)


def test_set_backend(packed_run):
    _, qm, _, sols = packed_run
    pm = set_backend(pack_model(copy.deepcopy(qm), sols), 'torch')
    assert {m.backend for m in packed_layers(pm).values()} == {'torch'}
    with pytest.raises(ValueError, match='backend'): set_backend(pm, 'triton')
