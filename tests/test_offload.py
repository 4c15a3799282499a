"""Quantizing with the blocks on disk (`quantize(offload=...)`, `load_offloaded`): the same model as in memory, and
clear errors for checkpoints that do not match their config."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from fade_asr.data import calibration_subset
from fade_asr.models import get_adapter, load_model
from fade_asr.pipeline import BlockStore, load_offloaded, quantize, restore_blocks
from fade_asr.recipes import load_recipe
from fade_asr.testing import tiny_random_whisper


def test_offloaded_tiny_en_is_quantized_as_in_memory(tmp_path):
    "The real tiny.en read block by block from its checkpoint and quantized on disk: the same weights and codes as in memory."
    lm = load_model()
    cal, cfg = calibration_subset('asterisk', 8, 0), load_recipe('gptq-w3g128', n_calib=8)
    q_mem, rep_mem = quantize(lm.model, cal, cfg, processor=lm.processor, progress=False)
    m, proc, store = load_offloaded(lm.cache_dir, tmp_path / 'blocks', lm.processor)
    assert not any(BlockStore.resident(b) for b in get_adapter(m).blocks())
    q_off, rep_off = quantize(m, cal, cfg, processor=proc, progress=False, offload=store)
    restore_blocks(q_off, store, rep_off.solutions)
    want = q_mem.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in q_off.state_dict().items())
    assert all(torch.equal(rep_off.solutions[k].codes, rep_mem.solutions[k].codes.to(torch.uint8)) for k in rep_mem.solutions)


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / 'ck'
    tiny_random_whisper().save_pretrained(d)
    return d


def _edit(d, fn):
    sd = load_file(d / 'model.safetensors'); fn(sd); save_file(sd, d / 'model.safetensors')


@pytest.mark.parametrize('fault,msg', [
    (lambda sd: sd.__setitem__('model.encoder.extra.weight', torch.zeros(2)), 'the config has no place for'),
    (lambda sd: sd['model.encoder.layers.1.fc1.weight'].view(-1)[:3].fill_(float('nan')), 'model.encoder.layers.1.fc1.weight holds NaN/inf'),
    (lambda sd: sd.__setitem__('model.decoder.layers.0.fc2.weight', torch.zeros(3, 3)), 'the config wants'),
])
def test_load_offloaded_refuses_a_checkpoint_unlike_its_config(checkpoint, tmp_path, fault, msg):
    _edit(checkpoint, fault)
    with pytest.raises(ValueError, match=msg):
        load_offloaded(checkpoint, tmp_path / 'blocks')


def test_offload_refuses_what_needs_the_whole_model(checkpoint, tmp_path):
    "A greedy teacher decodes with every block, which are on disk."
    from fade_asr.testing import Utt
    import numpy as np
    rng = np.random.default_rng(0)
    m, _, store = load_offloaded(checkpoint, tmp_path / 'blocks')
    with pytest.raises(ValueError, match="decodes with the whole model"):
        quantize(m, [Utt(i, 0.5, rng) for i in range(4)], load_recipe('gptq-w3g128', teacher='greedy'), offload=store, progress=False)
