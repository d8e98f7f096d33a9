"""Report-generation metrics: BLEU-1..4, METEOR, ROUGE-L and findings scores.

All take report *text* and split it with :func:`metric_tokens`: lower case, punctuation
dropped, every CJK character a token of its own (so Chinese reports are scored per
character, as is usual for Chinese text), words of other scripts whole.

* ``bleu1`` .. ``bleu4``: corpus BLEU (Papineni et al. 2002): clipped n-gram counts summed
  over the corpus, geometric mean of the 1..n precisions with uniform weights, brevity
  penalty exp(1 - r / c) with r the summed reference lengths closest to each hypothesis
  (the shorter on ties); no smoothing (0 when some order has no match), as NLTK's
  ``corpus_bleu``.
* ``meteor``: Banerjee & Lavie (2005) as NLTK's ``meteor_score`` computes it (alpha 0.9,
  beta 3, gamma 0.5): unigrams aligned in stages, exact forms, then Porter stems, then,
  only with ``synonyms=True``, WordNet synonyms. The default, ``synonyms=False``, uses exact
  and stem matches only: offline and the same on every machine (equal to NLTK's
  ``meteor_score`` with an empty WordNet). ``synonyms=True`` reads NLTK's WordNet corpus when
  installed, else Debian's ``wordnet-base`` (WordNet 3.0, ``apt-get install wordnet-base``)
  through NLTK's ``WordNetCorpusReader`` (:func:`load_wordnet`), and refuses to score without
  either (:class:`WordNetMissingError`); F-mean = P R / (alpha P + (1 - alpha) R); penalty = gamma (chunks /
  matches)^beta; mean over reports of the best score over its references. Stems and
  synonyms are English; Chinese characters match exactly.
* ``rouge_l``: longest common subsequence F-measure with beta 1.2, as the COCO caption
  evaluation code (pycocoevalcap ``Rouge``) used by report-generation papers: P and R are
  the best over the references, F = (1 + beta^2) P R / (R + beta^2 P); mean over reports.
* findings: a :class:`FindingsVocabulary` (YAML: finding -> patterns, plus negation cues)
  marks each finding present or absent in a report; a mention counts when no negation cue
  precedes it in its clause (clauses end at ``. , ; : ! ?`` and their full-width forms, or
  at ``but``/``但``). Over all (report, finding) pairs: ``findings_accuracy`` (agreement),
  and, counting "present" as positive, micro-averaged ``findings_precision``,
  ``findings_recall``, ``findings_f1`` (summed true/false positives and negatives over
  findings) and ``findings_macro_f1`` (mean per-finding F1 over the findings present in
  some reference or generated report). A ratio with a zero denominator is 0.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from echocare.bundle import as_bool
from echocare.errors import EchoCareError
from echocare.tasks.report.tokenizer import is_cjk, split_text

__all__ = [
    "REPORT_METRIC_NAMES",
    "DEBIAN_WORDNET_DIR",
    "FindingsVocabulary",
    "MeteorSetting",
    "ReportScore",
    "WordNetMissingError",
    "corpus_bleu",
    "findings_scores",
    "load_wordnet",
    "meteor",
    "metric_tokens",
    "report_metrics",
    "require_wordnet",
    "report_scores",
    "rouge_l",
    "single_meteor",
    "single_rouge_l",
    "wordnet_available",
]

#: Names of :func:`report_scores`' results (the metric names of docs/architecture.md plus the findings details).
REPORT_METRIC_NAMES = (
    "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l",
    "findings_f1", "findings_precision", "findings_recall", "findings_accuracy", "findings_macro_f1",
)


def metric_tokens(text: str) -> list[str]:
    """Tokens the metrics compare: lower case, punctuation dropped, CJK characters one by one."""
    return split_text(text, lowercase=True, punctuation=False)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], max_order: int = 4) -> list[float]:
    """Corpus BLEU-1 .. BLEU-``max_order`` of tokenised hypotheses against their references.

    Args:
        hypotheses: one token list per report.
        references: for each report, a list of reference token lists.

    Returns:
        ``[bleu1, ..., bleu<max_order>]``, each in [0, 1].
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    matches = [0] * max_order
    totals = [0] * max_order
    hyp_length = ref_length = 0
    for hyp, refs in zip(hypotheses, references):
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        hyp_length += len(hyp)
        # Closest reference length, the shorter one on ties (as NLTK and Papineni).
        ref_length += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, max_order + 1):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in refs:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_length == 0:
        return [0.0] * max_order
    brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / hyp_length)
    scores = []
    for n in range(1, max_order + 1):
        if any(m == 0 for m in matches[:n]):
            scores.append(0.0)
            continue
        log_precision = sum(math.log(matches[k] / totals[k]) for k in range(n)) / n
        scores.append(brevity * math.exp(log_precision))
    return scores


