"""
Generators of the demo's data: the default domain (its word lists, templates and annotation
noise), the general corpus the bases are pretrained on, and sparse parity. Each returns
{"train", "val", "test"} lists of {"prompt", "answer", "subdomain"} dicts, the shape
data.load_jsonl reads. The default domain at its noise is committed as data/default/ and read
from there by the reference; the lab generates the others (load).

    python -m lab.domains                 # rewrites data/default/ (a test checks it is unchanged)
    python -m lab.domains --noise 0 --out data/clean
"""
import argparse
import random
import re
from pathlib import Path

import data

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


def _qa(L, lang, rng, n_people, n_val, facts):
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
            facts.append((lang, p, attr, a))
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


def _review(L, G, rng):
    """A review in the sentiment grammar of G (EN or JA: the clause after the last "but"
    decides, "not" flips a clause) with L's aspects and words -> (text, its polarity)."""
    segments, polarity = [], None
    for _ in range(rng.choice([1, 2])):  # segments joined by "but"
        polarity = rng.random() < 0.5
        clauses = []
        for _ in range(rng.choice([1])):  # clauses joined by "and" share a polarity
            negated = rng.random() < 0.35
            word = rng.choice(L["pos"] if polarity != negated else L["neg"])
            clauses.append(G["clause"].format(a=rng.choice(L["aspect"]), w=word, n=G["negation"] if negated else ""))
        segments.append(G["joiner"].join(clauses))
    text = G["but"].join(segments) + G["end"]
    return text[0].upper() + text[1:], polarity


def _cls(L, lang, rng):
    text, polarity = _review(L, L, rng)
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
    splits = _world(seed, n_people, n_per_split)[0]
    nrng = random.Random(f"noise-{seed}")
    splits["train"] = [_mislabel(ex, nrng) if nrng.random() < noise else ex for ex in splits["train"]]
    return splits


def _world(seed, n_people, n_per_split):
    """The clean splits and the facts the QA questions ask: [(lang, person, attribute, value)]."""
    rng = random.Random(seed)
    splits, facts = {"train": [], "val": [], "test": []}, []
    for lang, L in LANGS.items():
        for k, v in _qa(L, lang, rng, n_people, n_per_split[1], facts).items():
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
    return splits, facts


# -----------------------------------------------------------------------------
# the general corpus the base models are pretrained on (pretrain.py)
#
# Two kinds of text, none of it labelled and none of it noisy:
#   prose about the default world: where each of its people lives and works (the facts the QA
#     questions ask, in statements, never as questions), sentences with its names and what kind
#     of name each is, reviews in its words
#   generic text in the shapes the tasks use, about other content: questions about other people
#     followed by their answer, sentences about other names followed by the names, reviews of
#     other things followed by a verdict. Other names, other wording, other labels: never one of
#     the domain's prompt templates.

WORLD = dict(
    en=dict(lives=["{p} lives in {a}.", "{p} has a home in {a}.", "{p} moved to {a} years ago."],
            works=["{p} works for {a}.", "{p} is employed by {a}.", "{p} has a job at {a}."],
            kinds=dict(PER="{n} is a person.", LOC="{n} is a city.", ORG="{n} is a company."),
            said=["{PER} flew to {LOC} on Monday.", "{ORG} has an office in {LOC}.", "{PER} spoke with {PER} at {ORG}.",
                  "People in {LOC} know {ORG}.", "{PER} wrote a letter to {ORG}."]),
    ja=dict(lives=["{p}は{a}に住んでいる。", "{p}の家は{a}にある。", "{p}は{a}で暮らす。"],
            works=["{p}は{a}で働いている。", "{p}は{a}の社員だ。", "{a}は{p}を雇っている。"],
            kinds=dict(PER="{n}は人の名前だ。", LOC="{n}は都市だ。", ORG="{n}は会社だ。"),
            said=["{PER}は月曜に{LOC}へ飛んだ。", "{ORG}は{LOC}に支店がある。", "{PER}と{PER}が{ORG}で話した。",
                  "{LOC}の人は{ORG}を知っている。", "{PER}が{ORG}に手紙を書いた。"]),
)
OTHER = dict(
    en=dict(first="Aaron Bella Carl Diana Ethan Fiona George Hannah Ivan Julia Kevin Laura Martin Nina Oscar".split(),
            last="Moore Hill Ward Cook Bell Reed Gray Fox Stone Hunt".split(),
            city="Munich Milan Zurich Geneva Naples Porto Krakow Bergen Kyoto Osaka Miami Austin".split(),
            org="Nexus Orbit Vertex Zenith Apex Quantum Nimbus Pinnacle".split(),
            subject="physics history music law medicine biology chemistry art".split(),
            qa=[("Where was {p} born?", "city"), ("What does {p} study?", "subject")], qa_form="Q: {q}\nA: {a}",
            text=["{PER} flew from {LOC} to {LOC}.", "{ORG} sold its shares in {LOC}.", "{PER} met {PER} at {ORG}.",
                  "A storm hit {LOC} on Sunday."], names="{t}\nthe names here: {n}", sep=", ",
            aspect=["the movie", "the book", "the song", "the game", "the show", "the hotel"],
            pos="fun lovely superb nice clean tasty".split(), neg="dull boring ugly dirty bland weak".split(),
            verdict="{t}\nso it was {v}.", labels=("good", "bad")),
    ja=dict(first="一郎 次郎 明美 和也 久美 浩 裕子 勇 千尋 茂".split(), last="森 池田 橋本 石川 前田 藤田 岡田 後藤".split(),
            city="千葉 埼玉 岐阜 富山 福井 高知 徳島 宮崎 大分 秋田".split(),
            org="旭日工業 銀河商会 若松物産 富士通商 千代田電気 三河製作所".split(),
            subject="物理 歴史 音楽 法律 医学 化学 美術 数学".split(),
            qa=[("{p}の出身地は?", "city"), ("{p}の専攻は?", "subject")], qa_form="Q: {q}\nA: {a}",
            text=["{PER}は{LOC}から{LOC}へ行った。", "{ORG}が{LOC}の株を売った。", "{PER}は{ORG}で{PER}に会った。",
                  "日曜に{LOC}を嵐が襲った。"], names="{t}\n名前: {n}", sep="、",
            aspect=["映画", "本", "歌", "試合", "番組", "宿"],
            pos="面白い 綺麗 見事 上品 爽快 新鮮".split(), neg="退屈 地味 不快 貧弱 散漫 平凡".split(),
            verdict="{t}\nつまり{v}だった。", labels=("好評", "不評")),
)


