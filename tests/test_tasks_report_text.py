"""Report text: the tokenizer (English and Chinese) and the report metrics against NLTK and hand-computed values."""

from __future__ import annotations

import math
import random
import types
from pathlib import Path

import pytest

from echocare.tasks.report.tokenizer import ReportTokenizer, TokenizerError, join_tokens, split_text
from echocare.tasks.report.metrics import (
    FindingsVocabulary,
    ReportScore,
    corpus_bleu,
    findings_scores,
    meteor,
    metric_tokens,
    report_metrics,
    report_scores,
    rouge_l,
    single_meteor,
    single_rouge_l,
)

REPO = Path(__file__).resolve().parents[1]
VOCABULARY = REPO / "bundles" / "usreport" / "configs" / "findings.yaml"

ENGLISH = [
    "the liver is normal in size with homogeneous echotexture. no focal lesion is seen.",
    "a 1.5 cm hypoechoic nodule (solid) is seen in the right lobe; x-ray not needed!",
]
CHINESE = ["肝脏大小正常，回声均匀。未见明显占位。", "甲状腺右叶可见一较大无回声囊肿，后方回声增强。"]


def test_split_text_scripts():
    assert split_text("Liver: 1.5 cm lesion. 肝脏未见异常。") == [
        "liver", ":", "1.5", "cm", "lesion", ".", "肝", "脏", "未", "见", "异", "常", "。",
    ]
    assert split_text("The X-ray, NOT done", lowercase=False, punctuation=False) == ["The", "X-ray", "NOT", "done"]
    assert metric_tokens("未见占位，OK.") == ["未", "见", "占", "位", "ok"]


@pytest.mark.parametrize("text", ENGLISH + CHINESE)
def test_tokenizer_round_trip(text, tmp_path):
    tokenizer = ReportTokenizer.train(ENGLISH + CHINESE)
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text
    loaded = ReportTokenizer.load(tokenizer.save(tmp_path / "tok.json"))
    assert loaded.tokens == tokenizer.tokens and loaded.decode(ids + [tokenizer.pad_id] * 3) == text


def test_tokenizer_vocabulary_unknowns_and_errors(tmp_path):
    tokenizer = ReportTokenizer.train(["a b b c c c", "肝 肝"], min_count=2)
    # specials first, then by frequency (ties alphabetical); "a" (once) left out
    assert tokenizer.tokens == ["<pad>", "<bos>", "<eos>", "<unk>", "c", "b", "肝"]
    assert tokenizer.encode("a c 肝 脾", add_special=False) == [3, 4, 6, 3]
    assert tokenizer.encode("c c c c", max_length=2) == [1, 4, 4, 2]
    assert tokenizer.decode([1, 5, 4, 2, 5]) == "b c"  # stops at <eos>
    assert join_tokens(["a", "(", "b", ")", ",", "肝", "脏", "。", "c"]) == "a (b),肝脏。c"  # no spaces next to CJK
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": ["x"]}')
    with pytest.raises(TokenizerError, match="bad.json"):
        ReportTokenizer.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ReportTokenizer.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no report text"):
        ReportTokenizer.train(["", " . "[:0]])


def _random_corpus(rng: random.Random, n: int, refs: int):
    words = "the liver lesion is a small large cyst nodule seen no focal normal size".split()
    hyps = [[rng.choice(words) for _ in range(rng.randint(3, 14))] for _ in range(n)]
    references = [[[rng.choice(words) for _ in range(rng.randint(3, 14))] for _ in range(refs)] for _ in range(n)]
    return hyps, references


@pytest.mark.parametrize("refs", [1, 3])
def test_bleu_matches_nltk(refs):
    from nltk.translate.bleu_score import corpus_bleu as nltk_bleu

    rng = random.Random(refs)
    for _ in range(5):
        hyps, references = _random_corpus(rng, 8, refs)
        ours = corpus_bleu(hyps, references)
        for n in range(1, 5):
            expected = nltk_bleu(references, hyps, weights=tuple([1.0 / n] * n))
            assert ours[n - 1] == pytest.approx(expected, abs=1e-12)


def test_bleu_hand_computed():
    # hypothesis "the the cat" vs reference "the cat sat on": clipped unigrams 2/3, bigrams 1/2,
    # no trigram; brevity penalty exp(1 - 4/3)
    scores = corpus_bleu([["the", "the", "cat"]], [[["the", "cat", "sat", "on"]]])
    bp = math.exp(1 - 4 / 3)
    assert scores[0] == pytest.approx(bp * 2 / 3)
    assert scores[1] == pytest.approx(bp * math.sqrt(2 / 3 * 1 / 2))
    assert scores[2] == scores[3] == 0.0
    assert corpus_bleu([[]], [[["a"]]]) == [0.0] * 4


