"""The refactor guard: one FADE W3 run and one GPTQ W4 run on a fixed small calibration set, transcribed on the first
test utterances of each shipped set, must give the transcripts stored in tests/data/behaviour.json.

`python tests/behaviour.py --write` records them (only when the behaviour is meant to change);
`tests/test_behaviour.py` checks them. One thread, so the floating-point order is the same on every machine of a kind.
"""
import json, sys
from pathlib import Path

import torch

from fade_asr.data import calibration_subset, load_dataset, shipped_datasets
from fade_asr.models import load_model
from fade_asr.pipeline import quantize
from fade_asr.recipes import load_recipe
from fade_asr.scoring import transcribe

STORE = Path(__file__).parent / 'data' / 'behaviour.json'
RUNS = {'fade-w3g128': dict(n_calib=16, seed=0), 'gptq-w4g128': dict(n_calib=16, seed=0)}
N_TEST = 6


def transcripts() -> dict:
    "{recipe: {data set: [transcript, ...]}} for the guarded runs."
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = load_model()
        tests = {n: load_dataset(n, split='test', limit=N_TEST) for n in shipped_datasets()}
        out = {}
        for recipe, kw in RUNS.items():
            cfg = load_recipe(recipe, **kw)
            qm, _ = quantize(lm.model, calibration_subset(cfg.calib_data, cfg.n_calib, cfg.seed), cfg,
                             processor=lm.processor, progress=False)
            out[recipe] = {n: transcribe(qm, lm.processor, [u.audio for u in ds], progress=False) for n, ds in tests.items()}
        return out
    finally: torch.set_num_threads(old)


if __name__ == '__main__' and '--write' in sys.argv:
    STORE.write_text(json.dumps(transcripts(), indent=1) + '\n')
    print(f'wrote {STORE}')
