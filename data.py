"""
Data: the offline GPT-2 tokenizer, loading a domain (JSONL folders; the default domain is
the committed data/default/), batching and loss masks, the schedule's probe from its draw to
its stored log-probs, and evaluation (exact match, per-example records).
"""
import base64
import hashlib
import json
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import tiktoken
import torch
from torch.nn import functional as F

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
        self.identity = ("gpt2", None if ids is None else tuple(ids))  # what teacher and student must share
        self.bos = []  # GPT-2 starts a text with no special token (a model folder's tokenizer may)

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


class DataError(ValueError):
    """Bad input data: the message names the file, line and field."""


# -----------------------------------------------------------------------------
# domains: JSONL with {"prompt", "answer", "subdomain"?, "noisy"?} per line

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
            noisy = {"noisy": True} if ex.get("noisy") is True else {}  # a known-wrong label, for reports
            examples.append(dict(prompt=ex["prompt"], answer=ex["answer"], subdomain=ex.get("subdomain", "all"),
                                 src=where, **noisy))
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


DEFAULT = Path(__file__).parent / "data" / "default"  # the demo's domain, generated by lab/domains.py


def load_domain(data):
    """'default' -> the committed default domain (data/default/); a folder -> its
    train/val/test.jsonl. The default domain is read like any user's folder."""
    folder = DEFAULT if data == "default" else Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {data}: expected 'default' or a folder with train.jsonl, val.jsonl and test.jsonl")
    return {s: load_jsonl(folder / f"{s}.jsonl") for s in ("train", "val", "test")}


def write_jsonl(examples, path):
    """The inverse of load_jsonl (a `noisy` flag, where an example has one, is kept)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {k: ex[k] for k in ("prompt", "answer", "subdomain")} | ({"noisy": True} if ex.get("noisy") else {})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
        # the text as the base model saw it: its BOS first, where its tokenizer adds one (Llama 3);
        # no BOS and no prompt: EOT starts the text
        p, a = tok.bos + tok.encode(ex["prompt"]) or [tok.eot], tok.encode(ex["answer"])
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
    An epoch is cut once and kept (_EPOCH) while the same lengths ask for it: cutting it
    again at every step costs 8 ms at 64,000 examples, longer than a small model's step.
    """
    n = len(lengths)
    per_epoch = n // batch_size
    assert per_epoch > 0, f"{n} training examples are fewer than one batch of {batch_size}"
    epoch, k = divmod(step, per_epoch)
    if _EPOCH.get("lengths") is not lengths or _EPOCH["key"] != (batch_size, seed, epoch, n):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)[:per_epoch * batch_size].tolist()
        pool = 8 * batch_size
        perm = [i for s in range(0, len(perm), pool) for i in sorted(perm[s:s + pool], key=lambda i: lengths[i])]
        order = torch.randperm(per_epoch, generator=g).tolist()
        batches = [perm[b * batch_size:(b + 1) * batch_size] for b in order]
        _EPOCH.update(lengths=lengths, key=(batch_size, seed, epoch, n), batches=batches)
    return list(_EPOCH["batches"][k])


_EPOCH = {}  # batch_indices' last epoch: the lengths it was cut for (the object itself), its key, its batches


# -----------------------------------------------------------------------------
# a model's logits and losses at the answer positions of encoded examples, the
# vocabulary-sized head applied a piece of positions at a time