def test_meteor_matches_nltk_without_synonyms():
    from nltk.translate.meteor_score import meteor_score

    no_wordnet = types.SimpleNamespace(synsets=lambda word: [])
    rng = random.Random(3)
    pairs = [
        ("the lesions were enhancing posteriorly", "a lesion with posterior enhancement is seen"),
        ("no focal lesion is seen in the liver", "the liver shows no focal lesions"),
        ("It is a guide to action which ensures that the military always obeys the commands of the party",
         "It is a guide to action that ensures that the military will forever heed Party commands"),
    ]
    hyps, refs = _random_corpus(rng, 10, 1)
    pairs += [(" ".join(h), " ".join(r[0])) for h, r in zip(hyps, refs)]
    for hyp, ref in pairs:
        h, r = metric_tokens(hyp), metric_tokens(ref)
        assert single_meteor(h, r, synonyms=False) == pytest.approx(meteor_score([r], h, wordnet=no_wordnet), abs=1e-12)
    # NLTK's documented value for its example (no synonym is needed there)
    assert round(single_meteor(metric_tokens(pairs[2][0]), metric_tokens(pairs[2][1]), synonyms=False), 4) == 0.6944
    # the best reference counts; mean over reports
    assert meteor(["the cat", "x"], [["a dog", "the cat"], ["y"]], synonyms=False) == pytest.approx(
        (single_meteor(["the", "cat"], ["the", "cat"], synonyms=False) + 0.0) / 2
    )


def _wordnet_or_skip():
    from echocare.tasks.report.metrics import load_wordnet

    wordnet = load_wordnet()
    if wordnet is None:
        pytest.skip("no WordNet here: neither NLTK's wordnet corpus nor Debian's wordnet-base "
                    "(.ci/run installs it: apt-get install wordnet-base)")
    return wordnet


def test_meteor_with_wordnet_matches_nltk():
    # WordNet from NLTK's corpus or Debian's wordnet-base through NLTK's WordNetCorpusReader; NLTK's
    # meteor_score, given the same WordNet, is the independent reference.
    from nltk.translate.meteor_score import meteor_score

    wordnet = _wordnet_or_skip()
    assert {"big", "large"} <= {l.name() for s in wordnet.synsets("large") for l in s.lemmas()}
    pairs = [
        ("the kidney shows a small stone", "the kidney displays a little stone"),
        ("a large hypoechoic mass is seen", "a big hypoechoic mass is visible"),
        ("the liver is enlarged with a rough surface", "the liver is large with a coarse surface"),
        ("It is a guide to action which ensures that the military always obeys the commands of the party",
         "It is a guide to action that ensures that the military will forever heed Party commands"),
    ]
    for hyp, ref in pairs:
        h, r = metric_tokens(hyp), metric_tokens(ref)
        assert single_meteor(h, r, synonyms=True) == pytest.approx(meteor_score([r], h, wordnet=wordnet), abs=1e-12)
    # the synonym stage matters: "shows" ~ "displays" (stems show, display) match only with WordNet;
    # NLTK looks synonyms up on Porter stems, so "large" (larg) ~ "big" does not match, with NLTK or here
    h, r = metric_tokens(pairs[0][0]), metric_tokens(pairs[0][1])
    assert round(single_meteor(h, r, synonyms=True), 4) == 0.8067
    assert round(single_meteor(h, r, synonyms=False), 4) == 0.5260


def test_meteor_without_wordnet_is_refused_when_synonyms_are_asked_for(monkeypatch, tmp_path):
    from echocare.tasks.report import metrics

    monkeypatch.setattr(metrics, "load_wordnet", lambda *a, **k: None)
    metrics._synonyms.cache_clear()
    h, r = metric_tokens("a large mass"), metric_tokens("a big mass")
    assert single_meteor(h, r) == single_meteor(h, r, synonyms=False)  # the default needs no WordNet
    with pytest.raises(metrics.WordNetMissingError, match="apt-get install wordnet-base.*--meteor_wordnet false"):
        single_meteor(h, r, synonyms=True)
    with pytest.raises(metrics.WordNetMissingError, match="wordnet-base"):
        report_metrics(False, "bleu4", meteor_wordnet=True)
    # the bundle's default: no WordNet, said in the metrics output
    chosen = report_metrics(False, "bleu4", meteor_wordnet="false")
    assert chosen["meteor_wordnet"].compute() == 0.0 and chosen["meteor"].meteor_wordnet is False


