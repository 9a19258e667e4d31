"""Free text to an intent: what a customer means, in English or Chinese, typos and mixed languages included.

Technique, chosen on measured accuracy (docs/intents.md has the numbers and the alternatives):
multinomial naive Bayes over words, word pairs, character 3-4-grams of Latin words and characters and
character pairs of Chinese runs, with simplified characters folded to traditional first, so one model
serves both scripts. It trains on first use from `recovery/data/intents.tsv` in a few milliseconds: no
network, no model files, the same answer for the same text every time. A text seen verbatim in that data
(a button label) is routed exactly. When the best two intents are close the result is `unsure`, and the
dialog asks rather than guesses.

`command()` is deliberately separate: mid-flow (an email, a code or an answer is expected) only an
unmistakable command may interrupt, so an answer such as "approve my case" is never mistaken for one.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).with_name("data") / "intents.tsv"

TOPICS = ("what_is_2fa", "why_2fa", "enable_2fa", "code_rejected", "new_phone", "lost_access", "safety")
INTENTS = TOPICS + ("start_recovery", "cancel", "dispute", "talk_to_person", "case_status", "lang_en", "lang_zh",
                    "greeting", "thanks", "something_else")

# When the best intent's posterior leads the runner-up's by less than this, the router is unsure.
# Chosen by cross-validation on the training data only (docs/intents.md): it asks about 1 in 7 there.
MIN_MARGIN = 0.3
ALPHA = 0.1  # Laplace smoothing; small, because the vocabulary is much larger than any one intent's

# Simplified -> traditional for the characters customers use here. Pairs, written side by side.
_S2T_PAIRS = (
    "验驗证證码碼机機丢丟遗遺设設账帳户戶进進态態换換时時间間钟鐘对對错錯问問题題绑綁启啟关關闭閉"
    "备備复復请請帮幫谁誰员員转轉为為么麼说說话話语語简簡体體现現开開发發无無该該样樣还還号號应應"
    "没沒这這给給过過让讓吗嗎们們从從认認总總钱錢银銀币幣双雙两兩骤驟种種记記词詞诈詐骗騙联聯审審"
    "询詢处處连連结結邮郵删刪坏壞录錄载載装裝旧舊苹蘋软軟输輸显顯败敗页頁网網续續费費领領价價准準"
    "确確实實际際动動调調选選项項务務导導迁遷扫掃维維护護险險风風钥鑰写寫纸紙离離线線云雲后後电電"
    "讯訊报報单單办辦谢謝国國会會来來个個经經长長门門难難见見视視计計评評识識译譯试試误誤读讀谈談"
    "资資购購买買卖賣贵貴货貨质質车車轻輕较較区區医醫华華历歷压壓参參变變听聽响響团團图圖场場块塊"
    "够夠头頭妈媽宝寶寻尋尽盡层層岁歲师師带帶广廣异異张張归歸怀懷恶惡战戰担擔择擇挂掛据據损損数數"
    "断斷暂暫术術权權极極标標档檔检檢欢歡毕畢气氣汇匯测測湾灣满滿点點热熱爱愛状狀独獨环環监監盘盤"
    "积積称稱稳穩窃竊笔筆签簽类類紧緊约約组組细細终終绍紹统統胜勝脑腦节節药藥获獲虑慮补補规規触觸"
    "讲講许許论論访訪诉訴负負财財责責运運远遠违違迟遲适適释釋锁鎖键鍵队隊随隨隐隱须須顾顧预預额額"
    "飞飛众眾优優伤傷冲衝况況劝勸协協卫衛厂廠厅廳县縣叶葉吓嚇丝絲"
)
_S2T = str.maketrans(_S2T_PAIRS[0::2], _S2T_PAIRS[1::2])
_LATIN = re.compile(r"[a-z0-9#']+")
_HAN = re.compile(r"[\u3400-\u9fff]+")
_LONG_NUMBER = re.compile(r"\d{3,}")


def normalize(text: str) -> str:
    """Full-width to half-width, lower case, simplified to traditional, long numbers to '#'."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_S2T)
    text = _LONG_NUMBER.sub("#", text.replace("’", "'"))
    return " ".join(text.split())


def features(text: str) -> Counter:
    """Words (counted twice: a whole word is stronger evidence than its pieces) and word pairs, character
    3-4-grams of Latin words (typo-tolerant), and characters and character pairs of Chinese runs (which
    have no word breaks)."""
    out: Counter = Counter()
    norm = normalize(text)
    words = _LATIN.findall(norm)
    for word in words:
        out["w:" + word] += 2
        padded = f"<{word}>"
        for n in (3, 4):
            out.update(padded[i:i + n] for i in range(len(padded) - n + 1))
    out.update(f"b:{a}_{b}" for a, b in zip(words, words[1:]))
    for run in _HAN.findall(norm):
        padded = f"<{run}>"
        out.update(run)
        out.update(padded[i:i + 2] for i in range(len(padded) - 1))
    return out


