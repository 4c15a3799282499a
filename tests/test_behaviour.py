"The refactor guard (see tests/behaviour.py): the guarded runs still give the stored transcripts, word for word."
import pytest
from behaviour import cpu_kind, stored, transcripts


def _diff(got: dict, want: dict) -> list[str]:
    "Where `got` differs from one record `want`: 'recipe on data set: utterances [i, ...]'."
    assert got.keys() == want.keys()
    out = []
    for recipe in want:
        for name, texts in want[recipe].items():
            d = [i for i, (a, b) in enumerate(zip(got[recipe][name], texts)) if a != b]
            if d or len(got[recipe][name]) != len(texts): out.append(f"{recipe} on {name}: utterances {d} changed")
    return out


def test_transcripts_unchanged():
    kinds, got, kind = stored(), transcripts(), cpu_kind()
    if kind in kinds:
        diff = _diff(got, kinds[kind])
        assert not diff, f"CPU kind {kind}: " + '; '.join(diff)
    elif not any(not _diff(got, want) for want in kinds.values()):
        pytest.skip(f"no transcripts are recorded for CPU kind {kind}, and they match no other kind's (matrix kernels "
                    "differ); record them with `python tests/behaviour.py --write` on a commit whose behaviour you trust")


def test_diff_names_the_changed_utterances():
    want = {'r': {'a': ['x', 'y', 'z']}}
    assert _diff({'r': {'a': ['x', 'y', 'z']}}, want) == []
    assert _diff({'r': {'a': ['x', 'Y', 'z']}}, want) == ['r on a: utterances [1] changed']