def test_meteor_hand_computed_chunks():
    # hypothesis a b c d, reference c d a b: 4 matches in 2 chunks; P = R = 1
    score = single_meteor(list("abcd"), list("cdab"), synonyms=False)
    assert score == pytest.approx(1 - 0.5 * (2 / 4) ** 3)
    # stem match: "lesions" ~ "lesion"
    assert single_meteor(["lesions"], ["lesion"], synonyms=False) == pytest.approx(1 - 0.5)


def test_rouge_l_hand_computed():
    # LCS(a b c d, a c d e f) = 3: P = 3/4, R = 3/5, beta 1.2
    expected = (1 + 1.44) * 0.75 * 0.6 / (0.6 + 1.44 * 0.75)
    assert single_rouge_l(list("abcd"), [list("acdef")]) == pytest.approx(expected)
    # best precision and best recall over references, taken separately (pycocoevalcap)
    p, r = max(3 / 4, 2 / 4), max(3 / 5, 2 / 2)
    assert single_rouge_l(list("abcd"), [list("acdef"), list("bd")]) == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))
    # Chinese is scored per character: 肝脏正常 vs 肝脏大小正常 -> LCS 4, P 1, R 4/6
    assert rouge_l(["肝脏正常"], [["肝脏大小正常。"]]) == pytest.approx(2.44 * 1 * (4 / 6) / (4 / 6 + 1.44))
    assert single_rouge_l([], [["a"]]) == 0.0


def test_findings_extraction_with_negation():
    vocab = FindingsVocabulary.from_yaml(VOCABULARY)
    found = vocab.extract("The liver is normal. No focal lesion or cyst is seen, but a small calcification is noted.")
    positive = {k for k, v in found.items() if v}
    assert positive == {"liver", "small", "calcification"}
    found = vocab.extract("甲状腺大小正常，回声均匀。可见一较大无回声囊肿，后方回声增强。")
    assert {k for k, v in found.items() if v} == {"thyroid", "lesion", "cyst", "large", "posterior_enhancement"}
    assert {k for k, v in vocab.extract("肝脏大小正常。未见明显占位。").items() if v} == {"liver"}
    # "liver" must not fire inside "deliver" (whole words for Latin scripts)
    assert not vocab.extract("deliver the report")["liver"]
    with pytest.raises(ValueError, match="finding 'x'"):
        FindingsVocabulary.from_mapping({"findings": {"x": []}})


def test_findings_scores_hand_computed():
    vocab = FindingsVocabulary.from_mapping({"findings": {"a": ["alpha"], "b": ["beta"], "c": ["gamma"]}})
    generated = ["alpha beta", "alpha", "no alpha"]
    references = ["alpha", "alpha gamma", "beta"]
    # case 1: a TP, b FP, c TN; case 2: a TP, b TN, c FN; case 3: a TN, b FN, c TN
    scores = findings_scores(generated, references, vocab)
    assert scores["findings_precision"] == pytest.approx(2 / 3)
    assert scores["findings_recall"] == pytest.approx(2 / 4)
    assert scores["findings_f1"] == pytest.approx(4 / 7)
    assert scores["findings_accuracy"] == pytest.approx(6 / 9)  # 2 TP + 4 TN of 9
    assert scores["findings_macro_f1"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_report_scores_and_ignite_metric():
    generated = ["the liver is normal. no focal lesion is seen.", "a large cyst is seen."]
    references = ["the liver is normal. no focal lesion is seen.", "a small solid nodule is seen."]
    scores = report_scores(generated, references, FindingsVocabulary.from_yaml(VOCABULARY))
    assert scores["bleu1"] == pytest.approx(corpus_bleu([metric_tokens(g) for g in generated], [[metric_tokens(r)] for r in references])[0])
    # findings: case 1 liver TP; case 2 lesion TP, large/cyst FP, small/solid_nodule FN
    assert scores["findings_precision"] == pytest.approx(2 / 4) and scores["findings_recall"] == pytest.approx(2 / 4)
    assert report_scores(references, references)["bleu4"] == pytest.approx(1.0)
    metrics = report_metrics(key_metric=False, key="findings_f1", vocabulary=VOCABULARY)
    assert "findings_f1" not in metrics and "bleu4" in metrics and "findings_recall" in metrics
    metric = ReportScore("findings_f1", VOCABULARY)
    metric.reset()
    metric.update([{"generated": g, "report": r} for g, r in zip(generated, references)])
    assert metric.compute() == pytest.approx(scores["findings_f1"])
    with pytest.raises(ValueError, match="findings vocabulary"):
        ReportScore("findings_f1")
    with pytest.raises(ValueError, match="key metric"):
        report_metrics(True, key="findings_f1")
