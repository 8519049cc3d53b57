"""
Generators of the demo's data, below data.py: the embedded default domain (its word lists,
templates and annotation noise) and sparse parity. Each returns {"train", "val", "test"}
lists of {"prompt", "answer", "subdomain"} dicts, the same shape data.load_jsonl reads.

    python data.py --out data/default   # writes the default domain as JSONL to look at
"""
import random
import re

# the embedded default domain: 3 task types x 2 languages = 6 subdomains
#   qa   closed-book questions about a fixed cast of people (memorisation: capacity matters)
#   ner  entity extraction; some entities appear with no context cue (type must be known)
#   cls  sentiment with negation and "but" (the clause after the last "but" decides)

EN = dict(
    first="Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nathan Olivia "
          "Paul Quinn Rosa Sam Tina Victor Wendy Xavier Yara Zoe".split(),
    last="Smith Jones Brown Taylor Wilson Evans Thomas Walker White Green Hall Wood Clark Lewis "
         "Young King Wright Scott Baker Adams".split(),
    city="Paris London Berlin Madrid Rome Vienna Prague Dublin Oslo Lisbon Athens Warsaw Cairo "
         "Lima Tokyo Seoul Sydney Boston Denver Toronto".split(),
    org="Acme Globex Initech Umbrella Hooli Vandelay Soylent Stark Wayne Wonka Cyberdyne Tyrell "
        "Aperture Massive Oceanic".split(),
    qa_city=["Where does {p} live?", "In which city does {p} live?", "What city is {p} based in?",
             "Which city is home to {p}?", "Name the city where {p} lives.", "Where is the home of {p}?",
             "What is the home city of {p}?", "In what city is {p} living?", "Which city does {p} call home?",
             "Where has {p} settled?", "Tell me where {p} lives."],
    qa_org=["Who does {p} work for?", "Which company employs {p}?", "Where is {p} employed?",
            "What firm does {p} work at?", "Name the employer of {p}.", "Who employs {p}?",
            "Which company does {p} work for?", "For which firm does {p} work?", "What company is {p} with?",
            "Where does {p} have a job?", "Tell me who {p} works for."],
    qa_prompt="Question: {q}\nAnswer:", qa_answer=" {a}",
    ner=["{PER} moved to {LOC} to join {ORG}.", "{ORG} opened an office in {LOC}.",
         "{PER} and {PER} met in {LOC}.", "{PER} left {ORG} last year.", "Yesterday {PER} visited {LOC}.",
         "{ORG} hired {PER} in {LOC}.", "Everyone talks about {ANY} these days.", "News from {ANY} and {ANY}."],
    ner_prompt="Text: {t}\nEntities:", ner_answer=" {a}",
    aspect=["the service", "the food", "the room", "the staff", "the price", "the delivery",
            "the screen", "the battery"],
    pos="great excellent good wonderful reliable fast friendly amazing".split(),
    neg="bad terrible slow broken rude awful noisy poor".split(),
    clause="{a} was {n}{w}", negation="not ", joiner=" and ", but=" but ", end=".",
    cls_prompt="Review: {t}\nSentiment:", labels=(" positive", " negative"),
)
JA = dict(
    first="太郎 花子 健 美咲 翔 愛 大輔 由美 誠 さくら 拓也 恵 直樹 陽子 亮 真理 剛 彩 悠 奈々".split(),
    last="田中 佐藤 鈴木 高橋 伊藤 渡辺 山本 中村 小林 加藤 吉田 山田 佐々木 山口 松本 井上 木村 林 清水 山崎".split(),
    city="東京 大阪 京都 札幌 福岡 名古屋 神戸 横浜 仙台 広島 奈良 金沢 長崎 熊本 那覇 新潟 静岡 岡山 松山 函館".split(),
    org="青葉商事 桜電機 山河物産 星野工業 朝日化学 若葉食品 大空運輸 白鳥製薬 緑川建設 光明電子 北斗銀行 "
        "東雲書店 松風製紙 波野水産 雪村鉄鋼".split(),
    qa_city=["{p}の住む町は?", "{p}はどこに住む?", "{p}の居住地は?", "{p}の住まいは?", "{p}が住む都市は?",
             "{p}の暮らす町は?", "{p}の在住地は?", "{p}が暮らす都市は?", "{p}の地元は?", "{p}の家の町は?",
             "{p}は何処に住む?"],
    qa_org=["{p}の勤務先は?", "{p}はどこで働く?", "{p}の会社は?", "{p}の職場は?", "{p}を雇う会社は?",
            "{p}の勤め先は?", "{p}が勤める会社は?", "{p}の所属先は?", "{p}の雇用主は?", "{p}が働く会社は?",
            "{p}は何処で働く?"],
    qa_prompt="問: {q}\n答:", qa_answer="{a}",
    ner=["{PER}は{LOC}の{ORG}に入った。", "{ORG}が{LOC}に進出。", "{PER}と{PER}が{LOC}で会った。",
         "{PER}は{ORG}を辞めた。", "{PER}が{LOC}を訪問。", "{ORG}が{PER}を採用。", "話題は{ANY}だ。", "{ANY}と{ANY}の話。"],
    ner_prompt="文: {t}\n抽出:", ner_answer="{a}",
    aspect=["サービス", "料理", "部屋", "店員", "値段", "配達", "画面", "電池"],
    pos="最高 丁寧 快適 便利 清潔 親切 素敵 優秀".split(),
    neg="最悪 不便 不潔 退屈 乱暴 残念 不安 下手".split(),
    clause="{a}は{w}{n}", negation="でない", joiner="、", but="。しかし", end="。",
    cls_prompt="評: {t}\n判定:", labels=("良", "悪"),
)
LANGS = {"en": EN, "ja": JA}


