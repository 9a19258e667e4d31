"""Compare intent-routing techniques and measure the chosen router; prints the tables in docs/intents.md.

    .venv/bin/python -m tests.data.compare_techniques            # development: set A and the old set
    .venv/bin/python -m tests.data.compare_techniques --final    # also the final test set, B

Model choices (technique, features, smoothing, the unsure margin) are made on 5-fold cross-validation of
the training part only, and on set A (intents_eval_a.tsv, the development set: its misses are printed so
they can be studied; its rows are never copied into the training data). Set B (intents_eval_b.tsv) is the
final test: it is scored only with --final, and only in aggregate (per intent, per language and the
confusion table); its rows are never printed. The old held-apart set (intents_heldout.tsv, 15 of the 17
intents) is a third measurement.

"As the dialog sees it" means what recovery/dialog.py does with a message outside a flow: an unmistakable
command (`router.command`) first, otherwise the router's intent. "Exact" gives no credit for a clarifying
question; "with clarify" counts one that offered the right intent among its buttons.
"""
from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from recovery import router
from recovery.router import INTENTS, NaiveBayes, features, load, normalize, text_features

HERE = Path(__file__).parent
SET_A = HERE / "intents_eval_a.tsv"
SET_B = HERE / "intents_eval_b.tsv"
OLD = HERE / "intents_heldout.tsv"

# The regexes the dialog used before the router existed (recovery/dialog.py at 4155393), mapped to the
# intent names; whatever they missed got the menu, i.e. "something else".
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
        "why_2fa": "why|為什麼|為何|necessary|protect|必要|保護|worth|turn off|disable|關掉",
        "enable_2fa": "enable|turn on|set up|setup|activate|開啟|啟用|設定|綁定|recommend|推薦|scan",
        "code_rejected": "wrong|invalid|incorrect|not work|doesn't work|rejected|錯誤|無效|不對|失效|failed",
        "new_phone": "new phone|new iphone|換手機|新手機|transfer|migrate|move|轉移|switching",
        "lost_access": "what if|what happens|如果|萬一|how long|多久|process|流程",
        "start_recovery": "lost|stolen|gone|reset|recover|遺失|不見|被偷|重設|重置|找回|掉了",
        "safety": "scam|詐騙|phishing|seed|助記詞|share|pretending|自稱|冒充|asked for|跟我要",
        "cancel": "cancel|取消|stop|abort|found|找到",
        "dispute": "not me|wasn't me|didn't request|never asked|不是我|沒有申請|someone|有人",
        "talk_to_person": "human|person|agent|真人|人工|客服|representative",
        "case_status": "status|progress|進度|狀態|update|news|審核|waiting|還在等",
        "lang_en": "english|英文|英語",
        "lang_zh": "chinese|中文|mandarin",
        "greeting": "hi|hello|hey|你好|您好|哈囉|嗨",
        "thanks": "thanks|thank|bye|謝謝|感謝|掰掰|再見",
    }

    def __init__(self, rows):
        self.patterns = {i: re.compile(w) for i, w in self.WORDS.items()}

    def predict(self, text: str) -> str:
        norm = normalize(text)
        hits = {i: len(p.findall(norm)) for i, p in self.patterns.items()}
        best = max(hits, key=lambda i: hits[i])
        return best if hits[best] else "something_else"


def plain_features(text: str) -> Counter:
    """The router's features before the concepts were added (issue 8): words, word pairs, character
    3-4-grams of every Latin word, Chinese characters and character pairs."""
    return text_features(normalize(text), plain=frozenset())


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


