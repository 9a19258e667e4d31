"""Free text to an intent: what a customer means, in English or Chinese, typos and mixed languages included.

Technique, chosen on measured accuracy (docs/intents.md has the numbers and the alternatives):
multinomial naive Bayes over words, word pairs, character 3-4-grams of Latin words and characters and
character pairs of Chinese runs, plus hand-written concept features: synonym classes that both languages
share ("lost": lost, stolen, 遺失, 被偷...; "not me": not me, someone else, 不是我...), each alone and in
pairs, so that a few words of evidence in either language add up ("not me" with "reset" is a dispute,
"lost" with "if" is a question about recovery). Simplified characters are folded to traditional first, so
one model serves both scripts. It trains on first use from `recovery/data/intents.tsv` in a fraction of a
second: no network, no model files, the same answer for the same text every time. A text seen verbatim in
that data (a button label) is routed exactly. When the best intent is not likely enough, or the best two
are close, the result is `unsure`, and the dialog asks rather than guesses.

`command()` is deliberately separate: mid-flow (an email, a code or an answer is expected) only an
unmistakable command may interrupt, so an answer such as "approve my case" is never mistaken for one.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

DATA = Path(__file__).with_name("data") / "intents.tsv"

TOPICS = ("what_is_2fa", "why_2fa", "enable_2fa", "code_rejected", "new_phone", "lost_access", "safety")
INTENTS = TOPICS + ("start_recovery", "cancel", "dispute", "talk_to_person", "case_status", "lang_en",
                    "lang_zh", "greeting", "thanks", "something_else")

# The router is unsure when the best intent's posterior is below MIN_CONFIDENCE or leads the runner-up's
# by less than MIN_MARGIN. Chosen by cross-validation on the training data only, where they cost least when
# a wrong answer counts as two questions (docs/intents.md has the table).
MIN_CONFIDENCE = 0.5
MIN_MARGIN = 0.1
ALPHA = 0.1  # Laplace smoothing; small, because the vocabulary is much larger than any one intent's
CONCEPT_WEIGHT = 2  # a concept counts like a whole word (words are counted twice too)

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
    "东東产產仓倉励勵奖獎烦煩荐薦钓釣链鏈销銷鱼魚盗盜别別帐帳冻凍闪閃级級递遞传傳亿億万萬与與"
    "则則赚賺赔賠亏虧兑兌册冊阅閱览覽赠贈频頻闻聞杂雜边邊镜鏡阶階陆陸顺順饭飯馆館马馬骇駭齐齊"
    "扰擾伪偽涨漲夺奪抢搶乱亂"
)
_S2T = str.maketrans(_S2T_PAIRS[0::2], _S2T_PAIRS[1::2])
_LATIN = re.compile(r"[a-z0-9#']+")
_HAN = re.compile(r"[\u3400-\u9fff]+")
_LONG_NUMBER = re.compile(r"\d{3,}")

# Words that carry no meaning in their spelling: their character n-grams would only add noise (a "please"
# is as likely in a cancel as in a recovery), so they count as whole words only.
FUNCTION_WORDS = frozenset(
    "please pls plz my the a an i me to is it and for of can you your on in at this that be do".split())

# Concept features ("keyword priors"): synonym classes over the normalised text (lower case, traditional
# characters). Each concept found is one feature, and so is each pair found together; naive Bayes learns
# from the training data how much each tells, so a concept is evidence, never a rule. Two more are derived
# in concepts(): "affirmative" (no negation and no one else: a recovery, not a dispute) and "off_domain".
CONCEPTS = tuple((name, re.compile(pattern)) for name, pattern in (
    ("lost", r"\b(?:lost|lose|losing|lsot|stolen|stole|broke|broken|dead|died|gone|deleted|uninstalled|"
             r"wiped|smashed|missing)\b|丟|掉了|遺失|不見|被偷|壞|沒了|泡水|格式化"
             # deleting the app, not the account (closing an account is another matter)
             r"|刪[掉除]?了?(?:驗證器|app|authenticator|谷歌|google)|(?:驗證器|app|authenticator).{0,3}刪"),
    ("negation", r"\b(?:not|never|no|didn'?t|didnt|don'?t|dont|haven'?t|havent|isn'?t|isnt|wasn'?t|wasnt)\b"
                 r"|沒|不是|並非|根本"),
    ("not_me", r"\b(?:not me|wasn'?t me|wasnt me|isn'?t me|not mine|not by me|someone|somebody|some1|"
               r"stranger|hacker|unauthori[sz]ed|fraudulent)\b|不是我|別人|有人|陌生人|盜|冒用"),
    ("scam", r"\b(?:scam\w*|phish\w*|fake|legit|pretend\w*|claim\w*|impersonat\w*|suspicious|fraud\w*)\b"
             r"|詐騙|騙|釣魚|冒充|假冒|自稱|假的|可疑|是真的嗎"),
    ("staff", r"\b(?:agent|staff|admin|manager|support|employee|representative|moderator|customer service|"
              r"team|officer)\b|客服|專員|管理員|員工|官方|人員"),
    ("asks_secret", r"\b(?:asked|asking|asks|wants|wanted|needs|requested|send|give|share|tell|read out)\b.*"
                    r"\b(?:code|codes|password|seed|phrase|key|2fa)\b|跟我要|問我要|要我|叫我|索取|提供"),
    ("waiting", r"\b(?:still|waiting|wait|yet|update|news|progress|pending|approved|taking so long|"
                r"how much longer|any word)\b|還在等|等了|等很久|還沒|進度|消息|更新|審核到|好了沒|通過了|核准"),
    ("found", r"\b(?:found|turned up|back|again|restored)\b|找到|找回來|回來了"),
    ("stop", r"\b(?:cancel\w*|cancle|stop|withdraw|revoke|undo|abort|call off|scrap|kill|close)\b"
             r"|取消|撤銷|撤回|停止|停掉|不要了|不用了"),
    ("if", r"\b(?:if|what if|in case|hypothetical\w*|suppose|someday|ever|just asking|curious|asking for)\b"
           r"|如果|萬一|的話|假如|假設|只是想|先問"),
    ("how_long", r"\b(?:how long|how many days|how much time|takes?|days)\b|多久|幾天|多長|多少時間"),
    ("how_it_works", r"\b(?:process|procedure|steps?|how does|work|works|requirements?|documents?|need)\b"
                     r"|流程|步驟|程序|需要|準備"),
    ("thanks", r"\b(?:thanks?|thx|ty|tysm|thnks|cheers|appreciate\w*|bye|goodbye|that'?s all|solved|"
               r"sorted)\b|謝|感謝|感恩|掰|再見|拜拜|3q|沒事了|解決了|沒問題了"),
    ("hello", r"\b(?:hi+|hello|hey|yo|hiya|morning|evening|afternoon|gm|hallo|helo)\b"
              r"|你好|您好|哈囉|嗨|早安|午安|安安|在嗎"),
    ("person", r"\b(?:human|person|real (?:person|human|agent)|live|someone|staff|agent|representative|"
               r"operator)\b|真人|人工|專人|轉接"),
    ("new_phone", r"\b(?:new (?:phone|iphone|device|samsung|pixel|fone)|switch\w*|chang\w* phones?|transfer|"
                  r"migrat\w*|move|moving|export|upgrad\w*)\b|換手機|新手機|轉移|搬|匯出|換機|換新"),
    ("rejected", r"\b(?:invalid|incorrect|wrong|rejected|rejects?|rejecting|expired?|fail\w*|"
                 r"not (?:working|accepted|valid)|doesn'?t work|don'?t match)\b"
                 r"|錯誤|無效|不對|失效|過期|被拒|錯|失敗|不正確"),
    ("has_phone", r"\b(?:still have|have (?:my|the) (?:phone|app)|app is (?:there|open|right)|right here|"
                  r"in front of me|works fine)\b|還在|手機在|app在"),
    ("turn_off", r"\b(?:turn off|disable|remove|skip|optional|mandatory|required|necessary|have to|must|"
                 r"force\w*)\b|關掉|關閉|一定要|必須|必要|強制|不開|可以不"),
    ("not_lost", r"\b(?:not|never|didn'?t|did not|haven'?t|hasn'?t|isn'?t|wasn'?t|don'?t|dont|didnt|havent)\s+"
                 r"(?:\w+\s+)?(?:lose|lost|losing)\b|沒有?弄?(?:掉|丟|遺失|不見)|手機(?:還在|好好的)"),
    ("request", r"\b(?:i want to|i'd like to|i need to|need to|please|pls|plz|help me|start|begin|now|asap)\b"
                r"|我要|我想|請|幫我|麻煩|現在|馬上"),
    ("question", r"\?|^(?:how|what|why|when|where|who|is|are|do|does|can|could|will|would|should)\b"
                 r"|嗎|呢|怎麼|如何|什麼|為什麼|是否|多久"),
    ("english", r"\benglish\b|英文|英語"),
    ("chinese", r"\b(?:chinese|mandarin)\b|中文|國語|華語|繁體"),
    ("other_topic", r"\b(?:deposits?|withdraw\w*|kyc|fees?|prices?|trade|trading|orders?|futures|margin|"
                    r"liquidat\w*|api|staking|stake|earn|airdrop|listed|listing|list|referral|reward|bonus|"
                    r"balance|bank|card|tax|statement|network|memo|sub-?account|limit|vip|chart|nickname|"
                    r"username|coins?|btc|eth|usdt|bitcoin|crypto|market|weather|joke|moon)\b"
                    r"|入金|出金|提幣|提現|充值|充幣|手續費|價格|多少錢|交易|訂單|合約|槓桿|平倉|空投|上架|推薦|"
                    r"邀請|獎勵|餘額|銀行|信用卡|實名|幣|無聊|天氣"),
))
# The bot's own subject. A message with none of these words gets the concept "off_domain", which is how a
# question about deposits or the weather is told from a short 2FA question.
DOMAIN_WORDS = re.compile(
    r"2fa|two.?factor|two.?step|2.?step|authenticat|\bauth\b|authy|totp|\bcodes?\b|\bcod\b|verif|otp|reset|"
    r"recover|\bphone|\bdevice|\bcase\b|request|\blink\b|scam|phish|password|seed"
    r"|驗證|碼|重設|重置|找回|恢復|手機|綁定|解綁|案件|申請|連結|詐騙|密碼|助記詞|私鑰")


def normalize(text: str) -> str:
    """Full-width to half-width, lower case, simplified to traditional, long numbers to '#'."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_S2T)
    text = _LONG_NUMBER.sub("#", text.replace("’", "'"))
    return " ".join(text.split())


