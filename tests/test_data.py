import json
from contextlib import nullcontext

import pytest
import torch
from torch.nn import functional as F

import data
import scd

# ids from tiktoken.get_encoding("gpt2")'s rules built from OpenAI's original encoder.json and
# vocab.bpe (checked against tiktoken's own sha256 for them), not from the file we ship
GPT2_IDS = {
    "Hello world": [15496, 995],
    "The quick brown fox jumps over the lazy dog.": [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    "It's 2026, isn't it?  Yes!": [1026, 338, 1160, 2075, 11, 2125, 470, 340, 30, 220, 3363, 0],
    "東京に住んでいます。": [30266, 109, 12859, 105, 28618, 19526, 237, 22174, 30640, 18566, 30159, 33623, 16764],
    "こんにちは世界": [46036, 22174, 28618, 2515, 94, 31676, 10310, 244, 45911, 234],
}


@pytest.mark.parametrize("text", GPT2_IDS)
def test_tokenizer_matches_gpt2_ids(text):
    tok = data.Tokenizer()
    assert tok.encode(text) == GPT2_IDS[text]
    assert tok.decode(GPT2_IDS[text]) == text


def test_end_of_text_in_user_text_is_not_a_special_token():
    assert data.GPT2_EOT not in data.Tokenizer().encode("a <|endoftext|> b")


def test_compact_vocabulary_round_trips_maps_unknown_ids_and_has_no_padding_rows():
    texts = ["Question: Where does Wendy Clark live?", "問: 田中彩の勤務先は?"]
    tok = data.Tokenizer.compact(texts)
    assert tok.eot == 0 and tok.vocab_size == len(tok.ids), "every row of the model's vocabulary must be a token"
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
        assert max(tok.encode(t)) < len(tok.ids)
    assert tok.encode(" London") == [1]  # one GPT-2 token (3576) outside the vocabulary: unknown
    assert tok.decode([1]) == ""
    assert data.Tokenizer(tok.ids).encode(texts[0]) == tok.encode(texts[0])  # rebuilt from the saved list
    assert data.Tokenizer().vocab_size == 50257


def test_batch_mask_covers_answer_and_its_end_token_despite_eot_padding():
    tok = data.Tokenizer()
    enc = [([10, 11, 12], [20, 21]), ([10], [20])]  # example 1 is padded with EOT
    x, y, mask = data.make_batch(enc, [0, 1], tok.eot)
    # sequence 0: 10 11 12 20 21 EOT -> x = 10 11 12 20 21, y = 11 12 20 21 EOT
    assert x[0].tolist() == [10, 11, 12, 20, 21] and y[0].tolist() == [11, 12, 20, 21, tok.eot]
    assert mask[0].tolist() == [False, False, True, True, True]  # 20, 21 and the end token
    # sequence 1: 10 20 EOT, then EOT padding; its own EOT is a target, the padding is not
    assert y[1].tolist() == [20, tok.eot, tok.eot, tok.eot, tok.eot]
    assert mask[1].tolist() == [True, True, False, False, False]


def test_prompt_and_padding_tokens_do_not_change_the_answer_loss():
    torch.manual_seed(0)
    logits_fn = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))  # position-wise "model"
    enc = [([3, 4, 5], [6, 7]), ([3], [9])]
    x, y, mask = data.make_batch(enc, [0, 1], eot=0)
    base = scd.gold_ce(logits_fn(x)[mask], y, mask)
    y2 = y.clone()
    y2[~mask] = torch.randint(1, 50, (int((~mask).sum()),))  # scramble every target outside the mask
    torch.testing.assert_close(scd.gold_ce(logits_fn(x)[mask], y2, mask), base)
    # and the per-example value is the plain mean CE over that example's answer targets
    ref = F.cross_entropy(logits_fn(x)[0][mask[0]], y[0][mask[0]])
    torch.testing.assert_close(base[0], ref)


def test_batch_order_is_a_seeded_pure_function_and_covers_each_epoch():
    lengths = [i % 7 for i in range(100)]
    per_epoch = 100 // 8
    epoch = [i for s in range(per_epoch) for i in data.batch_indices(lengths, 8, seed=3, step=s)]
    assert len(set(epoch)) == len(epoch) == per_epoch * 8
    assert data.batch_indices(lengths, 8, 3, 5) == data.batch_indices(lengths, 8, 3, 5)
    assert data.batch_indices(lengths, 8, 3, 5) != data.batch_indices(lengths, 8, 4, 5)
    assert data.batch_indices(lengths, 8, 3, 0) != data.batch_indices(lengths, 8, 3, per_epoch)  # new epoch


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return p


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a", "answer": "b"'], r"d.jsonl:2: malformed JSON"),
    (['{"prompt": "a"}'], r"d.jsonl:1: field 'answer' is missing"),
    (['{"prompt": "a", "answer": "b"}', '', '{"prompt": " ", "answer": "b"}'], r"d.jsonl:3: field 'prompt' is empty"),
    (['{"prompt": "a", "answer": 3}'], r"d.jsonl:1: field 'answer' must be a string, got int"),
    (['{"prompt": "a", "answer": "b", "subdomain": null}'], r"d.jsonl:1: field 'subdomain' must be a string"),
    (['["a", "b"]'], r"d.jsonl:1: expected a JSON object"),
    ([], r"d.jsonl: no examples \(empty file\)"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, lines, message):
    with pytest.raises(data.DataError, match=message):
        data.load_jsonl(write(tmp_path, lines))