def _fill(text, names, rng):
    """Replace {PER}, {LOC}, {ORG} in text by random names of that kind -> (text, [(kind, name)])."""
    used = []

    def one(m):
        used.append((m.group(1), rng.choice(names[m.group(1)])))
        return used[-1][1]
    return re.sub(r"\{(PER|LOC|ORG)\}", one, text), used


def corpus(seed=0, n_docs=900, n_val=300):
    """The pretraining corpus: {"train", "val", "test"} lists of documents, each
    {"prompt": "", "answer": text, "subdomain": kind_lang}; an empty prompt makes every token
    of the text a target (data.encode starts it with EOT). Per language: every fact of the
    default world in each of 3 statements, and n_docs documents of each other kind. val and
    test are held-out documents of the same kinds (n_val each)."""
    rng, docs = random.Random(f"corpus-{seed}"), []
    for lang, p, attr, a in _world(0, 60, (720, 170, 700))[1]:  # the default world's facts (its seed is 0)
        for t in WORLD[lang]["lives" if attr == "qa_city" else "works"]:
            docs.append((f"world_{lang}", t.format(p=p, a=a)))
    for lang, L in LANGS.items():
        W, O = WORLD[lang], OTHER[lang]
        mine = dict(PER=[_person(L, f, l) for f in L["first"] for l in L["last"]], LOC=L["city"], ORG=L["org"])
        other = dict(PER=[_person(L, f, l) for f in O["first"] for l in O["last"]], LOC=O["city"], ORG=O["org"])
        for _ in range(n_docs):
            kind = rng.choice(list(W["kinds"]))
            docs.append((f"world_{lang}", W["kinds"][kind].format(n=rng.choice(mine[kind]))))
            docs.append((f"world_{lang}", _fill(rng.choice(W["said"]), mine, rng)[0]))
            docs.append((f"world_{lang}", _review(L, L, rng)[0]))
            q, field = rng.choice(O["qa"])
            who = rng.choice(other["PER"])
            docs.append((f"shape_{lang}", O["qa_form"].format(q=q.format(p=who), a=rng.choice(O[field]))))
            text, used = _fill(rng.choice(O["text"]), other, rng)
            docs.append((f"shape_{lang}", O["names"].format(t=text, n=O["sep"].join(n for _, n in used) or "-")))
            text, polarity = _review(O, L, rng)
            docs.append((f"shape_{lang}", O["verdict"].format(t=text, v=O["labels"][0 if polarity else 1])))
    docs = [dict(prompt="", answer=t, subdomain=k) for k, t in dict.fromkeys(docs)]  # unique, in order
    rng.shuffle(docs)
    return {"train": docs[2 * n_val:], "val": docs[:n_val], "test": docs[n_val:2 * n_val]}


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


# -----------------------------------------------------------------------------
# --data specs of the lab

def load(spec):
    """A --data spec of the lab -> splits. 'default:NOISE' is the default domain with another
    share of wrong training answers (default:0 is the clean control); 'parity:N:K[:TRAIN]' sparse
    parity (TRAIN training examples: as many as a run's steps times its batch, and each is fresh); 'corpus' the bases' pretraining text; 'default' and folders as the reference
    reads them (data/default/ is default_domain() at its noise: a test holds them equal)."""
    name, *args = spec.split(":")
    try:
        if name == "default" and len(args) == 1:
            return default_domain(0, *map(float, args))
        if name == "parity" and len(args) in (0, 2, 3):  # parity:N:K[:TRAIN examples]
            n_k, train = list(map(int, args[:2])), args[2:]
            return parity_domain(0, *n_k, n_per_split=(int(train[0]), 1000, 1000) if train else None)
        if name == "corpus" and not args:
            return corpus(0)
    except ValueError as e:
        raise data.DataError(f"--data {spec}: {e}") from None
    if spec != "default" and not Path(spec).is_dir():
        raise data.DataError(f"--data {spec}: expected 'default[:NOISE]', 'parity[:N:K[:TRAIN]]', 'corpus' or a folder with "
                             "train.jsonl, val.jsonl and test.jsonl")
    return data.load_domain(spec)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="write the default domain as JSONL (data/default/ is its committed copy)")
    ap.add_argument("--out", default=str(data.DEFAULT), help="output folder")
    ap.add_argument("--noise", type=float, default=NOISE, help="share of wrong training answers")
    args = ap.parse_args()
    for split, exs in default_domain(0, args.noise).items():
        data.write_jsonl(exs, Path(args.out) / f"{split}.jsonl")
        print(f"{split}: {len(exs)} examples -> {args.out}/{split}.jsonl")