def concepts(norm: str) -> list[str]:
    """The concepts found in normalised text, in table order ("off_domain" last)."""
    found = [name for name, pattern in CONCEPTS if pattern.search(norm)]
    if "negation" not in found and "not_me" not in found:
        found.append("affirmative")
    if not DOMAIN_WORDS.search(norm):
        found.append("off_domain")
    return found


def features(text: str) -> Counter:
    """The text's words, n-grams and Chinese characters (text_features), and its concepts, alone and in
    pairs."""
    norm = normalize(text)
    out = text_features(norm)
    found = concepts(norm)
    for name in found:
        out["c:" + name] += CONCEPT_WEIGHT
    for a, b in combinations(found, 2):
        out[f"c:{a}+{b}"] += CONCEPT_WEIGHT
    return out


def text_features(norm: str, plain: frozenset[str] = FUNCTION_WORDS) -> Counter:
    """Words (counted twice: a whole word is stronger evidence than its pieces) and word pairs, character
    3-4-grams of Latin words other than those in `plain` (typo-tolerant), characters and character pairs of
    Chinese runs (which have no word breaks)."""
    out: Counter = Counter()
    words = _LATIN.findall(norm)
    for word in words:
        out["w:" + word] += 2
        if word in plain:
            continue
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
    """Multinomial naive Bayes with uniform priors (the data's class sizes are not real-world rates).
    `featurize` is there so that tests/data/compare_techniques.py can measure other feature sets."""

    def __init__(self, rows: list[tuple[str, str, str]], *, alpha: float = ALPHA, featurize=None):
        self.featurize = featurize or features
        counts: dict[str, Counter] = {i: Counter() for i in INTENTS}
        for text, intent, _ in rows:
            counts[intent].update(self.featurize(text))
        vocab = set().union(*counts.values())
        self.log_p: dict[str, dict[str, float]] = {}
        self.unseen: dict[str, float] = {}
        for intent, c in counts.items():
            denominator = math.log(sum(c.values()) + alpha * len(vocab))
            self.log_p[intent] = {f: math.log(n + alpha) - denominator for f, n in c.items()}
            self.unseen[intent] = math.log(alpha) - denominator
        self.vocab = vocab
        self.exact = {normalize(text): intent for text, intent, _ in rows}

    def scores(self, text: str) -> tuple[dict[str, float], int, bool]:
        """Log-likelihood per intent over known features, how many known features there were, and whether
        any of them came from the text itself (concepts such as "off_domain" are found in any text)."""
        feats = {f: n for f, n in self.featurize(text).items() if f in self.vocab}
        out = {}
        for intent in INTENTS:
            table, unseen = self.log_p[intent], self.unseen[intent]
            out[intent] = sum(n * table.get(f, unseen) for f, n in feats.items())
        return out, sum(feats.values()), any(not f.startswith("c:") for f in feats)

    def route(self, text: str) -> Routing:
        exact = self.exact.get(normalize(text))
        if exact is not None:
            return Routing(exact, 1.0, ((exact, 1.0),))
        scores, n, seen = self.scores(text)
        if not seen:  # nothing we have ever seen: gibberish, emoji, another language
            return Routing("something_else", 0.0, (("something_else", 0.0),), unsure=True)
        # Scores are divided by the square root of the feature count before the softmax: naive Bayes
        # multiplies dozens of correlated n-grams and is wildly over-confident otherwise.
        scaled = {i: s / math.sqrt(n) for i, s in scores.items()}
        top = max(scaled.values())
        weights = {i: math.exp(s - top) for i, s in scaled.items()}
        total = sum(weights.values())
        ranked = tuple(sorted(((i, w / total) for i, w in weights.items()), key=lambda p: (-p[1], p[0])))
        (best, p1), (_, p2) = ranked[0], ranked[1]
        return Routing(best, p1, ranked, unsure=p1 < MIN_CONFIDENCE or p1 - p2 < MIN_MARGIN)


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
# What was not asked for: a reset, a recovery, a request or a case; or nothing ("I didn't request this").
_WHAT = (r"(?:\s+(?:this|that|it|anything|"
         r"(?:a|an|the|any|this|that)?\s*(?:2fa\s+|authenticator\s+)?(?:reset|recovery|request|case)))?")
