"""The refactor guard: one FADE W3 run and one GPTQ W4 run on a fixed small calibration set, transcribed on the first
test utterances of each shipped set, must give the transcripts stored in tests/data/behaviour.json.

`python tests/behaviour.py --write` records them for this machine's CPU kind (only when the behaviour is meant to
change, or on the commit before a refactor for a new kind); `tests/test_behaviour.py` checks them. One thread, so the
floating-point order is the same on every machine of a kind. Machines of different kinds (AVX2, AVX-512, AMX) pick
different matrix kernels, and FADE W3's transcripts differ between them, so each kind has its own record (`unrecorded`:
the one recorded before kinds were stored, kind unknown). On a kind with no record of its own the transcripts must equal
one of the records; if they equal none, the test is skipped with a message saying how to record the kind, since a
difference there may be the kernels and not the code.
"""
import json, platform, sys
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


def cpu_kind() -> str:
    "The CPU features that choose the float kernels of torch's BLAS and oneDNN: within a kind, results are identical."
    try: flags = set(open('/proc/cpuinfo').read().split())
    except OSError: flags = set()
    return platform.machine() + ''.join(f'+{f}' for f in ('avx2', 'avx512f', 'avx512_bf16', 'avx512_fp16', 'amx_tile') if f in flags)


def stored() -> dict:
    "{CPU kind: its stored transcripts}."
    return json.loads(STORE.read_text())


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
    kinds = json.loads(STORE.read_text()) if STORE.is_file() else {}
    kinds[cpu_kind()] = transcripts()
    STORE.write_text(json.dumps(kinds, indent=1) + '\n')
    print(f'wrote the transcripts of CPU kind {cpu_kind()} to {STORE}')
