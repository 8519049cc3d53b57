"""The Llama family against transformers (a test-only reference; random configs, nothing
downloaded): the same logits from a saved folder, the folder's tokenizer, clear refusals,
and the whole pipeline on tiny Llama-architecture models."""
import json
import shutil

import pytest
import torch

import plumbing
import data
import distill
import train_teacher as tt
from model import merge_lora

transformers = pytest.importorskip("transformers", reason="test-only dependency: pip install -r requirements-test.txt")
pytest.importorskip("safetensors", reason="optional extra: pip install safetensors")
tokenizers = pytest.importorskip("tokenizers", reason="optional extra: pip install tokenizers")

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
CONFIGS = {
    "llama3": lambda: transformers.LlamaConfig(**SHAPE, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-tied": lambda: transformers.LlamaConfig(**SHAPE, tie_word_embeddings=True, rms_norm_eps=1e-5),  # SmolLM2's shape
    "qwen2": lambda: transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True),  # biases on q, k, v
    "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=None, head_dim=24),  # head_dim != hidden / heads
    "gpt2": lambda: transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4),  # a local GPT-2 folder
}


def save(name, folder, **kw):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():  # random non-trivial norms and biases, so a missed one shows
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, **kw)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_a_saved_folder_gives_transformers_logits(name, tmp_path):
    ref = save(name, tmp_path)
    ours = plumbing.load_folder(tmp_path).eval()
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))  # past the original context of 16
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, rtol=0, atol=1e-5)
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())  # tied embeddings counted once, as there


def test_a_sharded_folder_loads_the_same_weights(tmp_path):
    save("llama3", tmp_path / "one")
    save("llama3", tmp_path / "shards", max_shard_size="50KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    a, b = plumbing.load_folder(tmp_path / "one").state_dict(), plumbing.load_folder(tmp_path / "shards").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, field", [
    (dict(model_type="mixtral"), "model_type"),
    (dict(num_local_experts=8), "num_local_experts"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096), "sliding_window"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "rope_parameters"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_an_unsupported_config_is_refused_naming_its_field(change, field, tmp_path):
    save("llama3", tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**c, **change}))
    with pytest.raises(plumbing.UnsupportedModel, match=f"config.json: field '{field}'"):
        plumbing.load_folder(tmp_path)


# What each family's tokenizer.json puts around a text (its post-processor): Llama 3 starts every
# text with <|begin_of_text|>, Qwen2 and GPT-2 add nothing; Qwen2 also normalises to NFC.
STYLES = {
    None: dict(special=["<eos>"]),
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>"], post=lambda: tokenizers.processors.Sequence([
        tokenizers.processors.ByteLevel(trim_offsets=False),
        tokenizers.processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                 special_tokens=[("<|begin_of_text|>", 0)])])),
    "qwen2": dict(special=["<|endoftext|>"], post=lambda: tokenizers.processors.ByteLevel(trim_offsets=False),
                  normalizer=lambda: tokenizers.normalizers.NFC()),
    "gpt2": dict(special=["<|endoftext|>"], post=lambda: tokenizers.processors.ByteLevel(trim_offsets=True)),
}