_DISPUTE = re.compile(
    r"\b(?:it|that|this)\s*(?:'s|was|is)\s*(?:not|n'?t)\s+me\b|\bnot me\b"
    r"|\b(?:was|is)\s*(?:not|n'?t)\s+(?:made|requested|started|opened|submitted|initiated)\s+by\s+me\b"
    r"|\bi\s+(?:did\s*(?:not|n'?t)|never|have\s*(?:not|n'?t))\s+(?:request(?:ed)?|ask(?:ed)?\s+for|appl(?:y|ied)"
    rf"(?:\s+for)?|start(?:ed)?|submit(?:ted)?|open(?:ed)?|initiat(?:e|ed)){_WHAT}\s*(?:[.!?,;]|$)"
    r"|不是我(?:本人)?(?:申請|送出?|弄|做|操作|發起|提出|按|開)?的?(?=\W|$|[啊阿耶喔哦呀啦請幫])"
    r"|我(?:並|根本|從來|完全)?沒有?(?:申請|要求|發起|提出|送出?|操作|要)過?(?:任何)?"
    r"(?:重設|重置|恢復|找回|申請|這個|解綁)?(?:2fa)?(?:啊|阿|耶|喔|哦|呀|啦)?(?=\W|$)")
# A message that names an agent while it speaks of a scam or of a secret (a code, a password, a seed phrase)
# reports someone asking for one, or asks what staff may ask for; one that speaks of a review or an approval
# asks what staff did. Neither asks for a person: they are left to the model (the scam warning, the status).
_ABOUT_STAFF = re.compile(
    r"\b(?:scam|phish|fake|pretend|claim|impersonat|legit|suspicious|review|approv)\w*"
    r"|\b(?:codes?|numbers|digits|password|passcode|seed|phrase|private key|otp|looked at|yet)\b"
    r"|詐騙|騙|冒充|假冒|自稱|可疑|驗證碼|碼|密碼|助記詞|私鑰|審核|核准|通過")
