"""The lab's data generators (lab/domains.py): the default domain and its committed copy,
the annotation noise, sparse parity."""
import data
from lab import domains


def test_the_committed_default_domain_is_the_generator_s():
    """data/default/ is what the reference reads; lab/domains.py made it (python -m lab.domains)."""
    committed, made = data.load_domain("default"), domains.default_domain(0)
    for split in ("train", "val", "test"):
        assert [{k: e[k] for k in ("prompt", "answer", "subdomain")} | ({"noisy": True} if e.get("noisy") else {})
                for e in committed[split]] == made[split], split


def test_noisy_default_domain_has_the_same_prompts_and_clean_held_out_splits():
    clean, noisy = domains.default_domain(0, noise=0.0), domains.default_domain(0)
    assert [e["prompt"] for e in clean["train"]] == [e["prompt"] for e in noisy["train"]]
    assert clean["val"] == noisy["val"] and clean["test"] == noisy["test"]
    wrong = [(c, n) for c, n in zip(clean["train"], noisy["train"]) if c["answer"] != n["answer"]]
    assert abs(len(wrong) / len(clean["train"]) - domains.NOISE) < 0.02
    assert all(n.get("noisy") for _, n in wrong) and sum(e.get("noisy", False) for e in noisy["train"]) == len(wrong)
    for c, n in wrong:  # a wrong answer of the right form
        if c["subdomain"].startswith("cls"):
            assert {c["answer"], n["answer"]} in ({" positive", " negative"}, {"良", "悪"})
        elif c["subdomain"].startswith("ner"):
            assert [x.split(": ")[1] for x in c["answer"].split("; ")] == [x.split(": ")[1] for x in n["answer"].split("; ")]
    assert domains.load("default:0")["train"] == clean["train"]


def test_default_domain_is_deterministic_with_disjoint_splits():
    a, b, c = domains.default_domain(0), domains.default_domain(0), domains.default_domain(1)
    assert a == b and a != c
    assert sorted({e["subdomain"] for e in a["test"]}) == ["cls_en", "cls_ja", "ner_en", "ner_ja", "qa_en", "qa_ja"]
    prompts = {s: {e["prompt"] for e in a[s]} for s in a}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]


def test_qa_test_questions_ask_known_facts_in_unseen_phrasing():
    d = domains.default_domain(0)
    train = [e for e in d["train"] if e["subdomain"] == "qa_en"]
    for e in [e for e in d["test"] if e["subdomain"] == "qa_en"][:20]:
        name = e["prompt"].split("\n")[0]
        person = [w for w in name.replace("?", "").replace(".", "").split() if w[0].isupper()][-2:]
        same = [t for t in train if " ".join(person) in t["prompt"] and t["answer"] == e["answer"]]
        assert len(same) >= 2, e  # the fact is in train, under other phrasings


def test_parity_label_is_the_xor_of_the_hidden_support_and_splits_are_disjoint():
    from lab.domains import parity_domain, parity_support
    d = parity_domain(0, 12, 3, (1000, 200, 200))
    support = parity_support(0, 12, 3)
    bits = lambda ex: [int(b) for b in ex["prompt"].rstrip(" =").split()]
    for split in d.values():
        assert all(ex["answer"] == f" {sum(bits(ex)[i] for i in support) % 2}" for ex in split)
    other = support[:-1] + [next(i for i in range(12) if i not in support)]  # one support bit swapped
    agree = sum(ex["answer"] == f" {sum(bits(ex)[i] for i in other) % 2}" for ex in d["train"]) / len(d["train"])
    assert 0.4 < agree < 0.6  # a wrong subset is no better than chance
    prompts = [set(ex["prompt"] for ex in d[s]) for s in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert parity_domain(0, 12, 3, (1000, 200, 200)) == d != parity_domain(1, 12, 3, (1000, 200, 200))  # seeded
    assert domains.load("parity:16:2")["test"] == parity_domain()["test"]  # --data parity:N:K, defaults