# ----------------------------------------------------------------------------- METEOR


@lru_cache(maxsize=1)
def _porter():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


#: Where Debian's ``wordnet-base`` package installs WordNet 3.0.
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

#: WordNet 3.0's lexicographer files (lexnames(5WN): number, name, part of speech 1 noun, 2 verb,
#: 3 adjective, 4 adverb). NLTK's reader opens a ``lexnames`` file that Debian's wordnet-base
#: leaves out (its content is this fixed list, printed in the package's lexnames(5WN) page).
WORDNET_LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
    ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
    ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
    ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
    ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
    ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
)


class WordNetMissingError(EchoCareError, LookupError):
    """METEOR's WordNet stage was asked for on a machine without WordNet."""


def _debian_wordnet(debian_dir: Path):
    """NLTK's ``WordNetCorpusReader`` on Debian's wordnet-base, handed the ``lexnames`` file the
    package lacks from :data:`WORDNET_LEXNAMES`, without NLTK's map from its own WordNet (which
    is absent; the map serves multilingual data only); the folder is authorised in ``nltk.data.path``
    (NLTK reads corpora only below those folders)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    lexnames = "".join(f"{i:02d}\t{name}\t{pos}\n" for i, (name, pos) in enumerate(WORDNET_LEXNAMES))

    class DebianWordNet(WordNetCorpusReader):
        def open(self, fileid):
            if fileid == "lexnames":
                return io.StringIO(lexnames)
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None  # the map to NLTK's own WordNet 3.0 serves multilingual data only; this one is 3.0

    root = str(debian_dir.resolve())
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():  # "multilingual functions are not available": not used here
        warnings.filterwarnings("ignore", message="The multilingual functions", category=UserWarning)
        return DebianWordNet(root, None)


@lru_cache(maxsize=4)
def load_wordnet(debian_dir: str | os.PathLike[str] = DEBIAN_WORDNET_DIR):
    """The WordNet METEOR's synonym stage reads: NLTK's ``wordnet`` corpus when installed, else
    Debian's wordnet-base in ``debian_dir`` (WordNet 3.0, as NLTK's corpus) through NLTK's
    ``WordNetCorpusReader``; None when neither is there."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except (LookupError, OSError, ImportError):
        pass
    debian_dir = Path(debian_dir)
    if not (debian_dir / "data.noun").is_file():
        return None
    return _debian_wordnet(debian_dir)


def wordnet_available() -> bool:
    """True when :func:`load_wordnet` finds WordNet (``synonyms=True`` needs it)."""
    return load_wordnet() is not None


def require_wordnet():
    """The WordNet of :func:`load_wordnet`, or :class:`WordNetMissingError` saying how to get it."""
    wordnet = load_wordnet()
    if wordnet is None:
        raise WordNetMissingError(
            f"METEOR with WordNet synonyms: no WordNet on this machine (neither NLTK's wordnet corpus nor "
            f"Debian's wordnet-base in {DEBIAN_WORDNET_DIR}); apt-get install wordnet-base, or score without "
            "synonyms (the bundles' --meteor_wordnet false)"
        )
    return wordnet


@lru_cache(maxsize=20000)
def _synonyms(word: str) -> frozenset[str]:
    wordnet = require_wordnet()
    return frozenset(l.name() for s in wordnet.synsets(word) for l in s.lemmas() if "_" not in l.name()) | {word}


