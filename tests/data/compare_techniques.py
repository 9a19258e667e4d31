"""Compare intent-routing techniques on the labelled set; prints the tables quoted in docs/intents.md.

    .venv/bin/python -m tests.data.compare_techniques

Model choices (technique, features, smoothing, the unsure thresholds) are made on 5-fold
cross-validation of the training part only; the held-apart part (tests/data/intents_heldout.tsv) is
scored once per technique and never trained on.
"""
from __future__ import annotations

import math
import random
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from recovery import router
from recovery.router import INTENTS, NaiveBayes, features, load, normalize

HERE = Path(__file__).parent
HELDOUT = HERE / "intents_heldout.tsv"

# The regexes the dialog used before the router existed (recovery/dialog.py at 4155393), mapped to the
# new intent names; whatever they missed got the menu, i.e. "something else".
OLD_REGEXES = (
    ("lang_en", re.compile(r"^\s*(english|英文)\s*$", re.I)),
    ("lang_zh", re.compile(r"^\s*(中文|繁體中文|chinese)\s*$", re.I)),
    ("cancel", re.compile(r"\bcancel\b|取消", re.I)),
    ("case_status", re.compile(r"\bstatus\b|progress|進度|狀態|进度", re.I)),
    ("start_recovery", re.compile(r"lost|lose|stolen|broke|recover|reset|can'?t (access|log)|cannot (access|log)|"
                                  r"no longer have|new phone|遺失|丟|不見|找回|重設|重置|換手機|恢復", re.I)),
    ("what_is_2fa", re.compile(r"what.*(2fa|two.?factor|authenticator)|什麼是|何謂|兩步驟|雙重驗證", re.I)),
)


class Regexes:
    def __init__(self, rows):
        pass

    def predict(self, text: str) -> str:
        return next((name for name, p in OLD_REGEXES if p.search(text)), "something_else")


class Keywords:
    """Hand-picked keywords per intent, the best hit count wins (ties: the earlier intent)."""
    WORDS = {
        "what_is_2fa": "what is|什麼是|是什麼|meaning|mean|define|explain",
        "why_2fa": "why|為什麼|為何|necessary|protect|必要|保護|worth",
        "enable_2fa": "enable|turn on|set up|setup|activate|開啟|啟用|設定|綁定|recommend|推薦|scan",
        "code_rejected": "wrong|invalid|incorrect|not work|doesn't work|rejected|錯誤|無效|不對|失效|failed",
        "new_phone": "new phone|new iphone|換手機|新手機|transfer|migrate|move|轉移|switching",
        "lost_access": "what if|what happens|如果|萬一|how long|多久|process|流程",
        "start_recovery": "lost|stolen|gone|reset|recover|遺失|不見|被偷|重設|重置|找回|掉了",
        "safety": "scam|詐騙|phishing|seed|助記詞|share|pretending|自稱|冒充|asked for|跟我要",
        "cancel": "cancel|取消|stop|abort",
        "talk_to_person": "human|person|agent|真人|人工|客服|representative",
        "case_status": "status|progress|進度|狀態|update|news|審核",
        "lang_en": "english|英文|英語",
        "lang_zh": "chinese|中文|mandarin",
        "greeting": "hi|hello|hey|thanks|thank|你好|您好|謝謝|哈囉|嗨",
    }

    def __init__(self, rows):
        self.patterns = {i: re.compile(w) for i, w in self.WORDS.items()}

    def predict(self, text: str) -> str:
        norm = normalize(text)
        hits = {i: len(p.findall(norm)) for i, p in self.patterns.items()}
        best = max(hits, key=lambda i: hits[i])
        return best if hits[best] else "something_else"


