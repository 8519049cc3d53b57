"""
Data: the offline GPT-2 tokenizer, the embedded default domain, JSONL domains, batching
and evaluation (greedy exact match, entity F1, per-example records).

    python data.py --out data/default   # write the default domain as JSONL to look at
"""
import base64
import hashlib
import json
import random
import re
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import tiktoken
import torch

import scd

# -----------------------------------------------------------------------------
# tokenizer: GPT-2's byte-level BPE, built from the ranks file in assets/ (no download)

RANKS_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer split (tiktoken's r50k_base pattern)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256  # <|endoftext|>
UNK = -1          # stands for "a GPT-2 id outside the compact vocabulary"


@lru_cache(maxsize=1)
def gpt2_encoding():
    raw = RANKS_FILE.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    assert digest == RANKS_SHA256, f"{RANKS_FILE}: sha256 {digest} is not GPT-2's ranks file"
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (l.split() for l in raw.splitlines() if l)}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257)


class Tokenizer:
    """GPT-2 BPE plus a map from GPT-2 ids to the model's ids.

    ids=None is the full GPT-2 vocabulary (model id == GPT-2 id). A list of GPT-2 ids is a
    compact vocabulary: model id i stands for ids[i]. Toy models spend most of their time in
    a 50k-row head, so the embedded domain uses only the few hundred ids its training split
    needs; the list travels inside every checkpoint. Either way vocab_size counts tokens
    only: the model has no padding rows that could take probability.
    """

    def __init__(self, ids=None):
        self.enc = gpt2_encoding()
        self.ids = ids
        if ids is None:
            self.eot, self.vocab_size = GPT2_EOT, 50257
        else:
            assert ids[0] == GPT2_EOT and ids[1] == UNK, "compact vocabularies start with [EOT, UNK]"
            self.to_model = {g: i for i, g in enumerate(ids)}
            self.eot, self.vocab_size = 0, len(ids)

    @classmethod
    def compact(cls, texts):
        """The ids the given texts use (the training split's: text seen only in val or test
        maps to UNK, so no test-only token enters the model)."""
        used = set()
        for t in texts:
            used.update(gpt2_encoding().encode_ordinary(t))
        return cls([GPT2_EOT, UNK] + sorted(used - {GPT2_EOT}))

    def encode(self, text):
        g = self.enc.encode_ordinary(text)  # user text never becomes a special token
        return g if self.ids is None else [self.to_model.get(t, 1) for t in g]

    def decode(self, ids):
        g = ids if self.ids is None else [self.ids[i] for i in ids if self.ids[i] >= 0]  # UNK decodes to nothing
        return self.enc.decode(g, errors="replace")


# -----------------------------------------------------------------------------
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
             "Which city is home to {p}?", "Name the city where {p} lives."],
    qa_org=["Who does {p} work for?", "Which company employs {p}?", "Where is {p} employed?",
            "What firm does {p} work at?", "Name the employer of {p}."],
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
    qa_city=["{p}の住む町は?", "{p}はどこに住む?", "{p}の居住地は?", "{p}の住まいは?", "{p}が住む都市は?"],
    qa_org=["{p}の勤務先は?", "{p}はどこで働く?", "{p}の会社は?", "{p}の職場は?", "{p}を雇う会社は?"],
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


def _qa(L, lang, rng, n_people):
    """Every (person, attribute) fact is asked in 5 phrasings: 4 go to train, the fifth to
    val or test, so held-out questions ask about known facts in an unseen phrasing."""
    pairs = rng.sample([(f, l) for f in L["first"] for l in L["last"]], n_people)
    splits = {"train": [], "val": [], "test": []}
    for k, (f, l) in enumerate(pairs):
        p = _person(L, f, l)
        for attr, values in (("qa_city", L["city"]), ("qa_org", L["org"])):
            a = rng.choice(values)
            held = rng.randrange(len(L[attr]))
            for j, q in enumerate(L[attr]):
                split = "train" if j != held else ("val" if (2 * k + (attr == "qa_org")) % 2 == 0 else "test")
                splits[split].append(dict(prompt=L["qa_prompt"].format(q=q.format(p=p)),
                                          answer=L["qa_answer"].format(a=a), subdomain=f"qa_{lang}"))
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


