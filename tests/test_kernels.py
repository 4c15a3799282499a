"""The CuPy kernels against their torch references (GPU only, marked `gpu`), and the kernel benchmark's CPU path."""
import json, os

import pytest
import torch

from fade_asr.kernels import CUDA_SOURCES, cupy_available, reference_matmul, quant_matmul, gptq_gpu
from fade_asr.bench import bench_kernels, bench_markdown, decoder_latency
from fade_asr.pack_format import PACK_BITS, pack_layer, dequantize_packed
from fade_asr.packing import QuantLinear
from fade_asr.quantizer import QuantSpec, rtn
from fade_asr.gptq import gptq

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()),
                               reason="needs a CUDA GPU and CuPy (pip install 'fade_asr[gpu]')")


def test_every_kernel_is_registered_for_the_compile_check():
    assert set(CUDA_SOURCES) == {'dequant_gemv', 'dequant_gemm', 'gptq_block'}
    for b in PACK_BITS:
        assert f'GEMV({b})' in CUDA_SOURCES['dequant_gemv'] and f'GEMM({b})' in CUDA_SOURCES['dequant_gemm']


@pytest.mark.parametrize('bits', PACK_BITS)
@pytest.mark.parametrize('act', [False, True])
def test_reference_matmul_matches_dequantize(bits, act):
    torch.manual_seed(bits)
    W, x = torch.randn(64, 256), torch.randn(5, 256)
    res = rtn(W, QuantSpec(bits=bits, group_size=64))
    if act: res.g_idx = res.g_idx[torch.randperm(256)]
    p = pack_layer(res)
    torch.testing.assert_close(reference_matmul(x, p.qweight, p.qzeros, p.scales, p.g_idx, bits), x @ dequantize_packed(p).T)


def test_no_gpu_means_torch_and_a_clear_error():
    if cupy_available(): pytest.skip('a GPU is present')
    p = pack_layer(rtn(torch.randn(32, 64), QuantSpec(bits=4, group_size=32)))
    with pytest.raises(RuntimeError, match='CuPy'): quant_matmul(torch.randn(1, 64), p.qweight, p.qzeros, p.scales, p.g_idx, 4)
    assert QuantLinear.from_packed(p, 32)(torch.randn(2, 64)).shape == (2, 32)   # 'auto' picks torch on the CPU


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize('bits', PACK_BITS)
@pytest.mark.parametrize('act', [False, True])
@pytest.mark.parametrize('fmt', ['v1', 'v2'])
@pytest.mark.parametrize('T', [1, 3, 77])
def test_kernels_match_reference(bits, act, fmt, T):
    torch.manual_seed(0)
    m, n = 320, 1024
    res = rtn(torch.randn(m, n), QuantSpec(bits=bits, group_size=128))
    if act: res.g_idx = res.g_idx[torch.randperm(n)]
    p = pack_layer(res, fmt=fmt)
    t = [v.cuda() for v in (p.qweight, p.qzeros, p.scales, p.g_idx)]
    x = torch.randn(T, n, device='cuda')
    ref = reference_matmul(x.half().float(), *t, bits, fmt)
    torch.testing.assert_close(quant_matmul(x, *t, bits, fmt), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize('bits', [3, 4])
@pytest.mark.parametrize('G', [32, 128])
@pytest.mark.parametrize('sym', [False, True])
def test_gptq_block_kernel_matches_torch(bits, G, sym):
    torch.manual_seed(0)
    X = torch.randn(2048, 256, device='cuda'); W = torch.randn(100, 256, device='cuda')
    H = 2 * X.T @ X / len(X)
    spec = QuantSpec(bits=bits, group_size=G, sym=sym)
    a, b = gptq(W, H, spec), gptq_gpu(W, H, spec)
    assert (a.codes != b.codes).float().mean() < 1e-3           # fp sums in another order: rare ties may flip
    assert abs(a.loss - b.loss) <= 1e-3 * a.loss


@needs_gpu
@pytest.mark.gpu
def test_quantlinear_gpu_backend():
    p = pack_layer(rtn(torch.randn(64, 256), QuantSpec(bits=4, group_size=64)), torch.randn(64))
    ql = QuantLinear.from_packed(p, 64).cuda()
    x = torch.randn(4, 256, device='cuda')
    torch.testing.assert_close(ql(x), QuantLinear.from_packed(p, 64, backend='torch').cuda()(x), rtol=2e-3, atol=2e-2)


def test_bench_cpu_path():
    res = bench_kernels({'toy': [(64, 128)]}, batches=(1, 4), bits=(3,), group_size=64, repeat=1, gptq_shape=(32, 128))
    assert len(res['rows']) == 2 and all(r['cpu_packed_torch_ms'] > 0 for r in res['rows'])
    if not cupy_available(): assert all(r['gpu_kernel_ms'] is None for r in res['rows']) and res['gptq']['gpu_fused_block_s'] is None
    md = bench_markdown(res)
    assert '| toy | 64×128 | 3 | 4 |' in md


def test_bench_kernels_cli(tmp_path, capsys):
    from fade_asr.cli import main
    main(['bench-kernels', '--quick', '--no-e2e', '--bits', '4', '--out', str(tmp_path / 'bk')])
    res = json.loads((tmp_path / 'bk' / 'results.json').read_text())
    assert res['rows'] and (tmp_path / 'bk' / 'results.md').read_text().startswith('# Kernel benchmark')
    if not cupy_available(): assert 'GPU columns stay empty' in capsys.readouterr().out


def test_decoder_latency_leaves_the_model_alone():
    from fade_asr.testing import tiny_random_whisper
    m = tiny_random_whisper(d_model=64, layers=1, ffn=128)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lat = decoder_latency(m, bits=3, group_size=64, tokens=3, repeat=1)
    assert lat['dense_ms_per_token'] >= 0 and lat['packed_ms_per_token'] >= 0 and lat['device'] == 'cpu'
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
