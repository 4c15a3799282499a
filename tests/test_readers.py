"""The GPTQ-layout and compressed-tensors checkpoints, checked by the readers an engineer deploys with: GPTQModel's
offline dequantizer, the compressed-tensors library, and transformers (which loads compressed-tensors checkpoints and
refuses GPTQ ones for a speech model). Real tiny.en weights; our own loader is never the judge here."""
import copy, json, os

import pytest
import torch

from fade_asr.data import calibration_subset, load_dataset
from fade_asr.packing import pack_model, save_packed, packed_layers, WEIGHTS
from fade_asr.pipeline import quantize
from fade_asr.recipes import QuantConfig
from fade_asr.scoring import normalize, transcribe
from readers import need

os.environ.setdefault('FADE_ASR_QUIET', '1')


@pytest.fixture(scope='module')
def tiny():
    from fade_asr.models import load_model
    return load_model()


@pytest.fixture(scope='module')
def utts():
    "Every 12th utterance of each shipped test split: the transcripts the readers must reproduce."
    return [u for n in ('asterisk', 'harvard') for u in list(load_dataset(n, 'test'))[::12]]


# the grids a packed checkpoint can hold: QuantConfig fields, and the checkpoint format
# (v1 stores zero - 1, so it cannot hold a zero of 0, which asymmetric grids have here: v1 is tested symmetric);
# 'w3g32-default' is the default recipes' base (gptq-w3, fade-w3): g32, act-order with static groups, the MSE grid
GRIDS = {'w4g128': (dict(bits=4, group_size=128), 'v2'), 'w3g128': (dict(bits=3, group_size=128), 'v2'),
         'w8g128-sym': (dict(bits=8, group_size=128, sym=True), 'v2'),
         'w4g128-act-order': (dict(bits=4, group_size=128, act_order=True), 'v2'),
         'w4g128-sym-v1': (dict(bits=4, group_size=128, sym=True), 'v1'),
         'w3g32-default': (dict(bits=3, group_size=32, act_order=True, static_groups=True, mse=True), 'v2')}


@pytest.fixture(scope='module')
def packed(tiny, tmp_path_factory):
    "{grid: (packed model, its checkpoint folder)}, by the package's GPTQ on 8 calibration utterances, built on first use."
    calib, done = calibration_subset('asterisk', 8, 0), {}
    def get(grid):
        if grid not in done:
            kw, fmt = GRIDS[grid]
            cfg = QuantConfig.make(method='gptq', **kw)
            qm, rep = quantize(tiny.model, calib, cfg, processor=tiny.processor, progress=False)
            pm = pack_model(qm, rep.solutions, fmt=fmt)
            d = save_packed(pm, tmp_path_factory.mktemp(grid) / 'ckpt', tiny.processor, act_order=cfg.act_order)
            done[grid] = pm, d
        return done[grid]
    return get


def _gptqmodel_dequantize(src, dst):
    need('gptqmodel')
    from gptqmodel.utils.model_dequant import dequantize_model
    dequantize_model(src, dst, target_dtype=torch.float32)
    from safetensors.torch import load_file
    return load_file(str(dst / WEIGHTS))


# --- GPTQ layout: GPTQModel ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('grid', list(GRIDS))
def test_gptqmodel_dequantizes_every_layer_exactly(packed, grid, tmp_path):
    "GPTQModel's offline dequantizer, reading our config.json, rebuilds every packed linear bit for bit (W3, W8, act-order, v1 too)."
    pm, d = packed(grid)
    theirs = _gptqmodel_dequantize(d, tmp_path / 'dense')
    layers = packed_layers(pm)
    assert len(layers) == 64
    for name, ql in layers.items():
        assert torch.equal(theirs[f'{name}.weight'], ql.dequantize(torch.float32)), name
    stored = pm.state_dict()
    for k, v in theirs.items():                                   # everything else: the stored fp16 values
        if k in stored: assert torch.equal(v, stored[k].float()), k


def test_gptqmodel_output_runs_in_transformers_as_the_package(packed, tiny, utts, tmp_path):
    "The folder GPTQModel writes loads in plain transformers and transcribes exactly as the package's packed model."
    from transformers import WhisperForConditionalGeneration
    pm, d = packed('w4g128')
    _gptqmodel_dequantize(d, tmp_path / 'dense')
    assert 'quantization_config' not in json.loads((tmp_path / 'dense' / 'config.json').read_text())
    hf = WhisperForConditionalGeneration.from_pretrained(tmp_path / 'dense', dtype=torch.float32).eval()
    audio = [u.audio for u in utts]
    assert transcribe(hf, tiny.processor, audio, progress=False) == transcribe(pm, tiny.processor, audio, progress=False)


def test_transformers_refuses_gptq_for_a_speech_model(packed):
    """transformers' own GPTQ loader (through optimum and GPTQModel) converts only text models: for Whisper it refuses
    with this exact error, rather than loading random weights. The README says so and points to GPTQModel's dequantizer."""
    need('optimum'); need('gptqmodel')
    from transformers import WhisperForConditionalGeneration
    _, d = packed('w4g128')
    with pytest.raises(RuntimeError, match='^We can only quantize pure text model.$'):
        WhisperForConditionalGeneration.from_pretrained(d, dtype=torch.float16)