def write_tokenizer(folder, texts, vocab_size=400, style=None):
    """A small byte-level BPE trained on texts, in one family's style (STYLES), saved as the
    folder's tokenizer.json; the style's special tokens are ids 0, 1, ..."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    st = STYLES[style]
    if "post" in st:
        tk.post_processor = st["post"]()
    if "normalizer" in st:
        tk.normalizer = st["normalizer"]()
    tk.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=st["special"],
                                                                   initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / "tokenizer.json"))
    return tk


def test_the_folders_tokenizer_is_the_tokenizers_library(tmp_path):
    texts = ["Question: Where does Wendy Clark live?\nAnswer: London", "文: 田中太郎は東京の桜電機に入った。"]
    ref = write_tokenizer(tmp_path, texts * 20)
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=400, eos_token_id=0)))
    tok = plumbing.FolderTokenizer(tmp_path)
    for t in texts + ["Review: The room was not wonderful.\nSentiment: negative"]:
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False).ids and tok.decode(tok.encode(t)) == t
    assert tok.eot == 0 and tok.vocab_size == 400 and len(tok.ids["sha"]) == 16
    assert plumbing.tokenizer(tok.ids).identity == tok.identity  # what a checkpoint stores brings the same tokenizer back
    # several end tokens, as Llama 3's instruction-tuned configs list them: answers end with the first
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=400, eos_token_id=[7, 9, 11])))
    several = plumbing.FolderTokenizer(tmp_path)
    assert several.eot == 7 and several.identity != tok.identity  # a student ending answers otherwise is refused
    x, y, mask = data.make_batch([(several.encode("Question:"), several.encode(" London"))], [0], several.eot)
    assert y[mask][-1].item() == 7
    for bad in ([], None):
        (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=400, eos_token_id=bad)))
        with pytest.raises(plumbing.UnsupportedModel, match="'eos_token_id' is missing or empty"):
            plumbing.FolderTokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=400, eos_token_id=0)))
    (tmp_path / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text().replace('"<eos>"', '"<end>"'))
    with pytest.raises(plumbing.UnsupportedModel, match="tokenizer.json has changed since the run was made"):
        plumbing.tokenizer(tok.ids)


@pytest.mark.parametrize("style, bos", [("llama3", [0]), ("qwen2", []), ("gpt2", [])])
def test_text_is_encoded_as_the_base_model_saw_it(style, bos, tmp_path):
    """The prompt starts with whatever the folder's own tokenizer starts a text with (the
    tokenizers library's encode with add_special_tokens=True); the answer is the same ids
    either way, and the loss mask still covers the answer and its end token alone."""
    texts = ["Question: Where does Wendy Clark live?\nAnswer: London", "Café: naïve façade", "文: 田中太郎は東京"]
    ref = write_tokenizer(tmp_path, texts * 20, style=style)
    eot = len(STYLES[style]["special"]) - 1
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=400, eos_token_id=eot)))
    tok = plumbing.FolderTokenizer(tmp_path)
    assert tok.bos == bos
    for t in texts + ["Cafe\u0301 (NFD)"]:
        assert tok.bos + tok.encode(t) == ref.encode(t, add_special_tokens=True).ids
    exs = [dict(prompt="Question: Where does Wendy Clark live?\nAnswer:", answer=" London"), dict(prompt="", answer="Café")]
    enc = data.encode(exs, tok, 64)
    assert enc[0][0] == ref.encode(exs[0]["prompt"], add_special_tokens=True).ids
    assert enc[0][1] == ref.encode(" London", add_special_tokens=False).ids
    assert enc[1][0] == (bos or [eot])  # no prompt: the BOS alone starts the text (EOT where there is none)
    x, y, mask = data.make_batch(enc, [0, 1], tok.eot)
    for b in range(2):
        assert y[b][mask[b]].tolist() == enc[b][1] + [eot] and x[b, 0].item() == enc[b][0][0]


def test_a_post_processor_that_ends_texts_otherwise_is_refused(tmp_path):
    tk = write_tokenizer(tmp_path, ["Question: where? Answer: here"] * 20, style="llama3")
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="$A <|begin_of_text|>", special_tokens=[("<|begin_of_text|>", 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=400, eos_token_id=1)))
    with pytest.raises(plumbing.UnsupportedModel, match=r"field 'post_processor' ends every text with \[0\], not the end token 1"):
        plumbing.FolderTokenizer(tmp_path)


def test_tokenizers_are_the_same_by_content_not_by_bytes(tmp_path):
    """Two tokenizer.json files of one content (keys reordered, other whitespace, merges written
    as pairs, the normaliser an empty Sequence) are one tokenizer; one merge or one special
    token changed is another, and the refusal names it."""
    write_tokenizer(tmp_path, ["Question: Where does Wendy Clark live?\nAnswer: London"] * 20, style="llama3")
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=400, eos_token_id=1)))
    j = json.loads((tmp_path / "tokenizer.json").read_text())
    a = plumbing.FolderTokenizer(tmp_path)

    def variant(name, change):
        v = json.loads(json.dumps(j))
        change(v)
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "config.json", tmp_path / name)
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(v, indent=4, sort_keys=True))
        return plumbing.FolderTokenizer(tmp_path / name)

    def same(v):
        v["model"]["merges"] = [m.split(" ") if isinstance(m, str) else " ".join(m) for m in v["model"]["merges"]]
        v["normalizer"] = dict(type="Sequence", normalizers=[])
    b = variant("same", same)
    assert (tmp_path / "same" / "tokenizer.json").read_bytes() != (tmp_path / "tokenizer.json").read_bytes()
    assert b.identity == a.identity and plumbing.tokenizer_difference(a.content, b.content) is None
    assert plumbing.tokenizer(b.ids).identity == a.identity  # what a checkpoint stores still reads the file back

    def merge(v):
        v["model"]["merges"][5] = v["model"]["merges"][6]
    c = variant("merge", merge)
    assert c.identity != a.identity
    assert plumbing.tokenizer_difference(a.content, c.content).startswith("merges differ at entry 5")

    def special(v):
        v["added_tokens"][1]["content"] = "<|eot_id|>"
    d = variant("special", special)
    assert d.identity != a.identity
    assert plumbing.tokenizer_difference(a.content, d.content) == \
        "special tokens differ at entry 1 ((1, '<|end_of_text|>', True) vs (1, '<|eot_id|>', True))"


@pytest.fixture(scope="module")
def llama_folders(tiny_domain, tmp_path_factory):
    """A teacher (2 layers x 64) and a student (1 layer x 32) of the Llama architecture from
    random weights, sharing a tokenizer trained on the tiny domain; and a second student
    folder whose tokenizer.json differs."""
    root = tmp_path_factory.mktemp("llama")
    texts = [ex["prompt"] + ex["answer"] for s in ("train", "val", "test") for ex in data.load_domain(str(tiny_domain))[s]]
    for name, shape in (("teacher", dict(hidden_size=64, num_hidden_layers=2)), ("student", dict(hidden_size=32, num_hidden_layers=1)),
                        ("other", dict(hidden_size=32, num_hidden_layers=1))):
        cfg = transformers.LlamaConfig(**{**SHAPE, **shape, "vocab_size": 400, "intermediate_size": 2 * shape["hidden_size"],
                                          "max_position_embeddings": 128, "eos_token_id": 1, "bos_token_id": 0})
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / name)
        write_tokenizer(root / name, texts, vocab_size=400 if name != "other" else 390, style="llama3")
    return root


def test_a_tiny_llama_pipeline_runs_end_to_end(tiny_domain, llama_folders, tmp_path):
    kw = dict(data=str(tiny_domain), epochs=2, batch_size=16, ckpt_per_epoch=2, log_every=1000, lr=1e-3, probe_size=16)
    tt.train(tt.TrainConfig(**kw, init_from=str(llama_folders / "teacher"), out_dir=str(tmp_path / "teacher")))
    tt.train(tt.TrainConfig(**kw, init_from=str(llama_folders / "student"), out_dir=str(tmp_path / "sft")))
    d = dict(data=str(tiny_domain), teacher_dir=str(tmp_path / "teacher"), anchor_dir=str(tmp_path / "sft"), stages=2,
             steps_per_stage=4, probe_size=16, log_every=1000, pool_start=0.0, lr=1e-3, init_from=str(llama_folders / "student"))
    res = distill.main(distill.DistillConfig(**d, method="scd", aw=True, out_dir=str(tmp_path / "scd_aw")))
    sched = json.loads((tmp_path / "scd_aw" / "schedule.json").read_text())
    assert len(sched["stages"]) == 2 and all(len(s["kl_best"]) == 4 for s in sched["stages"])
    assert 0 <= res["best"]["acc"] <= 1
    model, tok = plumbing.load_checkpoint(tmp_path / "scd_aw" / "best.pt")
    assert model.config.arch == "llama" and tok.identity == plumbing.FolderTokenizer(llama_folders / "student").identity
    # a student folder with another tokenizer.json is refused in one line, before anything is written
    with pytest.raises(plumbing.RunError, match=r"another tokenizer than the student \(vocabulary differ at"):
        distill.main(distill.DistillConfig(**{**d, "init_from": str(llama_folders / "other")}, method="kd",
                                           out_dir=str(tmp_path / "mismatch")))
    assert not (tmp_path / "mismatch").exists()


def test_a_name_that_would_need_a_download_says_what_to_do(tiny_domain, tmp_path):
    with pytest.raises(plumbing.RunError, match=r"nothing is downloaded here: fetch it first \(huggingface-cli download "
                                              r"meta-llama/Llama-3.2-1B --local-dir models/Llama-3.2-1B\)"):
        tt.train(tt.TrainConfig(data=str(tiny_domain), init_from="meta-llama/Llama-3.2-1B", out_dir=str(tmp_path / "x")))


def test_scd_over_an_adapter_trail_chooses_what_it_chooses_over_the_trail_merged(tiny_domain, llama_folders, tmp_path):
    """A tiny Llama teacher fine-tuned with rank-4 adapters (a trail of adapter files), and the
    same trail with every checkpoint merged into full weights (merge_lora) and its probe scored
    again: SCD+AW chooses the same checkpoint at every stage, from the same terms. The students
    train adapters too: their best.pt holds the adapters alone."""
    kw = dict(data=str(tiny_domain), epochs=2, batch_size=16, ckpt_per_epoch=2, log_every=1000, lr=1e-2, probe_size=16)
    tt.train(tt.TrainConfig(**kw, init_from=str(llama_folders / "teacher"), lora_rank=4, out_dir=str(tmp_path / "trail")))
    tt.train(tt.TrainConfig(**kw, init_from=str(llama_folders / "student"), lora_rank=4, out_dir=str(tmp_path / "sft")))
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(tmp_path / "trail" / "manifest.json", merged)  # no probe file: distill scores the merged candidates itself
    for c in json.loads((merged / "manifest.json").read_text())["checkpoints"]:
        model, tok = plumbing.load_checkpoint(tmp_path / "trail" / c["file"])
        plumbing.atomic_save(plumbing.checkpoint_dict(merge_lora(model), tok), merged / c["file"])
        assert "lora_A" not in str(torch.load(merged / c["file"], weights_only=True)["model"].keys())
    d = dict(data=str(tiny_domain), anchor_dir=str(tmp_path / "sft"), stages=3, steps_per_stage=4, probe_size=16, log_every=1000,
             pool_start=0.0, lr=1e-2, init_from=str(llama_folders / "student"), lora_rank=4, method="scd", aw=True)
    for trail in ("trail", "merged"):
        distill.main(distill.DistillConfig(**d, teacher_dir=str(tmp_path / trail), out_dir=str(tmp_path / f"scd_{trail}")))
    a, b = (json.loads((tmp_path / f"scd_{t}" / "schedule.json").read_text())["stages"] for t in ("trail", "merged"))
    assert [s["ckpt"] for s in a] == [s["ckpt"] for s in b]
    for sa, sb in zip(a, b):
        assert sa["kl_best"] == pytest.approx(sb["kl_best"], abs=1e-5) and sa["kl_student"] == pytest.approx(sb["kl_student"], abs=1e-5)
    assert max(s["kl_best"][0] for s in a) > 1e-3  # the candidates differ: the choice is not among equals
    best = torch.load(tmp_path / "scd_trail" / "best.pt", weights_only=True)
    assert best["lora"]["rank"] == 4 and all(".lora_" in k for k in best["model"])


def test_the_whole_comparison_runs_on_your_folders_with_adapters(tiny_domain, llama_folders, tmp_path):
    """reproduce.py on a teacher folder, a student folder and a data folder: the teacher's trail
    is adapter files, every student trains adapters, and the report is written in the run's folder."""
    from lab import reproduce
    cfg = reproduce.ReproduceConfig(data=str(tiny_domain), out_dir=str(tmp_path / "runs"), teacher_from=str(llama_folders / "teacher"),
                                    student_from=str(llama_folders / "student"), teacher_lora=4, student_lora=4, seeds=1,
                                    teacher_epochs=2, ckpt_per_epoch=1, stage_epochs=1, stages=2, probe_size=8, teacher_lr=1e-2,
                                    student_lr=1e-2)
    text = reproduce.main(cfg).read_text()
    assert cfg.base == "none" and (tmp_path / "runs" / "report" / "results.md").exists()
    assert "the teacher fine-tuned from" in text and "with rank-4 adapters, the students from" in text and "| SCD+AW |" in text
    conf = lambda d: json.loads((tmp_path / "runs" / "seed0" / d / "config.json").read_text())
    assert (conf("teacher")["init_from"], conf("teacher")["lora_rank"]) == (str(llama_folders / "teacher"), 4)
    for d in ("student_sft", "kd_k4", "scd_aw_k4"):
        assert (conf(d)["init_from"], conf(d)["lora_rank"]) == (str(llama_folders / "student"), 4)
    teacher = json.loads((tmp_path / "runs" / "seed0" / "teacher" / "manifest.json").read_text())
    assert all(torch.load(tmp_path / "runs" / "seed0" / "teacher" / c["file"], weights_only=True)["lora"]["rank"] == 4
               for c in teacher["checkpoints"])
    assert set(torch.load(tmp_path / "runs" / "seed0" / "scd_aw_k4" / "best.pt", weights_only=True)["model"]) == \
        set(torch.load(tmp_path / "runs" / "seed0" / "student_sft" / "ckpt_000012.pt", weights_only=True)["model"])
    with pytest.raises(plumbing.RunError, match="--student_lora 4: adapters need a base to adapt"):
        reproduce.main(reproduce.ReproduceConfig(data=str(tiny_domain), out_dir=str(tmp_path / "x"), student_lora=4))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, lora", [("gpt2", 0), ("llama3", 4), ("qwen2", 0), ("llama-tied", 4)])
