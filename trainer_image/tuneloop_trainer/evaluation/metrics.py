"""Metrics over predictions: classification (scikit-learn), generation (ROUGE, BLEU,
METEOR) and perplexity. Each library is imported only when its metric is computed."""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from tuneloop_trainer.evaluation.numbers import TOLERANCE, check_lengths

log = logging.getLogger(__name__)

#: :func:`perplexity` never returns more than this. A perplexity above the vocabulary size
#: (at most a few hundred thousand) is already worse than guessing uniformly, so nothing is
#: lost by the cap, while ``inf`` would not survive JSON and ``math.exp`` overflows past a
#: mean NLL of about 709.
MAX_PERPLEXITY: Final = 1e9
#: Names reported by each generation family (``meteor`` is ours; the API has no METEOR yet).
GENERATION_OUTPUTS: Final[dict[str, tuple[str, ...]]] = {
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "meteor": ("meteor",),
}


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and macro-averaged precision, recall and F1, per-class scores and the
    confusion matrix, computed by scikit-learn's ``sklearn.metrics``.

    Macro, not micro: fine-tuning data is often imbalanced, and a micro average (which for
    single-label classification equals accuracy) lets a model that ignores a rare class
    look good. Each class counts once, whatever its size.

    The macro average runs over the classes present in ``labels`` or ``predictions``
    (scikit-learn's default): a class that occurs in neither has precision and recall 0/0
    and says nothing about this model on this split. 0/0 elsewhere (a class never
    predicted, so no precision) counts as 0, scikit-learn's ``zero_division=0``. Macro F1
    is the mean of per-class F1 scores, not the harmonic mean of macro precision and recall.

    ``per_class`` and the ``confusion_matrix`` (rows: true class, columns: predicted class)
    cover every class id from 0 to the largest of ``len(label_names)`` and the largest id
    seen, so that a class missing from the split shows up with support 0. Ids without a name
    are named by their number; ``confusion_labels`` gives the row and column names.
    """
    from sklearn.metrics import (  # type: ignore[import-untyped]  # noqa: PLC0415
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    check_lengths("classification", predictions, labels)
    pred = np.asarray(predictions, dtype=np.int64)
    true = np.asarray(labels, dtype=np.int64)
    if (pred < 0).any() or (true < 0).any():
        raise ValueError("class ids must be non-negative integers")
    n = max(len(label_names), int(max(pred.max(), true.max())) + 1)
    names = [label_names[i] if i < len(label_names) else str(i) for i in range(n)]
    every = list(range(n))

    # Per class over every id (absent ones get 0 and support 0); the macro average over the
    # ids present in either list (scikit-learn's own default, passed explicitly).
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=every, average=None, zero_division=0
    )
    present = np.union1d(true, pred).tolist()
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        true, pred, labels=present, average="macro", zero_division=0
    )
    with warnings.catch_warnings():  # a 1x1 matrix is right when the split has one class
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        matrix = confusion_matrix(true, pred, labels=every)

    return {
        "accuracy": float(accuracy_score(true, pred)),
        "f1": float(macro_f1),
        "precision": float(macro_p),
        "recall": float(macro_r),
        "per_class": {
            names[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(n)
        },
        "confusion_matrix": matrix.tolist(),
        "confusion_labels": names,
    }


# --- generation -------------------------------------------------------------------------


@functools.cache
def meteor_available() -> tuple[bool, str]:
    """Whether METEOR can be computed here, and why not.

    METEOR matches synonyms through WordNet, which NLTK does not ship: it is a separate
    download (``nltk.download("wordnet")``), and trainer pods usually have no network. So
    METEOR is computed only when the data is already on disk; nothing is ever downloaded.
    """
    try:
        import nltk  # type: ignore[import-untyped]  # noqa: PLC0415
        from nltk.corpus import wordnet  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError as exc:
        return False, f"nltk is not installed ({exc})"
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            return False, (
                "NLTK's WordNet data is not installed (run nltk.download('wordnet') where there is a network, "
                "or set NLTK_DATA to a directory that holds corpora/wordnet)"
            )
    try:
        wordnet.ensure_loaded()
    except Exception as exc:  # a corrupt or partial download
        return False, f"NLTK's WordNet data could not be loaded: {exc}"
    return True, "nltk and WordNet are installed"


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]  # noqa: PLC0415

    return rouge_scorer.RougeScorer(list(GENERATION_OUTPUTS["rouge"]), use_stemmer=True)


def _rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import tokenizers  # noqa: PLC0415

    scorer = _rouge_scorer()
    totals = dict.fromkeys(GENERATION_OUTPUTS["rouge"], 0.0)
    plain = tokenizers.DefaultTokenizer(use_stemmer=False)
    untokenizable = 0
    for pred, ref in zip(predictions, references, strict=True):
        if ref.strip() and not plain.tokenize(ref):
            untokenizable += 1
        for name, score in scorer.score(ref, pred).items():  # (target, prediction): reference first
            totals[name] += float(score.fmeasure)
    if untokenizable:
        log.warning(
            "ROUGE: %d of %d references have no [a-z0-9] tokens (non-Latin script?); rouge_score's tokenizer "
            "drops such text, so their ROUGE is 0 whatever the prediction",
            untokenizable,
            len(references),
        )
    return {name: total / len(predictions) for name, total in totals.items()}


def _bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from sacrebleu.metrics.bleu import BLEU  # noqa: PLC0415

    # Newlines would be taken as sentence breaks by some tokenizers; one example is one segment.
    preds = [" ".join(p.split("\n")) for p in predictions]
    refs = [" ".join(r.split("\n")) for r in references]
    return {"bleu": float(BLEU().corpus_score(preds, [refs]).score)}


def _meteor(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from nltk.translate.meteor_score import meteor_score  # type: ignore[import-untyped]  # noqa: PLC0415

    # Whitespace tokens: NLTK's word_tokenize needs the punkt data, which is as unlikely to be
    # installed as WordNet. METEOR's own preprocessing lower-cases.
    scores = [meteor_score([ref.split()], pred.split()) for pred, ref in zip(predictions, references, strict=True)]
    return {"meteor": float(sum(scores) / len(scores))}


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], families: Sequence[str]
) -> dict[str, float]:
    """Metrics of generated text against one reference per example.

    * ``rouge`` → ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``: F-measures in [0, 1]
      from ``rouge_score`` with Porter stemming, averaged over examples. ``rougeLsum`` is
      the summary-level LCS over sentences split at newlines (the convention of the
      summarization literature), so keep newlines between sentences. Its tokenizer keeps
      only ``[a-z0-9]``: text in non-Latin scripts scores 0 (a warning is logged).
    * ``bleu`` → ``bleu``: sacreBLEU's corpus BLEU with its default ``13a`` tokenizer, on
      sacreBLEU's **0-100 scale** (not 0-1 like ROUGE), so the number matches published
      sacreBLEU scores and gates are written as e.g. ``min: 25``. It is a corpus statistic,
      not a mean over examples, and is 0 when no output has four tokens.
    * ``meteor`` → ``meteor`` in [0, 1], mean over examples; only when
      :func:`meteor_available` says so. Otherwise it is left out (with a warning) rather
      than failing a run over an optional metric.
    """
    unknown = [f for f in families if f not in GENERATION_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown generation metric families {unknown}; known: {', '.join(GENERATION_OUTPUTS)}")
    if not families:
        return {}
    check_lengths("generation", predictions, references)
    metrics: dict[str, float] = {}
    for family in dict.fromkeys(families):
        if family == "rouge":
            metrics.update(_rouge(predictions, references))
        elif family == "bleu":
            metrics.update(_bleu(predictions, references))
        else:
            ok, why = meteor_available()
            if ok:
                metrics.update(_meteor(predictions, references))
            else:
                log.warning("METEOR is not computed: %s", why)
    return metrics


# --- perplexity -------------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int) -> float:
    """``exp`` of the mean negative log-likelihood per token (in nats).

    Summed NLL and token counts are passed, not a mean of per-batch means: batches hold
    different numbers of tokens, and only the token-weighted mean is the perplexity of the
    data. The result is capped at :data:`MAX_PERPLEXITY` (a diverged model stays a finite,
    JSON-safe, gate-failing number); a NaN loss gives NaN, which fails every gate.
    """
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got {total_tokens}")
    if math.isnan(total_nll):
        return math.nan
    if total_nll < -TOLERANCE * max(1, total_tokens):
        raise ValueError(f"a negative log-likelihood cannot be negative, got {total_nll}")
    mean = max(0.0, total_nll / total_tokens)
    if mean >= math.log(MAX_PERPLEXITY):
        return MAX_PERPLEXITY
    return math.exp(mean)