def _person(L, first, last):
    return f"{first} {last}" if L is EN else f"{last}{first}"


def _qa(L, lang, rng, n_people, n_val):
    """Every (person, attribute) fact can be asked in 11 phrasings: 4 of them go to train,
    the other 7 are held out, n_val of a language's held-out questions to val and the rest
    to test. A held-out question asks a known fact in a phrasing that train uses for other
    people, never for this one."""
    pairs = rng.sample([(f, l) for f in L["first"] for l in L["last"]], n_people)
    splits, held = {"train": [], "val": [], "test": []}, []
    for f, l in pairs:
        p = _person(L, f, l)
        for attr, values in (("qa_city", L["city"]), ("qa_org", L["org"])):
            a = rng.choice(values)
            seen = set(rng.sample(range(len(L[attr])), 4))
            for j, q in enumerate(L[attr]):
                ex = dict(prompt=L["qa_prompt"].format(q=q.format(p=p)), answer=L["qa_answer"].format(a=a), subdomain=f"qa_{lang}")
                (splits["train"].append if j in seen else held.append)(ex)
    rng.shuffle(held)
    splits["val"], splits["test"] = held[:n_val], held[n_val:]
    return splits


def _ner(L, lang, rng):
    text = rng.choice(L["ner"])
    ents = []

    def fill(m):
        kind = m.group(1)
        if kind == "ANY":
            kind = rng.choice(["PER", "LOC", "ORG"])
        name = {"PER": lambda: _person(L, rng.choice(L["first"]), rng.choice(L["last"])),
                "LOC": lambda: rng.choice(L["city"]), "ORG": lambda: rng.choice(L["org"])}[kind]()
        ents.append(f"{kind}: {name}")
        return name
    text = re.sub(r"\{(PER|LOC|ORG|ANY)\}", fill, text)
    return dict(prompt=L["ner_prompt"].format(t=text), answer=L["ner_answer"].format(a="; ".join(ents)),
                subdomain=f"ner_{lang}")


def _cls(L, lang, rng):
    segments, polarity = [], None
    for _ in range(rng.choice([1, 2])):  # segments joined by "but"
        polarity = rng.random() < 0.5
        clauses = []
        for _ in range(rng.choice([1])):  # clauses joined by "and" share a polarity
            negated = rng.random() < 0.35
            word = rng.choice(L["pos"] if polarity != negated else L["neg"])
            clauses.append(L["clause"].format(a=rng.choice(L["aspect"]), w=word, n=L["negation"] if negated else ""))
        segments.append(L["joiner"].join(clauses))
    text = L["but"].join(segments) + L["end"]
    text = text[0].upper() + text[1:]
    return dict(prompt=L["cls_prompt"].format(t=text), answer=L["labels"][0 if polarity else 1],
                subdomain=f"cls_{lang}")