def logit_chunk(vocab_size, requested=0, gib=1 / 16):
    """Answer positions per piece of the head and the losses: `requested` (--logit_chunk) if
    given, else as many as keep one piece's float32 logits within gib. At a 128k vocabulary that
    is 130 positions; the CPU demo's few hundred tokens fit every batch in one piece."""
    return requested or max(1, int(gib * 2**30) // (4 * vocab_size))


def in_pieces(fn, chunk):
    """A head for model(x, positions=mask, head=...): the logits of `chunk` answer positions at a
    time, fn(logits, rows) on each piece (rows: the piece's slice of the answer positions), the
    outputs concatenated (a tuple of outputs: each concatenated). No (positions x V) array
    exists whole; with chunk >= the positions it is one piece, the plain head."""
    def head(h, lm_head):
        outs = [fn(lm_head(h[r:r + chunk]), slice(r, r + chunk)) for r in range(0, h.size(0), chunk)]
        return tuple(map(torch.cat, zip(*outs))) if isinstance(outs[0], tuple) else torch.cat(outs)
    return head


def fit_batch(batch_size, enc, max_tokens=2**15):
    """Examples per batch of a pass without gradients (evaluation, anchor losses, the probe):
    batch_size, fewer where batch_size of the longest example would exceed max_tokens (the CPU
    demo's 256 x 128 tokens fit; at 512 tokens, 64 examples). Without this a batch of 256 long
    examples holds 15 GiB of a 3B model's transients."""
    return max(1, min(batch_size, max_tokens // max(len(p) + len(a) for p, a in enc)))


@torch.no_grad()
def answer_pieces(model, enc, eot, device, ctx, fn, batch_size, chunk=0):
    """fn(logits, y at those positions) over the answer positions of consecutive batches of
    encoded examples, a piece at a time (in_pieces) -> yields (fn's output, mask) per batch."""
    chunk, batch_size = chunk or logit_chunk(model.config.vocab_size), fit_batch(batch_size, enc)
    for s in range(0, len(enc), batch_size):
        x, y, mask = make_batch(enc, range(s, min(s + batch_size, len(enc))), eot, device)
        with ctx:
            yield model(x, positions=mask, head=in_pieces(lambda lg, r: fn(lg, y[mask][r]), chunk)), mask


def token_ce(logits, y):
    """Cross-entropy of each answer position's target, in float32: (N, V), (N,) -> (N,). Each
    example's mean of it (scd.per_example) is scd.gold_ce, made a piece of the head at a time."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def example_losses(model, enc, eot, device, ctx, batch_size=256, chunk=0):
    """Per-example answer CE of model on encoded examples (AW's anchor l_S): a list."""
    return [v for ce, mask in answer_pieces(model, enc, eot, device, ctx, token_ce, batch_size, chunk)
            for v in scd.per_example(ce, mask).tolist()]


# -----------------------------------------------------------------------------
# the schedule's probe (METHOD.md section 2.3), in one place: drawn from the training set,
# scored by the teacher run at every checkpoint and stored in its folder with the probe's
# identity, read back by distill.py (or scored there, if the stored file is of another probe)

def probe_examples(train_enc, size, seed):
    """The probe: a seeded subset of the training set, sorted by length so that chunks of it
    pad little. -> (the examples' indices in train, their encodings, an id: a hash of the
    indices and tokens, stored with every log-prob made on it)."""
    g = torch.Generator().manual_seed(seed)
    idx = sorted(torch.randperm(len(train_enc), generator=g)[:size].tolist(), key=lambda i: sum(map(len, train_enc[i])))
    enc = [train_enc[i] for i in idx]
    return idx, enc, hashlib.sha256(json.dumps([idx, enc]).encode()).hexdigest()[:16]


def probe_seeds(seed, resamples, size, n_train):
    """The seeds of a run's probe and of the `resamples` others its choice is checked on; a probe
    as large as the training set is the training set whatever its seed: it has no others."""
    return [seed + 1000 * r for r in range(1 + (resamples if size < n_train else 0))]


def probe_file(folder, seed, size, topk):
    """Where a teacher run keeps its checkpoints' log-probs on the probe of this seed and size."""
    return Path(folder) / f"probe_s{seed}_n{size}_k{topk}.pt"


def probe_logprobs(model, probe, eot, device, ctx, topk, batch_size=32, chunk=0):
    """A checkpoint's log-probabilities at the probe's answer positions, compressed as they are
    stored (scd.compress_logprobs: the top k of each token and the tail mass), a piece at a time.
    -> (values (N answer tokens, k), indices (N, k))."""
    top = lambda lg, y: scd.compress_logprobs(torch.log_softmax(lg.float(), -1), topk)
    pieces = [vi for vi, _ in answer_pieces(model, probe, eot, device, ctx, top, batch_size, chunk)]
    return tuple(map(torch.cat, zip(*pieces)))


class ProbeStore:
    """The compressed log-probs (scd.compress_logprobs: top k and a tail mass) of teacher
    checkpoints on one probe, as stored in the teacher's folder: {fingerprint of the
    training set, probe id, steps, values, indices}. Saved by the caller (atomic_save)."""

    def __init__(self, folder, train_enc, train_fp, size, seed, topk):
        _, self.probe, self.id = probe_examples(train_enc, size, seed)
        self.path, self.topk = probe_file(folder, seed, size, topk), topk
        self.data = dict(fingerprint=train_fp, probe=self.id, steps=[], values=[], indices=[])

    def load(self, up_to=None):
        """Read the stored file if it was made on this very probe and training set, keeping
        the checkpoints up to step up_to (a resumed teacher run). -> True if it was read."""
        if not self.path.exists():
            return False
        stored = torch.load(self.path, map_location="cpu", weights_only=True)
        if stored["fingerprint"] != self.data["fingerprint"] or stored.get("probe") != self.id:
            return False
        keep = len(stored["steps"]) if up_to is None else sum(s <= up_to for s in stored["steps"])
        self.data = {k: v[:keep] if isinstance(v, list) else v for k, v in stored.items()}
        return True

    def add(self, step, compressed):
        """Store one checkpoint's compressed log-probs on the probe (probe_logprobs)."""
        v, i = compressed
        self.data["steps"].append(step), self.data["values"].append(v.cpu()), self.data["indices"].append(i.cpu())

    def get(self, steps, device):
        """[(values, indices)] of the checkpoints at these steps, or None if one is missing."""
        if not set(steps) <= set(self.data["steps"]):
            return None
        at = [self.data["steps"].index(s) for s in steps]
        return [(self.data["values"][j].to(device), self.data["indices"][j].to(device)) for j in at]


# -----------------------------------------------------------------------------
# evaluation: exact match per subdomain (from one forward pass, or by greedy decoding),
# entity F1 where answers are entity lists, per-example records

@torch.no_grad()
def evaluate(model, examples, tok, device="cpu", ctx=None, decode=False, batch_size=256, chunk=0):
    """-> (summary dict, per-example records). Records keep what SFS/TFS analysis needs.

    decode=False: exact match without generating. Greedy decoding reproduces the gold answer
    token for token (then stops) exactly when, with the gold answer fed in, the argmax at
    every answer position, its EOT included, is the gold token: so one forward pass gives
    both the loss and the exact match. decode=True generates and compares strings
    (stripped), which also accepts another tokenisation of the same text; the tests show
    both agree on trained checkpoints. chunk: answer positions per piece of the head (in_pieces).
    """
    ctx = ctx or nullcontext()
    was_training = model.training
    model.eval()
    enc = encode(examples, tok, model.config.block_size)
    records = []
    by_len = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))  # less padding
    batch_size = fit_batch(batch_size, enc)
    for s in range(0, len(enc), batch_size):
        idx = by_len[s:s + batch_size]
        x, y, mask = make_batch(enc, idx, tok.eot, device)
        scored = lambda lg, r: (token_ce(lg, y[mask][r]), (lg.argmax(-1) != y[mask][r]).float())  # per answer token
        with ctx:
            ce, wrong = model(x, positions=mask, head=in_pieces(scored, chunk or logit_chunk(model.config.vocab_size)))
            losses, right = scd.per_example(ce, mask), scd.per_example(wrong, mask) == 0
            if decode:
                outs = model.generate(*prompt_batch([enc[i][0] for i in idx], tok.eot, device),
                                      max(len(enc[i][1]) for i in idx) + 1, tok.eot)
        for b, i in enumerate(idx):
            gold = examples[i]["answer"].strip()
            pred = tok.decode(outs[b]).strip() if decode else None
            records.append(dict(i=i, subdomain=examples[i]["subdomain"], answer=gold, loss=round(losses[b].item(), 5),
                                correct=pred == gold if decode else bool(right[b]),
                                **({"prediction": pred} if decode else {})))
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


