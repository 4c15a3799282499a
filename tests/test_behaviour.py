"The refactor guard (see tests/behaviour.py): the guarded runs still give the stored transcripts, word for word."
import json

from behaviour import STORE, transcripts


def test_transcripts_unchanged():
    want = json.loads(STORE.read_text())
    got = transcripts()
    assert got.keys() == want.keys()
    for recipe in want:
        for name, texts in want[recipe].items():
            diff = [i for i, (a, b) in enumerate(zip(got[recipe][name], texts)) if a != b]
            assert got[recipe][name] == texts, f"{recipe} on {name}: utterances {diff} changed"
