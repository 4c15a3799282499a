"The refactor guard (see tests/behaviour.py): the guarded runs still give the stored transcripts, word for word."
from behaviour import stored, transcripts


def test_transcripts_unchanged():
    want = stored()
    got = transcripts()
    assert got.keys() == want.keys()
    for recipe in want:
        for name, texts in want[recipe].items():
            diff = [i for i, (a, b) in enumerate(zip(got[recipe][name], texts)) if a != b]
            assert got[recipe][name] == texts, f"{recipe} on {name}: utterances {diff} changed"