def default_domain(seed=0, noise=NOISE, n_people=60, n_per_split=(720, 60, 60)):
    """Deterministic train/val/test splits of the six subdomains (lists of dicts). A share
    `noise` of the training answers is wrong (marked noisy=True); val and test are clean.
    The noise has its own random stream: every noise level has the same prompts."""
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for lang, L in LANGS.items():
        for k, v in _qa(L, lang, rng, n_people).items():
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


class DataError(ValueError):
    """Bad input data: the message names the file, line and field."""


# -----------------------------------------------------------------------------
# user domains: JSONL with {"prompt", "answer", "subdomain"?} per line

def load_jsonl(path):
    path, examples = Path(path), []
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is not data
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(ex, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(ex).__name__}")
            for field in ("prompt", "answer", "subdomain"):
                if field not in ex:
                    if field == "subdomain":
                        continue
                    raise DataError(f"{where}: field '{field}' is missing")
                if not isinstance(ex[field], str):
                    raise DataError(f"{where}: field '{field}' must be a string, got {type(ex[field]).__name__}")
                if not ex[field].strip():
                    raise DataError(f"{where}: field '{field}' is empty")
            examples.append(dict(prompt=ex["prompt"], answer=ex["answer"],
                                 subdomain=ex.get("subdomain", "all"), src=where))
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


def load_domain(data, seed=0):
    """'default' -> the embedded domain; 'default:NOISE' -> the same with another share of
    wrong training answers (default:0 is the clean control); 'parity:N:K' -> sparse parity
    (parity.py); a folder -> its train/val/test.jsonl."""
    name, *args = data.split(":")
    try:
        if name == "default" and len(args) <= 1:
            return default_domain(seed, *map(float, args))
        if name == "parity" and len(args) in (0, 2):
            from parity import parity_domain
            return parity_domain(seed, *map(int, args))
    except ValueError as e:
        raise DataError(f"--data {data}: {e}") from None
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {data}: expected 'default[:NOISE]', 'parity[:N:K]' or a folder with train.jsonl, "
                        "val.jsonl and test.jsonl")
    return {s: load_jsonl(folder / f"{s}.jsonl") for s in ("train", "val", "test")}


def write_jsonl(examples, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({k: ex[k] for k in ("prompt", "answer", "subdomain")}, ensure_ascii=False) + "\n")