def test_an_exported_checkpoint_is_a_folder_transformers_and_init_from_read_alike(name, lora, tmp_path):
    """lab.export writes a checkpoint (adapters merged into their base) as a Hugging Face folder:
    transformers' AutoModelForCausalLM gives our model's logits from it, and it reads back here
    (load_folder, FolderTokenizer: what --init_from does) as the same model and tokenizer."""
    from lab import export
    src = tmp_path / "src"
    save(name, src)
    write_tokenizer(src, ["Question: where? Answer: here"] * 20, style="llama3")
    c = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**c, "bos_token_id": 0, "eos_token_id": 1}))  # <|begin_of_text|>, <|end_of_text|>
    model, tok = plumbing.load_folder(src), plumbing.FolderTokenizer(src)
    if lora:  # adapters with a non-zero update, so that a merge without its alpha / r would show
        plumbing.adapt(model, src, lora)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.05)
    plumbing.atomic_save(plumbing.checkpoint_dict(model, tok), tmp_path / "best.pt")
    ours = plumbing.load_checkpoint(tmp_path / "best.pt")[0]
    out = export.export(tmp_path / "best.pt", tmp_path / "hf", dtype="float32")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    back = plumbing.load_folder(out).eval()
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, ours(idx), rtol=0, atol=1e-5)
        torch.testing.assert_close(back(idx), ours(idx), rtol=0, atol=1e-5)
    assert plumbing.FolderTokenizer(out).identity == tok.identity and not back.lora
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eot
    half = export.export(tmp_path / "best.pt", tmp_path / "hf16", dtype="bfloat16") / "model.safetensors"
    assert abs(half.stat().st_size / (out / "model.safetensors").stat().st_size - 0.5) < 0.01
    assert {t.dtype for _, t in plumbing.read_safetensors(half)} == {torch.bfloat16}
    with pytest.raises(plumbing.RunError, match="is not empty"):
        export.export(tmp_path / "best.pt", tmp_path / "hf")