class NearestNeighbour:
    """TF-IDF over the router's features, cosine similarity, the single nearest training utterance."""

    def __init__(self, rows):
        docs = [(features(t), i) for t, i, _ in rows]
        df = Counter(f for d, _ in docs for f in d)
        self.idf = {f: math.log(len(docs) / n) + 1 for f, n in df.items()}
        self.docs = [(self._vec(d), i) for d, i in docs]

    def _vec(self, feats):
        v = {f: n * self.idf.get(f, 0.0) for f, n in feats.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {f: x / norm for f, x in v.items()}

    def predict(self, text: str) -> str:
        q = self._vec(features(text))
        best = max(self.docs, key=lambda d: sum(x * d[0].get(f, 0.0) for f, x in q.items()))
        return best[1]


class Logistic:
    """Softmax regression on the router's features, plain SGD with a seeded shuffle (deterministic)."""

    def __init__(self, rows, epochs: int = 30, rate: float = 0.5, l2: float = 1e-4):
        self.w: dict[str, defaultdict] = {i: defaultdict(float) for i in INTENTS}
        data = [(features(t), i) for t, i, _ in rows]
        rng = random.Random(7)
        for _ in range(epochs):
            rng.shuffle(data)
            for feats, gold in data:
                probs = self._probs(feats)
                for intent in INTENTS:
                    grad = probs[intent] - (1.0 if intent == gold else 0.0)
                    w = self.w[intent]
                    for f, n in feats.items():
                        w[f] -= rate * (grad * n + l2 * w[f])

    def _probs(self, feats):
        s = {i: sum(self.w[i].get(f, 0.0) * n for f, n in feats.items()) for i in INTENTS}
        top = max(s.values())
        e = {i: math.exp(v - top) for i, v in s.items()}
        z = sum(e.values())
        return {i: v / z for i, v in e.items()}

    def predict(self, text: str) -> str:
        probs = self._probs(features(text))
        return max(probs, key=lambda i: probs[i])


class Bayes:
    def __init__(self, rows, alpha: float = router.ALPHA):
        self.nb = NaiveBayes(rows, alpha=alpha)

    def predict(self, text: str) -> str:
        return self.nb.route(text).intent


TECHNIQUES = {
    "regexes (the old dialog's)": Regexes,
    "keyword scorer (hand-picked)": Keywords,
    "char n-gram nearest neighbour (TF-IDF cosine)": NearestNeighbour,
    "logistic regression (SGD, char n-grams)": Logistic,
    "naive Bayes (char n-grams) - chosen": Bayes,
}


def folds(rows, k: int = 5):
    """Deterministic stratified folds: every k-th utterance of each intent."""
    by_intent = defaultdict(list)
    for row in rows:
        by_intent[row[1]].append(row)
    parts = [[] for _ in range(k)]
    for items in by_intent.values():
        for n, row in enumerate(items):
            parts[n % k].append(row)
    return parts


def accuracy(model, rows) -> float:
    return sum(model.predict(t) == i for t, i, _ in rows) / len(rows)


def cv_splits(rows, k: int = 5):
    parts = folds(rows, k)
    for n in range(k):
        yield [r for m, p in enumerate(parts) if m != n for r in p], parts[n]


def cross_validate(make, rows, k: int = 5) -> float:
    return sum(accuracy(make(train), test) for train, test in cv_splits(rows, k)) / k


def per_intent(model, rows) -> dict[str, tuple[int, int]]:
    out = {i: [0, 0] for i in INTENTS}
    for t, i, _ in rows:
        out[i][1] += 1
        out[i][0] += model.predict(t) == i
    return {i: tuple(v) for i, v in out.items()}


def main() -> None:
    train, heldout = load(router.DATA), load(HELDOUT)
    print(f"{len(train)} training utterances, {len(heldout)} held apart\n")
    print("| technique | 5-fold CV (train) | held-apart | train time | per message |")
    print("|---|---|---|---|---|")
    for name, make in TECHNIQUES.items():
        cv = cross_validate(make, train)
        start = time.perf_counter()
        model = make(train)
        built = time.perf_counter() - start
        start = time.perf_counter()
        acc = accuracy(model, heldout)
        each = (time.perf_counter() - start) / len(heldout)
        print(f"| {name} | {cv:.1%} | {acc:.1%} | {built * 1000:.0f} ms | {each * 1000:.2f} ms |")

    print("\nNaive Bayes smoothing (5-fold CV on train):",
          ", ".join(f"alpha={a}: {cross_validate(lambda r, a=a: Bayes(r, a), train):.1%}"
                    for a in (0.05, 0.1, 0.3, 0.5, 1.0)))

    print("\n| unsure below margin | asked (CV) | accuracy when sure (CV) | wrong and sure (CV) |")
    print("|---|---|---|---|")
    cv_routed = [(NaiveBayes(rest).route(t), i) for rest, part in cv_splits(train) for t, i, _ in part]
    for margin in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
        def asked(r):
            return r.intent == "something_else" and r.confidence == 0 or (
                len(r.ranked) > 1 and r.ranked[0][1] - r.ranked[1][1] < margin)
        sure = [(r, i) for r, i in cv_routed if not asked(r)]
        print(f"| {margin} | {1 - len(sure) / len(cv_routed):.0%} | "
              f"{sum(r.intent == i for r, i in sure) / len(sure):.1%} | "
              f"{sum(r.intent != i for r, i in sure) / len(cv_routed):.1%} |")

    chosen = Bayes(train)
    print("\n| intent | held-apart correct | accuracy |\n|---|---|---|")
    for intent, (ok, n) in per_intent(chosen, heldout).items():
        print(f"| {intent} | {ok}/{n} | {ok / n:.0%} |")
    by_lang = defaultdict(lambda: [0, 0])
    for t, i, lang in heldout:
        by_lang[lang][1] += 1
        by_lang[lang][0] += chosen.predict(t) == i
    print("\n| language | held-apart correct | accuracy |\n|---|---|---|")
    for lang, (ok, n) in sorted(by_lang.items()):
        print(f"| {lang} | {ok}/{n} | {ok / n:.0%} |")

    routed = [(router.route(t), i, t) for t, i, _ in heldout]
    unsure = [(r, i) for r, i, _ in routed if r.unsure]
    sure = [(r, i) for r, i, _ in routed if not r.unsure]
    print(f"\nunsure (clarifying question instead of an answer): {len(unsure)}/{len(routed)}; "
          f"accuracy when sure: {sum(r.intent == i for r, i in sure) / len(sure):.1%}; "
          f"wrong and sure: {sum(r.intent != i for r, i in sure)}; "
          f"right intent among the offered buttons when unsure: "
          f"{sum(i in r.candidates for r, i in unsure)}/{len(unsure)}")
    print("\nheld-apart misses:")
    for r, i, t in routed:
        if r.intent != i:
            print(f"  {t!r}: want {i}, got {r.intent} ({r.confidence:.2f}{', unsure' if r.unsure else ''})")


if __name__ == "__main__":
    main()