# --- compressed-tensors ----------------------------------------------------------------------------------------------

def _ct_load(path, dequantize=True):
    need('compressed_tensors')
    from transformers import WhisperForConditionalGeneration
    from transformers.utils.quantization_config import CompressedTensorsConfig
    return WhisperForConditionalGeneration.from_pretrained(
        path, quantization_config=CompressedTensorsConfig(dequantize=dequantize), dtype=torch.float32).eval()


@pytest.mark.parametrize('grid', ['w4g128', 'w3g128', 'w8g128-sym', 'w4g128-sym-v1', 'w3g32-default'])
def test_compressed_tensors_decompresses_every_layer(packed, grid, tmp_path):
    """transformers + compressed-tensors load the export: each weight is ours computed in the stored fp16 (compressed-tensors
    multiplies in the scale's dtype; a fp16 scale times a small integer is exact in fp32, so this is Ŵ rounded once)."""
    from fade_asr.compressed_tensors import export_compressed
    pm, _ = packed(grid)
    export_compressed(pm, tmp_path / 'ct')
    hf = _ct_load(tmp_path / 'ct')
    for name, ql in packed_layers(pm).items():
        assert torch.equal(hf.get_submodule(name).weight.data, ql.dequantize(torch.float32).half().float()), name
    assert torch.equal(hf.model.decoder.embed_tokens.weight, pm.model.decoder.embed_tokens.weight)


def _agree(a, b) -> float:
    return sum(normalize(x) == normalize(y) for x, y in zip(a, b)) / len(a)


def test_compressed_tensors_runs_as_the_package(packed, tiny, utts, tmp_path):
    """The export, dequantized at load, transcribes as the package's packed model on >= 95% of the utterances (the fp16
    product differs in the last bit); with fp32 storage the transcripts are identical."""
    from fade_asr.compressed_tensors import export_compressed
    pm, _ = packed('w4g128')
    audio = [u.audio for u in utts]
    ours = transcribe(pm, tiny.processor, audio, progress=False)
    export_compressed(pm, tmp_path / 'ct16')
    same = _agree(ours, transcribe(_ct_load(tmp_path / 'ct16'), tiny.processor, audio, progress=False))
    assert same >= 0.95, f"{same:.0%} of {len(ours)} transcripts agree"
    p32 = copy.deepcopy(pm)
    for ql in packed_layers(p32).values(): ql.scales = ql.scales.float()
    p32._fade_packed['scale_dtype'] = 'float32'
    export_compressed(p32, tmp_path / 'ct32')
    assert transcribe(_ct_load(tmp_path / 'ct32'), tiny.processor, audio, progress=False) == ours


def test_cli_writes_compressed_tensors(packed, tmp_path, capsys):
    "`fade-asr export --format compressed-tensors` from a packed checkpoint, and the clear errors around it."
    from fade_asr.cli import main
    pm, d = packed('w4g128')
    main(['export', '--model', str(d), '--format', 'compressed-tensors', '--out', str(tmp_path / 'ct')])
    assert 'compressed-tensors checkpoint' in capsys.readouterr().out
    qc = json.loads((tmp_path / 'ct' / 'config.json').read_text())['quantization_config']
    assert (qc['quant_method'], qc['format'], qc['ignore']) == ('compressed-tensors', 'pack-quantized', ['proj_out'])
    hf = _ct_load(tmp_path / 'ct')
    name = 'model.encoder.layers.0.fc1'
    assert torch.equal(hf.get_submodule(name).weight.data, packed_layers(pm)[name].dequantize(torch.float32).half().float())
    with pytest.raises(SystemExit, match='relabels the codes of a packed checkpoint'):
        main(['export', '--format', 'compressed-tensors', '--out', str(tmp_path / 'fp')])
    with pytest.raises(SystemExit, match='drop --type'):
        main(['export', '--model', str(d), '--format', 'compressed-tensors', '--type', 'q4_1', '--out', str(tmp_path / 't')])
    _, ao = packed('w4g128-act-order')
    with pytest.raises(SystemExit, match='act-order'):
        main(['export', '--model', str(ao), '--format', 'compressed-tensors', '--out', str(tmp_path / 'ao')])
    assert not (tmp_path / 'ao').exists()
    with pytest.raises(SystemExit, match='weight-only'):
        main(['quantize', '--recipe', 'w8a8', '--save', 'compressed-tensors', '--out', str(tmp_path / 'a')])


def test_checkpoints_are_readable_by_other_users(packed):
    "A server often runs as another user: files 0644, folders 0755 (safetensors and mkstemp make 0600)."
    _, d = packed('w4g128')
    assert oct(d.stat().st_mode & 0o777) == '0o755'
    assert {oct(p.stat().st_mode & 0o777) for p in d.iterdir()} == {'0o644'}
