"""The general corpus, the committed base models, and the stage protocols of reproduce.py."""
import re
import shutil

import pytest
import torch

import data
import distill
from lab import domains
from lab import reproduce
import train_teacher as tt
import plumbing
from plumbing import RunError, prepare


@pytest.fixture(scope="module")
def corpus():
    return domains.corpus()


def test_corpus_is_deterministic_and_states_only_true_facts(corpus):
    assert domains.corpus() == corpus and domains.corpus(seed=1) != corpus
    docs = {d["answer"] for split in corpus.values() for d in split}
    facts = domains._world(0, 60, (720, 170, 700))[1]
    for lang, person, attr, value in facts:
        W, L = domains.WORLD[lang], domains.LANGS[lang]
        templates, values = (W["lives"], L["city"]) if attr == "qa_city" else (W["works"], L["org"])
        assert all(t.format(p=person, a=value) in docs for t in templates)  # every fact, in every statement
        assert not any(t.format(p=person, a=v) in docs for t in templates for v in values if v != value)  # never a wrong one


def test_corpus_never_uses_the_domains_templates_nor_its_people_in_questions(corpus):
    docs = [d for split in corpus.values() for d in split]
    assert all(d["prompt"] == "" for d in docs)  # every token a target
    starts = [L[k].split("{")[0] for L in domains.LANGS.values() for k in ("qa_prompt", "ner_prompt", "cls_prompt")]
    assert starts == ["Question: ", "Text: ", "Review: ", "問: ", "文: ", "評: "]
    lines = [line for d in docs for line in d["answer"].split("\n")]
    assert not any(s.strip() in line for line in lines for s in starts)
    cast = {domains._person(L, f, last) for L in domains.LANGS.values() for f in L["first"] for last in L["last"]}
    questions = [d["answer"] for d in docs if "?" in d["answer"]]
    assert len(questions) > 1000 and not any(p in q for q in questions for p in cast)
    labels = {x.strip() for L in domains.LANGS.values() for x in L["labels"]}
    verdicts = [d["answer"] for d in docs if "\nso it was" in d["answer"] or "\nつまり" in d["answer"]]
    assert len(verdicts) > 1000 and not any(lab in v.split("\n")[1] for v in verdicts for lab in labels)


def test_corpus_verdicts_follow_the_sentiment_grammar(corpus):
    """No label noise: the verdict after each generic review is the last clause's polarity, flipped by 'not'."""
    O = domains.OTHER["en"]
    checked = 0
    for d in corpus["train"]:
        m = re.fullmatch(r"(.*)\nso it was (good|bad)\.", d["answer"], re.S)
        if m:
            last = m.group(1).split(" but ")[-1].rstrip(".")
            word = last.split()[-1]
            polarity = (word in O["pos"]) != (" not " in f" {last} ")
            assert ("good" if polarity else "bad") == m.group(2), d["answer"]
            checked += 1
    assert checked > 500


def test_committed_bases_load_checked_and_match_the_corpus():
    teacher = torch.load(plumbing.BASES["teacher"][0], weights_only=True)
    splits, tok, model, _ = prepare("default", "teacher", 0, "base")
    assert all(torch.equal(v, teacher["model"][k]) for k, v in model.state_dict().items())
    texts = [ex["prompt"] + ex["answer"] for ex in domains.corpus()["train"] + splits["train"]]
    assert tok.ids == data.Tokenizer.compact(texts).ids  # remade corpus or domain -> remake the bases (pretrain.py)
    _, s_tok, student, _ = prepare("default:0", "student", 3, "base", domains.load("default:0"))  # the clean control has the same vocabulary
    assert s_tok.identity == tok.identity
    assert 3 <= model.num_params() / student.num_params() <= 10  # the paper's teacher:student is 8B:3B


def test_a_changed_base_file_is_refused_with_its_sha(tmp_path, monkeypatch):
    path, sha = plumbing.BASES["student"]
    bad = tmp_path / "base_student.pt"
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as f:  # one byte changed
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    monkeypatch.setitem(plumbing.BASES, "student", (bad, sha))
    with pytest.raises(RunError, match=f"{re.escape(str(bad))}: sha256 [0-9a-f]{{16}} is not the committed base's \\({sha[:16]}\\)"):
        prepare("default", "student", 0, "base")
    monkeypatch.setitem(plumbing.BASES, "student", (tmp_path / "gone.pt", sha))
    with pytest.raises(RunError, match="sha256 missing"):
        prepare("default", "student", 0, "base")