# Statuses that are not a recovery's: those questions are off-topic, not a status command.
_OTHER_STATUS = re.compile(
    r"\bin progress\b|\b(?:kyc|deposits?|withdrawals?|orders?|transactions?|transfers?)\b|入金|出金|提幣|提現|"
    r"充值|訂單|實名|kyc")
COMMANDS = (
    ("dispute", _DISPUTE, None),
    ("cancel", re.compile(
        rf"^\W*{_POLITE}\W*(?:cancel|cancle|stop|abort)(?:\s+(?:it|this|that|the|my|request|case|recovery|"
        rf"reset|please|now))*\W*$|^\W*{_POLITE}\W*(?:取消|停止|不要了)(?:我的|這個)?(?:申請|找回|重設|"
        rf"重置)?\W*$"), None),
    ("talk_to_person", re.compile(
        r"\b(?:human|real person|live agent|agent|representative|talk to (?:a |an )?(?:person|someone)|"
        r"customer (?:service|support))\b|真人|人工客服|轉人工|找人工|要人工|^\W*人工\W*$|客服人員|轉接"), _ABOUT_STAFF),
    ("case_status", re.compile(r"\b(?:status|progress)\b|進度|狀態"), _OTHER_STATUS),
    ("lang_en", re.compile(r"^\W*(?:(?:in |speak |reply in )?english(?: please)?|(?:請用|說|用)?英文)\W*$"), None),
    ("lang_zh", re.compile(r"^\W*(?:(?:in |speak |reply in )?(?:traditional )?chinese(?: please)?|"
                           r"(?:請用|說|用)?(?:繁體)?中文)\W*$"), None),
)


def command(text: str) -> str | None:
    """An unmistakable command (a dispute, cancel, a person, status, a language), or None: then it is an
    answer. A dispute ("it wasn't me", "I didn't request this", "不是我申請的") comes first: it is never
    an answer to what the bot asks (an email, a code, a month or a currency), and someone saying it must
    learn how to stop the request whatever stage the conversation is in."""
    norm = normalize(text)
    for name, pattern, unless in COMMANDS:
        if pattern.search(norm) and not (unless and unless.search(norm)):
            return name
    return None