def _match_stage(hyp: list[tuple[int, str]], ref: list[tuple[int, str]], candidates: Callable[[str], Iterable[str]]):
    """Align leftover words: each hypothesis word, from the last, takes the latest unused
    reference position holding one of its ``candidates`` forms (NLTK's rule)."""
    positions: dict[str, list[int]] = {}
    for j, (_, word) in enumerate(ref):
        positions.setdefault(word, []).append(j)
    pairs, used_h, used_r = [], set(), set()
    for i in range(len(hyp) - 1, -1, -1):
        best = -1
        best_word = None
        for form in candidates(hyp[i][1]):
            ps = positions.get(form)
            if ps and ps[-1] > best:
                best, best_word = ps[-1], form
        if best_word is not None:
            positions[best_word].pop()
            used_h.add(i)
            used_r.add(best)
            pairs.append((hyp[i][0], ref[best][0]))
    return pairs, [p for i, p in enumerate(hyp) if i not in used_h], [p for j, p in enumerate(ref) if j not in used_r]


def single_meteor(
    hypothesis: Sequence[str],
    reference: Sequence[str],
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
    synonyms: bool = False,
) -> float:
    """METEOR of one tokenised hypothesis against one reference (see the module docstring).
    ``synonyms``: the WordNet stage (True raises :class:`WordNetMissingError` without WordNet)."""
    use_wordnet = bool(synonyms)
    if use_wordnet:
        require_wordnet()
    hyp = list(enumerate(hypothesis))
    ref = list(enumerate(reference))
    if not hyp or not ref:
        return 0.0
    stem = _porter().stem
    exact, hyp_left, ref_left = _match_stage(hyp, ref, lambda w: (w,))
    hyp_s = [(i, stem(w)) for i, w in hyp_left]
    ref_s = [(j, stem(w)) for j, w in ref_left]
    stems, hyp_s, ref_s = _match_stage(hyp_s, ref_s, lambda w: (w,))
    synonym_pairs: list = []
    if use_wordnet:
        # NLTK looks synonyms up on the stemmed leftovers; so do we, to give its scores.
        synonym_pairs, _, _ = _match_stage(hyp_s, ref_s, _synonyms)
    matches = sorted(exact + stems + synonym_pairs)
    m = len(matches)
    if m == 0:
        return 0.0
    precision, recall = m / len(hyp), m / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum(
        1 for a, b in zip(matches, matches[1:]) if not (b[0] == a[0] + 1 and b[1] == a[1] + 1)
    )
    return (1 - gamma * (chunks / m) ** beta) * fmean


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]], synonyms: bool = False) -> float:
    """Mean over reports of the best METEOR over each report's references (texts)."""
    if not hypotheses:
        return 0.0
    scores = [
        max(single_meteor(metric_tokens(h), metric_tokens(r), synonyms=synonyms) for r in refs)
        for h, refs in zip(hypotheses, references)
    ]
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- ROUGE-L


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def single_rouge_l(hypothesis: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L of one tokenised hypothesis: best precision and best recall over the references."""
    if not hypothesis or not references:
        return 0.0
    lcs = [_lcs(hypothesis, r) for r in references]
    precision = max(l / len(hypothesis) for l in lcs)
    recall = max(l / len(r) if r else 0.0 for l, r in zip(lcs, references))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L over reports (texts; each with a list of reference texts)."""
    if not hypotheses:
        return 0.0
    scores = [single_rouge_l(metric_tokens(h), [metric_tokens(r) for r in refs], beta) for h, refs in zip(hypotheses, references)]
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- findings

#: Negation cues used when a vocabulary names none (English and Chinese).
# Bare 无/未/不 are not cues: 无回声 (anechoic) is a finding, not its negation.
DEFAULT_NEGATIONS = ("no", "not", "without", "negative for", "absence of", "free of", "未见", "未探及", "未发现", "未显示", "无明显", "没有")
_CLAUSE_END = re.compile(r"[.;:!?,\n。；：！？，、]|\bbut\b|但")


def _pattern(term: str) -> re.Pattern:
    """A case-insensitive regex for ``term``: word-bounded at ends that are word characters
    of space-separated scripts, plain substring at CJK ends."""
    term = term.strip().lower()
    if not term:
        raise ValueError("empty findings pattern")
    start = r"\b" if term[0].isalnum() and not is_cjk(term[0]) else ""
    end = r"\b" if term[-1].isalnum() and not is_cjk(term[-1]) else ""
    return re.compile(start + re.escape(term) + end)


@dataclass
class FindingsVocabulary:
    """Findings to look for in reports and how negation is written.

    Attributes:
        findings: finding name -> patterns (words or phrases; any language; matched case-
            insensitively, whole words for Latin scripts, substrings for CJK).
        negations: cues that, before a mention in the same clause, make it a negative one.
    """

    findings: dict[str, list[str]]
    negations: list[str] = field(default_factory=lambda: list(DEFAULT_NEGATIONS))

    def __post_init__(self) -> None:
        if not self.findings:
            raise ValueError("a findings vocabulary needs at least one finding")
        self._patterns = {name: [_pattern(p) for p in ([pats] if isinstance(pats, str) else pats)] for name, pats in self.findings.items()}
        self._negations = [_pattern(n) for n in self.negations]

    @property
    def names(self) -> list[str]:
        return list(self.findings)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "findings vocabulary") -> "FindingsVocabulary":
        """From ``{"findings": {name: [patterns]}, "negations": [cues]}`` (negations optional)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("findings"), Mapping) or not data["findings"]:
            raise ValueError(f"{source}: expected a mapping with a non-empty 'findings' mapping (finding name -> list of patterns)")
        findings = {}
        for name, patterns in data["findings"].items():
            patterns = [patterns] if isinstance(patterns, str) else patterns
            if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
                raise ValueError(f"{source}: finding {name!r} needs a list of non-empty pattern strings, got {patterns!r}")
            findings[str(name)] = patterns
        negations = data.get("negations", list(DEFAULT_NEGATIONS))
        if not isinstance(negations, list) or not all(isinstance(n, str) and n.strip() for n in negations):
            raise ValueError(f"{source}: 'negations' must be a list of non-empty strings (quote YAML words such as \"no\", which YAML reads as false)")
        return cls(findings, negations)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "FindingsVocabulary":
        """Read a vocabulary YAML file (see :meth:`from_mapping`); errors name the file."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no findings vocabulary file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
        return cls.from_mapping(data, str(path))

    def extract(self, text: str) -> dict[str, bool]:
        """finding -> True when the report mentions it without a preceding negation in the clause."""
        text = text.lower()
        clauses = []
        start = 0
        for m in _CLAUSE_END.finditer(text):
            clauses.append(text[start : m.start()])
            start = m.end()
        clauses.append(text[start:])
        found = {name: False for name in self.findings}
        for clause in clauses:
            for name, patterns in self._patterns.items():
                if found[name]:
                    continue
                for pattern in patterns:
                    for match in pattern.finditer(clause):
                        before = clause[: match.start()]
                        if not any(n.search(before) for n in self._negations):
                            found[name] = True
                            break
                    if found[name]:
                        break
        return found


