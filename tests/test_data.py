import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from rayalign.config import DataConfig
from rayalign.data import (
    DataError, PreferenceExample, SFTExample, check_examples, collate, collate_pairs, encode,
    load_examples,
)


@pytest.fixture(scope="module")
def tok(tiny_gpt2):
    return AutoTokenizer.from_pretrained(tiny_gpt2)


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_sft_formats(tmp_path, tok):
    p = jsonl(tmp_path, [
        {"prompt": "sort: 3 1 =>", "completion": " 1 3"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ])
    a, b = load_examples(p, "sft", tok)
    assert a == SFTExample("sort: 3 1 =>", " 1 3")
    assert b.prompt == "<|user|>hi<|assistant|>" and b.response == "yo"


def test_preference_and_unpaired_parquet(tmp_path, tok):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": "q"}],
         "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}], "weight": 2.0},
    ]), p)
    (ex,) = load_examples(p, "preference", tok)
    assert ex == PreferenceExample("<|user|>q<|assistant|>", "good", "bad", 2.0)
    u = jsonl(tmp_path, [{"prompt": "q", "completion": "a", "label": False}])
    assert load_examples(u, "unpaired")[0].label is False


@pytest.mark.parametrize("row, kind, field, reason", [
    ({"prompt": "q"}, "sft", "completion", "missing"),
    ({"prompt": "  ", "completion": "a"}, "sft", "prompt", "empty string"),
    ({"prompt": 3, "completion": "a"}, "sft", "prompt", "got int"),
    ({"messages": [{"role": "user", "content": "q"}]}, "sft", "messages", "role 'assistant'"),
    ({"messages": [{"role": "user"}]}, "sft", "messages", "message 0"),
    ({"prompt": "q", "chosen": "a"}, "preference", "rejected", "missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": -1}, "preference", "weight", ">= 0"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": "x"}, "preference", "weight", "finite"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired", "label", "true or false"),
    ({"prompt": "q\ud800", "completion": "a"}, "sft", "prompt", "lone surrogate"),
    ({"prompt": "q", "chosen": "a", "rejected": "\udfff b"}, "preference", "rejected",
     "lone surrogate"),
    ({"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "sft", "messages", "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "q\ud800"}, {"role": "assistant", "content": "a"}]},
     "sft", "messages", "lone surrogate"),
    ({"prompt": [{"role": "tool", "content": "q"}], "chosen": "a", "rejected": "b"}, "preference",
     "prompt", "unknown role 'tool'"),
])
def test_bad_row_names_file_row_field(tmp_path, tok, row, kind, field, reason):
    good = {"sft": {"prompt": "q", "completion": "a"},
            "preference": {"prompt": "q", "chosen": "a", "rejected": "b"},
            "unpaired": {"prompt": "q", "completion": "a", "label": True}}[kind]
    p = jsonl(tmp_path, [good, good, row])
    with pytest.raises(DataError) as err:
        load_examples(p, kind, tok)
    assert (err.value.row, err.value.field) == (3, field)
    assert str(p) in str(err.value) and reason in str(err.value)


def test_invalid_utf8_names_file_row_and_column(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "q", "completion": "a"}\n\n{"prompt": "q\xff", "completion": "a"}\n')
    for load in (lambda: load_examples(p, "sft", tok),
                 lambda: check_examples(DataConfig(path=str(p)))):
        with pytest.raises(DataError) as err:
            load()
        assert (err.value.source, err.value.row) == (str(p), 3)
        assert "not UTF-8: byte 0xff at column 14" in str(err.value)


def test_check_examples_validates_messages_without_a_tokenizer(tmp_path):
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert check_examples(DataConfig(path=str(jsonl(tmp_path, [msgs] * 3)))) == 3
    bad = {"messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(DataError, match="row 2, field 'messages'.*role 'assistant'"):
        check_examples(DataConfig(path=str(jsonl(tmp_path, [msgs, bad]))))


def test_empty_response_is_a_response(tmp_path, tok):
    """A policy that stops at once samples "": a valid (bad) response, encoded as just EOS."""
    p = jsonl(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": ""}])
    (ex,) = load_examples(p, "preference")
    assert ex.rejected == "" and encode(tok, ex.prompt, ex.rejected, 8, 16)[1] == [tok.eos_token_id]


def test_bad_json_and_messages_without_tokenizer(tmp_path):
    with pytest.raises(DataError, match=r"row 2: invalid JSON"):
        load_examples(jsonl(tmp_path, [{"prompt": "q", "completion": "a"}, "{oops"]), "sft")
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="need a tokenizer"):
        load_examples(jsonl(tmp_path, [msgs]), "sft")
    with pytest.raises(DataError, match="unknown file type"):
        load_examples(tmp_path / "x.csv", "sft")


def test_encode_truncation_rules(tok):
    prompt, response = "sort: 1 2 3 4 5 6 7 8 9 =>", " 1 2 3 4 5 6 7 8 9"
    full_p = tok(prompt, add_special_tokens=False)["input_ids"]
    full_r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p, r = encode(tok, prompt, response, 64, 256)
    assert (p, r) == (full_p, full_r)
    p, r = encode(tok, prompt, response, 4, 7)
    assert p == full_p[-4:] and r == full_r[:3] and tok.eos_token_id not in r


def test_collate_masks_response_only():
    batch = collate([([1, 2], [3, 4, 5]), ([6], [7])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[False, False, True, True, True],
                                            [False, True, False, False, False]]


def test_collate_pairs_chosen_then_rejected(tok):
    b = collate_pairs(tok, ["q1", "q2"], ["a", "b"], ["c", "d"], 16, 32)
    assert b.input_ids.shape[0] == 4
    texts = [tok.decode(ids[m]) for ids, m in zip(b.input_ids, b.response_mask)]
    assert texts == ["a<|endoftext|>", "b<|endoftext|>", "c<|endoftext|>", "d<|endoftext|>"]