def test_bases_refuse_other_data_and_presets(tiny_domain):
    with pytest.raises(RunError, match="belong to the default domain and its vocabulary, not to --data"):
        prepare(str(tiny_domain), "teacher", 0, "base")  # a user's folder is never paired with them silently
    with pytest.raises(RunError, match="no committed base for --preset wide"):
        prepare("default", "wide", 0, "base")


def test_an_empty_prompt_makes_every_token_a_target():
    tok = data.Tokenizer.compact(["a b c"])
    enc = data.encode([dict(prompt="", answer="a b c")], tok, 16)
    x, y, mask = data.make_batch(enc, [0], tok.eot)
    assert x[0].tolist() == [tok.eot] + tok.encode("a b c") and mask.all()  # EOT, then each token predicted, EOT last
    assert y[0].tolist() == tok.encode("a b c") + [tok.eot]


@pytest.mark.parametrize("name, expect", [("paper", (6, 2 * 240, 0.0, 12)), ("k4", (4, 12 * 240 // 4, 0.5, 12))])
def test_stage_protocols(name, expect):
    """The paper's: one stage of T = 2 epochs per teacher checkpoint (12 epochs x 0.5 per epoch = 6),
    every checkpoint a candidate; k4: the same 12 epochs in 4 stages from the second half."""
    cfg = reproduce.ReproduceConfig(protocol=name, teacher_epochs=12, ckpt_per_epoch=0.5, stage_epochs=2, stages=4)
    assert reproduce.protocol(cfg, 240) == expect


def test_each_phase_gets_its_base_protocol_and_budget(monkeypatch, tmp_path):
    """Plumbing: which init, how many stages of how many steps, which pool, which teacher for convergence."""
    seen = []
    monkeypatch.setattr(tt, "train", lambda c, splits=None: seen.append(c))
    monkeypatch.setattr(distill, "main", lambda c, splits=None: seen.append(c))
    monkeypatch.setattr(reproduce, "finished", lambda folder, name: {})
    cfg = reproduce.ReproduceConfig(out_dir=str(tmp_path), teacher_epochs=3, ckpt_per_epoch=2, converge=True, seeds=2,
                                    protocol="paper")
    reproduce.run_all(cfg)
    spe = 3840 // 16
    for s in (0, 1):
        phases = [c for c in seen if c.seed == s]
        teacher, sft, x2, *dist = phases
        assert [c.init_from for c in phases] == ["base"] * 8 and [c.preset for c in phases[:3]] == ["teacher", "student", "teacher"]
        assert (teacher.epochs, teacher.ckpt_per_epoch, x2.epochs) == (3, 2, 6) and x2.out_dir.endswith(f"seed{s}/teacher_x2")
        assert sft.epochs == 6 * 2 and all(c.teacher_dir == teacher.out_dir for c in dist)
        assert {(c.stages, c.steps_per_stage, c.pool_start) for c in dist} == {(6, 2 * spe, 0.0)}
        assert sft.epochs * spe == dist[0].stages * dist[0].steps_per_stage  # every student, the same steps
    seen.clear()
    reproduce.run_all(reproduce.ReproduceConfig(out_dir=str(tmp_path), base="none", protocol="k4"))
    assert {c.init_from for c in seen} == {""} and {(c.stages, c.pool_start) for c in seen[2:]} == {(4, 0.5)}
    assert all(c.out_dir.endswith("_k4") for c in seen[2:])


def test_the_bases_vocabulary_covers_every_split_and_the_clean_control():
    tok = torch.load(plumbing.BASES["student"][0], weights_only=True)["vocab"]
    tok = data.Tokenizer(tok)
    for spec in ("default", "default:0"):
        for split, exs in domains.load(spec).items():
            assert all(1 not in tok.encode(ex["prompt"] + ex["answer"]) for ex in exs), (spec, split)  # no UNK anywhere


def test_reproduce_pairs_the_bases_with_the_default_world_only(tiny_domain):
    assert reproduce.ReproduceConfig().base == "pretrained" and reproduce.ReproduceConfig(data="default:0").base == "pretrained"
    assert reproduce.ReproduceConfig(data=str(tiny_domain)).base == "none"  # a user's folder: today's random init
    assert reproduce.ReproduceConfig(data="default", base="none").base == "none"


def test_a_run_from_a_base_draws_the_same_dropout_for_the_same_seed():
    """torch seeds itself at random in each process: loading weights must not leave dropout unseeded."""
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(12345 + len(draws))  # whatever came before
        prepare("default", "teacher", seed, "base")
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