def fingerprint(examples):
    """sha256 of the examples' content: ties stored per-example values to their data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["prompt"], ex["answer"]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# batching: prompt + answer + EOT, loss on the answer and its EOT only, right padding

def encode(examples, tok, block_size):
    """-> [(prompt ids, answer ids)]. An example longer than the model's context is an error
    naming its file and line: never a silent truncation."""
    out = []
    for i, ex in enumerate(examples):
        p, a = tok.encode(ex["prompt"]), tok.encode(ex["answer"])
        if len(p) + len(a) > block_size:  # the input drops the last token (EOT), so this is the limit
            where = ex.get("src", f"example {i}")
            raise DataError(f"{where}: field 'prompt'+'answer' is {len(p) + len(a)} tokens, more than the "
                            f"model's context of {block_size}; shorten it or use a model with a longer context")
        out.append((p, a))
    return out


def make_batch(encoded, idx, eot, device="cpu"):
    """-> x (B, T) inputs, y (B, T) next-token targets, mask (B, T) True on answer targets.

    Padding reuses EOT (as GPT-2 has no pad token). The mask comes from the lengths, never
    from comparing ids with EOT, so each answer's own EOT stays a target and the model
    learns to stop.
    """
    seqs = [encoded[i][0] + encoded[i][1] + [eot] for i in idx]
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), eot, dtype=torch.long)
    y = x.clone()
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (s, i) in enumerate(zip(seqs, idx)):
        n = len(s) - 1
        x[b, :n], y[b, :n] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        mask[b, len(encoded[i][0]) - 1:n] = True  # targets from the first answer token to EOT
    return x.to(device), y.to(device), mask.to(device)


def batch_indices(lengths, batch_size, seed, step):
    """Example indices of training step `step`, from the examples' token lengths.

    Each epoch: a seeded permutation, cut into pools of 8 batches; each pool is sorted by
    length so a batch pads to similar lengths (about half the padding), and the batches
    are shuffled again. A pure function of (seed, step): a resumed run sees exactly the
    batches it would have seen, and runs with one seed (teacher, student) see one order.
    """
    n = len(lengths)
    per_epoch = n // batch_size
    assert per_epoch > 0, f"{n} training examples are fewer than one batch of {batch_size}"
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)[:per_epoch * batch_size].tolist()
    pool = 8 * batch_size
    perm = [i for s in range(0, len(perm), pool) for i in sorted(perm[s:s + pool], key=lambda i: lengths[i])]
    order = torch.randperm(per_epoch, generator=g).tolist()
    return perm[order[k] * batch_size:(order[k] + 1) * batch_size]


# -----------------------------------------------------------------------------
# evaluation: exact match per subdomain (from one forward pass, or by greedy decoding),
# entity F1 where answers are entity lists, per-example records

@torch.no_grad()
def evaluate(model, examples, tok, device="cpu", ctx=None, decode=False, batch_size=256):
    """-> (summary dict, per-example records). Records keep what SFS/TFS analysis needs.

    decode=False: exact match without generating. Greedy decoding reproduces the gold answer
    token for token (then stops) exactly when, with the gold answer fed in, the argmax at
    every answer position, its EOT included, is the gold token: so one forward pass gives
    both the loss and the exact match. decode=True generates and compares strings
    (stripped), which also accepts another tokenisation of the same text; the tests show
    both agree on trained checkpoints.
    """
    ctx = ctx or nullcontext()
    was_training = model.training
    model.eval()
    enc = encode(examples, tok, model.config.block_size)
    records = []
    by_len = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))  # less padding
    for s in range(0, len(enc), batch_size):
        idx = by_len[s:s + batch_size]
        x, y, mask = make_batch(enc, idx, tok.eot, device)
        with ctx:
            logits = model(x, positions=mask)
            losses = scd.gold_ce(logits, y, mask)
            right = scd.per_example((logits.argmax(-1) != y[mask]).float(), mask) == 0
            if decode:
                outs = model.generate(*prompt_batch([enc[i][0] for i in idx], tok.eot, device),
                                      max(len(enc[i][1]) for i in idx) + 1, tok.eot)
        for b, i in enumerate(idx):
            gold = examples[i]["answer"].strip()
            pred = tok.decode(outs[b]).strip() if decode else None
            records.append(dict(i=i, subdomain=examples[i]["subdomain"], answer=gold, loss=round(losses[b].item(), 5),
                                correct=pred == gold if decode else bool(right[b]), **({"prediction": pred} if decode else {})))
    model.train(was_training)
    records.sort(key=lambda r: r["i"])
    return summarize(records), records


def prompt_batch(prompts, eot, device):
    """Right-padded prompts and their lengths, for generate()."""
    P = torch.full((len(prompts), max(map(len, prompts))), eot, dtype=torch.long)
    for b, p in enumerate(prompts):
        P[b, :len(p)] = torch.tensor(p)
    return P.to(device), torch.tensor([len(p) for p in prompts], device=device)


def entities(answer):
    return {tuple(s.strip() for s in part.split(":", 1)) for part in answer.split(";") if ":" in part}


def summarize(records):
    """Exact match per subdomain and its macro average; entity-level micro F1 for each
    subdomain whose gold answers are all 'TYPE: name; ...' lists (elsewhere it does not apply
    and is left out, never printed as 0)."""
    subs = sorted({r["subdomain"] for r in records})
    out = {}
    for s in subs:
        rs = [r for r in records if r["subdomain"] == s]
        out[f"acc/{s}"] = sum(r["correct"] for r in rs) / len(rs)
        if all("prediction" in r and entities(r["answer"]) for r in rs):
            tp = fp = fn = 0
            for r in rs:
                p, g = entities(r["prediction"]), entities(r["answer"])
                tp, fp, fn = tp + len(p & g), fp + len(p - g), fn + len(g - p)
            out[f"f1/{s}"] = 2 * tp / max(2 * tp + fp + fn, 1)
    out["acc"] = sum(out[f"acc/{s}"] for s in subs) / len(subs)  # macro average over subdomains
    out["loss"] = sum(r["loss"] for r in records) / len(records)
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="write the embedded default domain as JSONL")
    ap.add_argument("--out", default="data/default", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="domain seed")
    ap.add_argument("--noise", type=float, default=NOISE, help="share of wrong training answers")
    args = ap.parse_args()
    for split, exs in default_domain(args.seed, args.noise).items():
        write_jsonl(exs, Path(args.out) / f"{split}.jsonl")
        print(f"{split}: {len(exs)} examples -> {args.out}/{split}.jsonl")