NOISE = 0.2  # share of training answers replaced by a wrong one in the default domain (README: why)


def _mislabel(ex, rng):
    """Annotation noise: a wrong answer of the right form. QA names another city or company,
    sentiment flips, NER gives one entity a wrong type."""
    kind, lang = ex["subdomain"].split("_")
    L, a = LANGS[lang], ex["answer"]
    if kind == "cls":
        wrong = L["labels"][a == L["labels"][0]]
    elif kind == "qa":
        pool = L["city"] if a.strip() in L["city"] else L["org"]
        wrong = L["qa_answer"].format(a=rng.choice([v for v in pool if v != a.strip()]))
    else:
        ents = [e.split(": ", 1) for e in a.strip().split("; ")]
        j = rng.randrange(len(ents))
        ents[j][0] = rng.choice([t for t in ("PER", "LOC", "ORG") if t != ents[j][0]])
        wrong = L["ner_answer"].format(a="; ".join(f"{t}: {n}" for t, n in ents))
    return dict(ex, answer=wrong, noisy=True)


def default_domain(seed=0, noise=NOISE, n_people=60, n_per_split=(720, 170, 700)):
    """Deterministic train/val/test splits of the six subdomains (lists of dicts). A share
    `noise` of the training answers is wrong (marked noisy=True); val and test are clean.
    The noise has its own random stream: every noise level has the same prompts. The
    held-out splits are large (about 1,000 val and 4,100 test examples) so that a paired
    difference of one point between two models is not lost in the test set's noise; QA's
    test split has the 670 held-out questions per language that val leaves."""
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for lang, L in LANGS.items():
        for k, v in _qa(L, lang, rng, n_people, n_per_split[1]).items():
            splits[k] += v
        for make in (_ner, _cls):
            seen = set()
            for split, n in zip(splits, n_per_split):
                made = 0
                while made < n:  # held-out prompts never occur in train (nor val in test)
                    ex = make(L, lang, rng)
                    if ex["prompt"] not in seen:
                        seen.add(ex["prompt"])
                        splits[split].append(ex)
                        made += 1
    nrng = random.Random(f"noise-{seed}")
    splits["train"] = [_mislabel(ex, nrng) if nrng.random() < noise else ex for ex in splits["train"]]
    return splits


# -----------------------------------------------------------------------------
# sparse parity

def parity_support(seed, n_bits, k):
    """The hidden subset of bit positions whose XOR is the label."""
    return sorted(random.Random(f"support-{seed}").sample(range(n_bits), k))


def parity_domain(seed=0, n_bits=16, k=2, n_per_split=None):
    """Sparse parity (Panigrahi et al., ICLR 2025): the prompt is n_bits random bits, the
    answer the XOR of a hidden, seeded subset of k of them. No bit string is in two splits.
    Default sizes: 1,000 val and test, train up to 32,000 (at most half of all strings)."""
    n_per_split = n_per_split or (min(32000, 2 ** (n_bits - 1) - 2000), 1000, 1000)
    if 2 ** n_bits < 2 * sum(n_per_split) or not 0 < k <= n_bits:
        raise ValueError(f"parity:{n_bits}:{k}: need 0 < k <= n and 2^n >= twice the {sum(n_per_split)} examples")
    rng = random.Random(seed)
    support = parity_support(seed, n_bits, k)
    seen, splits = set(), {}
    for split, n in zip(("train", "val", "test"), n_per_split):
        splits[split] = []
        while len(splits[split]) < n:
            bits = tuple(rng.randint(0, 1) for _ in range(n_bits))
            if bits not in seen:
                seen.add(bits)
                splits[split].append(dict(prompt=" ".join(map(str, bits)) + " =",  # " 0", " 1": one token per bit
                                          answer=f" {sum(bits[i] for i in support) % 2}", subdomain="parity"))
    return splits