class Perceptron:
    """Averaged multiclass perceptron on the router's features (log counts, unit length), seeded shuffle."""

    def __init__(self, rows, epochs: int = 8):
        data = [(self._vec(features(t)), INTENTS.index(i)) for t, i, _ in rows]
        k = len(INTENTS)
        w: dict[str, list[float]] = defaultdict(lambda: [0.0] * k)
        u: dict[str, list[float]] = defaultdict(lambda: [0.0] * k)
        rng, step = random.Random(7), 1
        for _ in range(epochs):
            rng.shuffle(data)
            for x, gold in data:
                guess = self._best(w, x)
                if guess != gold:
                    for f, v in x:
                        w[f][gold] += v
                        w[f][guess] -= v
                        u[f][gold] += step * v
                        u[f][guess] -= step * v
                step += 1
        self.w = {f: [a - b / step for a, b in zip(w[f], u[f])] for f in w}

    @staticmethod
    def _vec(feats):
        v = [(f, 1 + math.log(n)) for f, n in feats.items()]
        norm = math.sqrt(sum(x * x for _, x in v)) or 1.0
        return [(f, x / norm) for f, x in v]

    @staticmethod
    def _best(w, x) -> int:
        total = [0.0] * len(INTENTS)
        for f, v in x:
            if f in w:
                total = [a + v * b for a, b in zip(total, w[f])]
        return max(range(len(total)), key=total.__getitem__)

    def predict(self, text: str) -> str:
        return INTENTS[self._best(self.w, self._vec(features(text)))]


class Bayes:
    def __init__(self, rows, alpha: float = router.ALPHA, featurize=None):
        self.nb = NaiveBayes(rows, alpha=alpha, featurize=featurize)

    def predict(self, text: str) -> str:
        return self.nb.route(text).intent


def plain_bayes(rows):
    return Bayes(rows, featurize=plain_features)


TECHNIQUES = {
    "regexes (the old dialog's)": Regexes,
    "keyword scorer (hand-picked)": Keywords,
    "nearest neighbour (TF-IDF cosine, router's features)": NearestNeighbour,
    "averaged perceptron (router's features)": Perceptron,
    "naive Bayes, previous features (no concepts)": plain_bayes,
    "naive Bayes, words + n-grams + concepts - chosen": Bayes,
}


def scikit_learn_techniques() -> dict:
    """Linear models from scikit-learn over the router's features, when it is installed (it is not a
    dependency: `pip install scikit-learn` into the venv to include these rows)."""
    try:
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC
    except ImportError:
        return {}

    def linear(make):
        class Linear:
            def __init__(self, rows):
                self.dv, self.tf = DictVectorizer(), TfidfTransformer(sublinear_tf=True)
                x = self.tf.fit_transform(self.dv.fit_transform([features(t) for t, _, _ in rows]))
                self.model = make().fit(x, [i for _, i, _ in rows])

            def predict(self, text: str) -> str:
                return self.model.predict(self.tf.transform(self.dv.transform([features(text)])))[0]
        return Linear

    return {"scikit-learn logistic regression (tf-idf, C=10)":
            linear(lambda: LogisticRegression(C=10, max_iter=3000)),
            "scikit-learn linear SVM (tf-idf, C=1)": linear(lambda: LinearSVC(C=1.0))}


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


def cv_splits(rows, k: int = 5):
    parts = folds(rows, k)
    for n in range(k):
        yield [r for m, p in enumerate(parts) if m != n for r in p], parts[n]


def accuracy(model, rows) -> float:
    return sum(model.predict(t) == i for t, i, _ in rows) / len(rows)


def cross_validate(make, rows, k: int = 5) -> float:
    return sum(accuracy(make(train), test) for train, test in cv_splits(rows, k)) / k


# ---- the chosen router, as the dialog sees it ---------------------------------------------------------

def understood(model: NaiveBayes, text: str, confidence: float = router.MIN_CONFIDENCE,
               margin: float = router.MIN_MARGIN):
    """(intent, unsure, candidates) the dialog acts on outside a flow: a command first, else the router
    (with the given thresholds for being unsure)."""
    command = router.command(text)
    if command is not None:
        return command, False, (command,)
    r = model.route(text)
    gap = r.ranked[0][1] - (r.ranked[1][1] if len(r.ranked) > 1 else 0.0)
    unsure = r.confidence == 0.0 or r.confidence < confidence or gap < margin
    return r.intent, unsure, r.candidates


def score(results) -> dict:
    """results: (gold, intent, unsure, candidates) -> exact, with clarify, top guess, asked, wrong-and-sure."""
    n = len(results)
    exact = sum(not u and i == g for g, i, u, _ in results)
    clarified = sum(u and g in c for g, i, u, c in results)
    return {"n": n, "exact": exact / n, "with_clarify": (exact + clarified) / n,
            "top": sum(i == g for g, i, _, _ in results) / n, "asked": sum(u for _, _, u, _ in results) / n,
            "wrong_sure": sum(not u and i != g for g, i, u, _ in results) / n}