def test_example_longer_than_the_context_is_an_error_naming_its_line(tmp_path):
    # "x " * 40 is 41 GPT-2 tokens ("x", 39 x " x", " "), plus "y": 42
    exs = data.load_jsonl(write(tmp_path, ['{"prompt": "a", "answer": "b"}', json.dumps({"prompt": "x " * 40, "answer": "y"})]))
    assert exs[0]["subdomain"] == "all"
    with pytest.raises(data.DataError, match=r"d.jsonl:2: field 'prompt'\+'answer' is 42 tokens, more than the model's context of 32"):
        data.encode(exs, data.Tokenizer(), block_size=32)


class Counter(torch.nn.Module):
    """A stand-in model that always predicts the next integer (after 4 comes 0, the end token)."""
    config = type("config", (), dict(block_size=16, vocab_size=5))

    def forward(self, x, positions, head=None):  # its "hidden state" is the one-hot logits, its head the identity
        h = torch.nn.functional.one_hot((x[positions] + 1) % 5, 5).float()
        return h if head is None else head(h, lambda t: t)


class Digits:
    eot, bos = 0, []
    encode = staticmethod(lambda text: [int(t) for t in text.split()])


def test_exact_match_without_decoding_needs_every_answer_token_and_the_end():
    exs = [dict(prompt="1 2", answer="3 4", subdomain="s"),  # 3, 4, then the end token: all predicted
           dict(prompt="1", answer="2 4", subdomain="s"),    # predicts 3 where 4 is the answer
           dict(prompt="2", answer="3", subdomain="s")]      # predicts 4 where the answer ends
    summary, recs = data.evaluate(Counter(), exs, Digits())
    assert [r["correct"] for r in recs] == [True, False, False]
    assert summary["acc"] == pytest.approx(1 / 3)


def test_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes("\ufeff".encode("utf-8") + b'{"prompt": "a", "answer": "b"}\n')
    assert data.load_jsonl(p)[0]["prompt"] == "a"


def test_entity_f1_only_where_answers_are_entity_lists():
    recs = [dict(subdomain="qa", prediction="London", answer="Paris", correct=False, loss=1.0),
            dict(subdomain="ner", prediction="PER: A", answer="PER: A", correct=True, loss=1.0)]
    s = data.summarize(recs)
    assert "f1/ner" in s and "f1/qa" not in s  # not a 0.000 that means nothing
    assert "f1/ner" not in data.summarize([{k: v for k, v in recs[1].items() if k != "prediction"}])  # nothing decoded


def test_summary_accuracy_per_subdomain_and_entity_f1_by_hand():
    recs = [dict(subdomain="ner_en", prediction="PER: A; LOC: B", answer="PER: A; LOC: B", correct=True, loss=1.0),
            dict(subdomain="ner_en", prediction="PER: A; ORG: C", answer="PER: A; LOC: C", correct=False, loss=2.0),
            dict(subdomain="qa_en", prediction="x", answer="y", correct=False, loss=3.0)]
    s = data.summarize(recs)
    # entities: tp = 2 + 1 = 3, fp = 1 (ORG: C), fn = 1 (LOC: C) -> F1 = 6 / 8
    assert s["f1/ner_en"] == pytest.approx(0.75)
    assert s["acc/ner_en"] == 0.5 and s["acc/qa_en"] == 0.0
    assert s["acc"] == pytest.approx(0.25)  # the mean over subdomains, not over examples
    assert s["loss"] == pytest.approx(2.0)


def test_evaluation_s_loss_is_the_method_s_gold_ce_made_in_pieces():
    """data.evaluate's per-example loss (the head in pieces, data.token_ce averaged by
    scd.per_example) is scd.gold_ce of the whole logits, the loss SFT trains on."""
    from model import GPTConfig, build
    torch.manual_seed(0)
    model = build(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50)).eval()
    enc = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]
    x, y, mask = data.make_batch(enc, [0, 1], 0)
    with torch.no_grad():
        whole = scd.gold_ce(model(x, positions=mask), y, mask)
        pieces = torch.cat([ce for ce, m in data.answer_pieces(model, enc, 0, "cpu", nullcontext(), data.token_ce, 2, chunk=2)])
    torch.testing.assert_close(scd.per_example(pieces, mask), whole)
    by_hand = torch.nn.functional.cross_entropy(model(x, positions=mask)[:3].detach(), y[mask][:3])  # example 0: 3 answer tokens
    assert whole[0].item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_a_probe_of_the_whole_training_set_has_no_resamples():
    assert data.probe_seeds(5, 3, size=16, n_train=96) == [5, 1005, 2005, 3005]
    assert data.probe_seeds(5, 3, size=96, n_train=96) == data.probe_seeds(5, 3, size=256, n_train=96) == [5]
    enc = [([i % 7 + 1] * (i % 5 + 1), [2]) for i in range(96)]
    assert sorted(data.probe_examples(enc, 256, 5)[0]) == sorted(data.probe_examples(enc, 256, 1005)[0]) == list(range(96))