def load(path: Path) -> list[tuple[str, str, str]]:
    """(text, intent, lang) rows of a labelled TSV file (a header line and '#' comments are skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("text\t"):
            continue
        text, intent, lang = line.split("\t")
        if intent not in INTENTS:
            raise ValueError(f"{path}: unknown intent {intent!r} for {text!r}")
        rows.append((text, intent, lang))
    return rows


@dataclass(frozen=True)
class Routing:
    intent: str
    confidence: float                    # posterior of `intent`
    ranked: tuple[tuple[str, float], ...]  # every intent with its posterior, best first
    unsure: bool = False

    @property
    def candidates(self) -> tuple[str, ...]:
        """The intents worth offering in a clarifying question (best first)."""
        return tuple(i for i, p in self.ranked[:3] if p >= 0.1)


class NaiveBayes:
    """Multinomial naive Bayes with uniform priors (the data's class sizes are not real-world rates)."""

    def __init__(self, rows: list[tuple[str, str, str]], *, alpha: float = ALPHA):
        counts: dict[str, Counter] = {i: Counter() for i in INTENTS}
        for text, intent, _ in rows:
            counts[intent].update(features(text))
        vocab = set().union(*counts.values())
        self.log_p: dict[str, dict[str, float]] = {}
        self.unseen: dict[str, float] = {}
        for intent, c in counts.items():
            denominator = math.log(sum(c.values()) + alpha * len(vocab))
            self.log_p[intent] = {f: math.log(n + alpha) - denominator for f, n in c.items()}
            self.unseen[intent] = math.log(alpha) - denominator
        self.vocab = vocab
        self.exact = {normalize(text): intent for text, intent, _ in rows}

    def scores(self, text: str) -> tuple[dict[str, float], int]:
        """Log-likelihood per intent over known features, and how many known features there were."""
        feats = {f: n for f, n in features(text).items() if f in self.vocab}
        out = {}
        for intent in INTENTS:
            table, unseen = self.log_p[intent], self.unseen[intent]
            out[intent] = sum(n * table.get(f, unseen) for f, n in feats.items())
        return out, sum(feats.values())

    def route(self, text: str) -> Routing:
        exact = self.exact.get(normalize(text))
        if exact is not None:
            return Routing(exact, 1.0, ((exact, 1.0),))
        scores, n = self.scores(text)
        if n == 0:  # nothing we have ever seen: gibberish, emoji, another language
            return Routing("something_else", 0.0, (("something_else", 0.0),), unsure=True)
        # Scores are divided by the square root of the feature count before the softmax: naive Bayes
        # multiplies dozens of correlated n-grams and is wildly over-confident otherwise.
        scaled = {i: s / math.sqrt(n) for i, s in scores.items()}
        top = max(scaled.values())
        weights = {i: math.exp(s - top) for i, s in scaled.items()}
        total = sum(weights.values())
        ranked = tuple(sorted(((i, w / total) for i, w in weights.items()), key=lambda p: (-p[1], p[0])))
        (best, p1), (_, p2) = ranked[0], ranked[1]
        return Routing(best, p1, ranked, unsure=p1 - p2 < MIN_MARGIN)


_MODEL: NaiveBayes | None = None


def model() -> NaiveBayes:
    """The shipped model, trained once per process (two threads racing here build the same model)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = NaiveBayes(load(DATA))
    return _MODEL


def route(text: str) -> Routing:
    """The customer's intent for a free-text message."""
    return model().route(text)


# ---- mid-flow commands --------------------------------------------------------------------------------

_POLITE = r"(?:please|pls|plz|now|ok|okay|請|麻煩|幫我|我要|我想)?"
COMMANDS = (
    ("cancel", re.compile(
        rf"^\W*{_POLITE}\W*(?:cancel|cancle|stop|abort)(?:\s+(?:it|this|that|the|my|request|case|recovery|"
        rf"reset|please|now))*\W*$|^\W*{_POLITE}\W*(?:取消|停止|不要了)(?:我的|這個|这个)?(?:申請|找回|重設|"
        rf"重置|申请)?\W*$")),
    ("talk_to_person", re.compile(
        r"\b(?:human|real person|live agent|agent|representative|talk to (?:a |an )?(?:person|someone)|"
        r"customer (?:service|support))\b|真人|人工|客服人員|轉接")),
    ("case_status", re.compile(r"\b(?:status|progress)\b|進度|狀態")),
    ("lang_en", re.compile(r"^\W*(?:(?:in |speak |reply in )?english(?: please)?|(?:請用|說|用)?英文)\W*$")),
    ("lang_zh", re.compile(r"^\W*(?:(?:in |speak |reply in )?(?:traditional )?chinese(?: please)?|"
                           r"(?:請用|說|用)?(?:繁體)?中文)\W*$")),
)


def command(text: str) -> str | None:
    """An unmistakable command (cancel, a person, status, a language), or None: then it is an answer."""
    norm = normalize(text)
    for name, pattern in COMMANDS:
        if pattern.search(norm):
            return name
    return None