def evaluate(model: NaiveBayes, rows):
    return [(g, *understood(model, t), t, lang) for t, g, lang in rows]


def print_measurement(name: str, results, trained: set[str], *, confusion: bool, misses: bool) -> None:
    s = score([r[:4] for r in results])
    print(f"\n### {name}: {s['n']} messages\n")
    print(f"exact {s['exact']:.1%}; with clarify {s['with_clarify']:.1%}; router's top guess {s['top']:.1%}; "
          f"asked {s['asked']:.1%}; wrong and sure {s['wrong_sure']:.1%}")
    unseen = score([r[:4] for r in results if normalize(r[4]) not in trained])
    print(f"the {unseen['n']} not found verbatim in the training data: exact {unseen['exact']:.1%}; "
          f"with clarify {unseen['with_clarify']:.1%}\n")
    print("| intent | exact | with clarify |\n|---|---|---|")
    for intent in INTENTS:
        rows = [r[:4] for r in results if r[0] == intent]
        if rows:
            t = score(rows)
            right = round(t["exact"] * t["n"])
            print(f"| {intent} | {right}/{t['n']} ({t['exact']:.0%}) | {t['with_clarify']:.0%} |")
    print("\n| language | exact | with clarify |\n|---|---|---|")
    for lang in sorted({r[5] for r in results}):
        t = score([r[:4] for r in results if r[5] == lang])
        print(f"| {lang} | {round(t['exact'] * t['n'])}/{t['n']} ({t['exact']:.0%}) | {t['with_clarify']:.0%} |")
    if confusion:
        present = [i for i in INTENTS if any(r[0] == i for r in results)]
        cols = present + ["(asked)"]
        counts = Counter((r[0], "(asked)" if r[2] else r[1]) for r in results)
        short = {i: i.replace("_", " ") for i in cols}
        print("\nConfusion (rows: labelled intent; columns: what the bot did; blank = 0)\n")
        print("| labelled \\ answered | " + " | ".join(short[c] for c in cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for g in present:
            print(f"| {g} | " + " | ".join(str(counts[(g, c)] or "") for c in cols) + " |")
    if misses:
        print("\nmisses (exact):")
        for g, i, u, c, t, _ in results:
            if u or i != g:
                print(f"  {t!r}: want {g}, got {i}" + (f" (asked: {', '.join(c)})" if u else ""))


def timed(fn, repeat: int) -> float:
    """Median wall time of `repeat` calls, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(train, messages) -> None:
    """Training (first use: reading intents.tsv included) and per-message time of the chosen router against
    two baselines measured in this run: the same naive Bayes on the previous features, and normalisation
    alone (the floor for any technique)."""
    texts = [t for t, _, _ in messages]
    chosen, plain = NaiveBayes(train), NaiveBayes(train, featurize=plain_features)
    rows = [
        ("normalise only (baseline)", None, lambda: [normalize(t) for t in texts]),
        ("naive Bayes, previous features (baseline)",
         lambda: NaiveBayes(load(router.DATA), featurize=plain_features), lambda: [plain.route(t) for t in texts]),
        ("naive Bayes + concepts (chosen)", lambda: NaiveBayes(load(router.DATA)),
         lambda: [chosen.route(t) for t in texts]),
        ("command() then route(), as the dialog does", None,
         lambda: [router.command(t) or chosen.route(t) for t in texts]),
    ]
    measured = [(name, timed(build, 7) if build else None, timed(route, 5) / len(texts))
                for name, build, route in rows]
    base_train, base_msg = measured[1][1], measured[1][2]
    print("\n| step | train | per message | vs previous features |\n|---|---|---|---|")
    for name, trained, each in measured:
        ratio = (f"train x{trained / base_train:.2f}, " if trained else "") + f"message x{each / base_msg:.2f}"
        print(f"| {name} | {f'{trained * 1000:.0f} ms' if trained else '-'} | {each * 1000:.3f} ms | {ratio} |")
    worst = max(timed(lambda t=t: router.command(t) or chosen.route(t), 3) for t in texts)
    print(f"\nslowest single message: {worst * 1000:.2f} ms ({len(texts)} messages, median of 3 each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--final", action="store_true", help="also score the final test set B (aggregates only)")
    parser.add_argument("--quick", action="store_true", help="skip the slow techniques and the speed table")
    args = parser.parse_args()
    train, set_a, old = load(router.DATA), load(SET_A), load(OLD)
    print(f"{len(train)} training utterances; set A {len(set_a)}; old held-apart set {len(old)}"
          + (f"; set B {len(load(SET_B))}" if args.final else ""))

    techniques = dict(TECHNIQUES) | scikit_learn_techniques()
    if args.quick:
        techniques = {k: v for k, v in techniques.items() if "perceptron" not in k and "scikit" not in k}
    set_b = load(SET_B) if args.final else None
    print("\nRouter's top guess (no commands, no clarifying), per technique:\n")
    print("| technique | 5-fold CV (train) | set A | old set |" + (" set B |" if set_b else "")
          + " train time | per message |")
    print("|---|---|---|---|" + ("---|" if set_b else "") + "---|---|")
    for name, make in techniques.items():
        cv = cross_validate(make, train)
        start = time.perf_counter()
        model = make(train)
        built = time.perf_counter() - start
        start = time.perf_counter()
        acc_a = accuracy(model, set_a)
        each = (time.perf_counter() - start) / len(set_a)
        acc_b = f" {accuracy(model, set_b):.1%} |" if set_b else ""
        print(f"| {name} | {cv:.1%} | {acc_a:.1%} | {accuracy(model, old):.1%} |{acc_b} {built * 1000:.0f} ms | "
              f"{each * 1000:.2f} ms |", flush=True)

    print("\nNaive Bayes smoothing (5-fold CV on train):",
          ", ".join(f"alpha={a}: {cross_validate(lambda r, a=a: Bayes(r, a), train):.1%}"
                    for a in (0.03, 0.1, 0.3, 1.0)))

    print("\nWhen to be unsure, 5-fold CV on train, as the dialog sees it (cost: a wrong answer 2, a question 1):\n")
    print("| unsure below confidence | or below margin | asked | exact | with clarify | wrong and sure "
          "| cost per 100 |")
    print("|---|---|---|---|---|---|---|")
    cv_routed = [(t, g, lang, m) for rest, part in cv_splits(train) for m in [NaiveBayes(rest)]
                 for t, g, lang in part]
    best = None
    for confidence in (0.0, 0.4, 0.5, 0.6, 0.7):
        for margin in (0.0, 0.1, 0.2, 0.3, 0.5):
            s = score([(g, *understood(m, t, confidence, margin)) for t, g, _, m in cv_routed])
            cost = 100 * (2 * s["wrong_sure"] + s["asked"])
            best = min(best or (cost, confidence, margin), (cost, confidence, margin))
            chosen = (confidence, margin) == (router.MIN_CONFIDENCE, router.MIN_MARGIN)
            print(f"| {confidence} | {margin}{' (chosen)' if chosen else ''} | {s['asked']:.1%} | {s['exact']:.1%} | "
                  f"{s['with_clarify']:.1%} | {s['wrong_sure']:.1%} | {cost:.1f} |")
    print(f"\nlowest cost at confidence {best[1]}, margin {best[2]} ({best[0]:.1f}); "
          f"router: MIN_CONFIDENCE = {router.MIN_CONFIDENCE}, MIN_MARGIN = {router.MIN_MARGIN}")

    model, trained = NaiveBayes(train), {normalize(t) for t, _, _ in train}
    print_measurement("Set A (development)", evaluate(model, set_a), trained, confusion=False, misses=True)
    print_measurement("Old held-apart set", evaluate(model, old), trained, confusion=False, misses=True)
    if args.final:
        print_measurement("Set B (final test)", evaluate(model, set_b), trained, confusion=True, misses=False)
    if not args.quick:
        speed(train, set_a)


if __name__ == "__main__":
    main()