def findings_scores(generated: Sequence[str], references: Sequence[str], vocabulary: FindingsVocabulary) -> dict[str, float]:
    """``findings_accuracy``, micro ``findings_precision``/``recall``/``f1`` and
    ``findings_macro_f1`` of generated reports against references (see the module docstring)."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reports but {len(references)} references")
    per_finding = {name: [0, 0, 0, 0] for name in vocabulary.names}  # tp, fp, fn, tn
    for g, r in zip(generated, references):
        pg, pr = vocabulary.extract(g), vocabulary.extract(r)
        for name in vocabulary.names:
            index = {(True, True): 0, (True, False): 1, (False, True): 2, (False, False): 3}[(pg[name], pr[name])]
            per_finding[name][index] += 1
    tp, fp, fn, tn = (sum(c[k] for c in per_finding.values()) for k in range(4))

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    f1s = [ratio(2 * c[0], 2 * c[0] + c[1] + c[2]) for c in per_finding.values() if c[0] + c[1] + c[2] > 0]
    return {
        "findings_f1": ratio(2 * tp, 2 * tp + fp + fn),
        "findings_precision": ratio(tp, tp + fp),
        "findings_recall": ratio(tp, tp + fn),
        "findings_accuracy": ratio(tp + tn, tp + fp + fn + tn),
        "findings_macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
    }


def report_scores(
    generated: Sequence[str],
    references: Sequence[str | Sequence[str]],
    vocabulary: FindingsVocabulary | None = None,
    synonyms: bool = False,
) -> dict[str, float]:
    """Every report metric of :data:`REPORT_METRIC_NAMES` (findings ones only with a vocabulary).

    Args:
        generated: one generated report text per case.
        references: the reference report of each case (a text, or a list of texts).
        vocabulary: findings vocabulary; None leaves the findings scores out.
        synonyms: METEOR's WordNet stage (see the module docstring).
    """
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    bleu = corpus_bleu([metric_tokens(g) for g in generated], [[metric_tokens(r) for r in rs] for rs in refs])
    scores = {f"bleu{n}": b for n, b in enumerate(bleu, start=1)}
    scores["meteor"] = meteor(generated, refs, synonyms=synonyms)
    scores["rouge_l"] = rouge_l(generated, refs)
    if vocabulary is not None:
        scores.update(findings_scores(generated, [rs[0] for rs in refs], vocabulary))
    return scores


class ReportScore(Metric):
    """One report metric over an epoch, as an Ignite metric.

    Reads MONAI's decollated ``engine.state.output``: a list of per-case dicts holding the
    generated text under ``generated`` and the reference under ``report``. Texts of every
    process are gathered under DDP. ``compute()`` returns :func:`report_scores`'s ``name``;
    ``meteor_wordnet``: METEOR's WordNet stage (refused at once, naming what to install, when
    WordNet is absent).
    """

    def __init__(
        self,
        name: str,
        vocabulary: FindingsVocabulary | str | os.PathLike[str] | None = None,
        output_transform: Callable = lambda x: x,
        device: str = "cpu",
        meteor_wordnet: bool = False,
    ) -> None:
        if name not in REPORT_METRIC_NAMES:
            raise ValueError(f"unknown report metric {name!r}; valid: {', '.join(REPORT_METRIC_NAMES)}")
        if name.startswith("findings") and vocabulary is None:
            raise ValueError(f"{name} needs a findings vocabulary")
        self.meteor_wordnet = bool(meteor_wordnet)
        if self.meteor_wordnet and name == "meteor":
            require_wordnet()
        self.name = name
        self.vocabulary = FindingsVocabulary.from_yaml(vocabulary) if isinstance(vocabulary, (str, os.PathLike)) else vocabulary
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._pairs: list[tuple[str, str]] = []

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        for item in output:
            self._pairs.append((str(item["generated"]), str(item["report"])))

    def compute(self) -> float:
        pairs = self._pairs
        if idist.get_world_size() > 1:
            pairs = [p for part in idist.all_gather(pairs) for p in part]
        if not pairs:
            raise ValueError(f"{self.name}: no report was generated in this epoch")
        generated, references = zip(*pairs)
        vocabulary = self.vocabulary if self.name.startswith("findings") else None
        return float(report_scores(list(generated), list(references), vocabulary, self.meteor_wordnet)[self.name])


class MeteorSetting(Metric):
    """``meteor_wordnet`` in the metrics output: 1.0 when METEOR used WordNet synonyms, 0.0 when
    exact and stem matches only, so every reported METEOR says which of the two it is."""

    def __init__(self, meteor_wordnet: bool, output_transform: Callable = lambda x: x, device: str = "cpu") -> None:
        self.value = 1.0 if meteor_wordnet else 0.0
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        return None

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        return None

    def compute(self) -> float:
        return self.value


def report_metrics(
    key_metric: bool,
    key: str = "bleu4",
    vocabulary: FindingsVocabulary | str | os.PathLike[str] | None = None,
    meteor_wordnet: bool = False,
) -> dict[str, Metric]:
    """The report bundle's metric set: ``{key: ...}`` (the key metric, which picks the best
    checkpoint) or every other metric of :data:`REPORT_METRIC_NAMES` (the findings ones only
    when a vocabulary is given) plus ``meteor_wordnet`` (:class:`MeteorSetting`: which METEOR
    this is). ``meteor_wordnet``: METEOR's WordNet stage (the bundle's ``meteor_wordnet`` id,
    default false)."""
    meteor_wordnet = as_bool(meteor_wordnet)
    if isinstance(vocabulary, (str, os.PathLike)):
        vocabulary = FindingsVocabulary.from_yaml(vocabulary) if str(vocabulary) else None
    names = [n for n in REPORT_METRIC_NAMES if vocabulary is not None or not n.startswith("findings")]
    if key not in names:
        raise ValueError(f"key metric {key!r} is not available; choose one of {names}")
    chosen = [key] if key_metric else [n for n in names if n != key]
    metrics: dict[str, Metric] = {n: ReportScore(n, vocabulary, meteor_wordnet=meteor_wordnet) for n in chosen}
    if not key_metric:
        metrics["meteor_wordnet"] = MeteorSetting(meteor_wordnet)
    return metrics
