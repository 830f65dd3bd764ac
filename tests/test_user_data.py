"""A user's own data: formats, row shapes, exact loss masks, column mapping, partitions, bad input."""

import json
import re

import numpy as np
import pytest

from conftest import tiny_config
from splitlora.data import encode_data_file, prepare_data
from splitlora.data.batching import IGNORE
from splitlora.data.chat import encode_conversations
from splitlora.errors import UserError

# A small ChatML-like template with {% generation %} marks, so that transformers' own assistant mask
# exists to compare with; CHAT is the same template without the marks (what most models ship).
CHAT_GEN = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
            "{{ m['content'] }}<|end|>\n{% endgeneration %}{% else %}{{ m['content'] }}<|end|>\n{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = re.sub(r"\{% (end)?generation %\}", "", CHAT_GEN)
# SmolLM2-Instruct's template (as its converted GGUF carries it): adds a system turn when none is given.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Zizzi?"},
     {"role": "assistant", "content": "In the city centre."}, {"role": "user", "content": "Cheap?"},
     {"role": "assistant", "content": "Yes, under 20 pounds."}],
    [{"role": "user", "content": "name[Aromi], eatType[pub]"}, {"role": "assistant", "content": "Aromi is a pub."}],
]


def conv_rows(n):
    return [{"messages": CONVS[i % 2], "site": ["alice", "bob", "carol"][i % 3]} for i in range(n)]


def pc_rows(n):
    return [{"question": f"Q{i}: what is {i} plus one?", "answer": f"It is {i + 1}.", "site": "ab"[i % 2]}
            for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(data, **kw):
    base = dict(data=str(data), val_fraction=0.0, clients=2, max_length=256)
    base.update(kw)
    return tiny_config(**base)


# ---- loss masks, token by token -------------------------------------------------------------------

def test_conversation_mask_equals_the_templates_assistant_mask(tiny_gpt2):
    """Prefix-derived assistant spans (templates without marks) give exactly the tokens and mask that
    apply_chat_template returns with return_assistant_tokens_mask on the marked template."""
    tok = tiny_gpt2.tokenizer
    ref = tok.apply_chat_template(CONVS, chat_template=CHAT_GEN, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, masks = encode_conversations(tok, CHAT, CONVS, ["a", "b"])
    assert ids == [list(x) for x in ref["input_ids"]]
    assert masks == [list(m) for m in ref["assistant_masks"]]
    assert all(any(m) and not all(m) for m in masks)
    ids2, masks2 = encode_conversations(tok, CHAT_GEN, CONVS, ["a", "b"])  # the marked template's own path
    assert (ids2, masks2) == (ids, masks)


def test_conversation_mask_with_smollm2_template(tiny_gpt2):
    """SmolLM2's template has no marks: the tokens are apply_chat_template's, and the labelled tokens are
    exactly each assistant turn's content and its end-of-turn marker, nothing else (system kept, unlabelled)."""
    tok = tiny_gpt2.tokenizer
    ids, masks = encode_conversations(tok, SMOLLM2, CONVS, ["a", "b"])
    for conv, row, mask in zip(CONVS, ids, masks):
        assert row == list(tok.apply_chat_template(conv, chat_template=SMOLLM2, tokenize=True, return_dict=True)["input_ids"])
        runs, current = [], []
        for t, m in zip(row, mask):
            if m:
                current.append(t)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        expected = [t["content"] + "<|im_end|>\n" for t in conv if t["role"] == "assistant"]
        assert [tok.decode(r) for r in runs] == expected


def test_prepared_labels_per_shape(tmp_path, tiny_gpt2):
    """prompt/completion: loss on the completion and eos only; text: on every token; messages: the mask."""
    tok = tiny_gpt2.tokenizer
    eos = tok.eos_token_id
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: two?", "completion": " A: 2"}])
    item = encode_data_file(cfg_for(pc), tok, str(pc))[0]
    p, c = tok("Q: two?")["input_ids"], tok(" A: 2")["input_ids"] + [eos]
    assert item.input_ids == p + c and item.labels == [IGNORE] * len(p) + c
    tx = write_jsonl(tmp_path / "tx.jsonl", [{"text": "hello there"}])
    item = encode_data_file(cfg_for(tx), tok, str(tx))[0]
    assert item.input_ids == item.labels == tok("hello there")["input_ids"] + [eos]
    ms = write_jsonl(tmp_path / "ms.jsonl", [{"messages": c} for c in CONVS])
    items = encode_data_file(cfg_for(ms, data_format={"chat_template": CHAT}), tok, str(ms))
    ids, masks = encode_conversations(tok, CHAT, CONVS, ["a", "b"])
    for item, i, m in zip(items, ids, masks):
        assert item.input_ids == i and item.labels == [t if k else IGNORE for t, k in zip(i, m)]
    # conversational prompt/completion (TRL): loss on the completion's assistant turn only
    cp = write_jsonl(tmp_path / "cp.jsonl", [{"prompt": CONVS[0][:4], "completion": CONVS[0][4:]}])
    item = encode_data_file(cfg_for(cp, data_format={"chat_template": CHAT}), tok, str(cp))[0]
    labelled = tok.decode([t for t in item.labels if t != IGNORE])
    assert item.input_ids == ids[0] and labelled == "Yes, under 20 pounds.<|end|>\n"


# ---- formats and column mapping ---------------------------------------------------------------------

def test_every_format_gives_the_same_rows(tmp_path, tiny_gpt2):
    import datasets

    rows = [{"prompt": r["question"], "completion": r["answer"]} for r in pc_rows(6)]
    jl = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "a.jsonl", rows[:3])
    write_jsonl(tmp_path / "folder" / "b.jsonl", rows[3:])
    want = list(encode_data_file(cfg_for(jl), tiny_gpt2.tokenizer, str(jl)))
    assert len(want) == 6
    for name in ("d.json", "d.csv", "d.parquet", "saved", "folder"):
        got = list(encode_data_file(cfg_for(tmp_path / name), tiny_gpt2.tokenizer, str(tmp_path / name)))
        assert got == want, name


def test_column_mapping_and_data_block(tmp_path, tiny_gpt2):
    from splitlora.config import RunConfig

    path = write_jsonl(tmp_path / "qa.jsonl", pc_rows(4))
    cfg = cfg_for(path, data_format={"columns": "prompt=question,completion=answer"})
    items = encode_data_file(cfg, tiny_gpt2.tokenizer, str(path))
    p = tiny_gpt2.tokenizer("Q0: what is 0 plus one?")["input_ids"]
    assert items[0].labels[:len(p)] == [IGNORE] * len(p) and items[0].labels[len(p)] != IGNORE
    block = RunConfig.from_dict({"model": "tiny-gpt2", "data": {"path": str(path), "columns": "prompt=question,completion=answer"}})
    assert block.data == str(path) and block.data_format.columns == "prompt=question,completion=answer"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_gpt2):
    """A short run on a conversational JSONL, its template given as --chat-template FILE."""
    from splitlora.simulation.run import train

    root = tmp_path_factory.mktemp("chat")
    path = write_jsonl(root / "chat.jsonl", conv_rows(12))
    tpl = root / "chat.jinja"
    tpl.write_text(CHAT)
    cfg = cfg_for(path, val_fraction=0.2, steps=2, data_format={"chat_template": str(tpl)})
    assert cfg.data_format.chat_template == CHAT  # the file's text travels in the config
    return train(cfg, root / "run", progress=False, loaded=tiny_gpt2), root


def test_a_conversational_jsonl_trains(chat_run):
    result, _ = chat_run
    assert np.isfinite(result.val_loss) and (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_eval_on_the_users_task(chat_run, monkeypatch):
    """Predictions JSONL (one per row, written before scoring), then loss, perplexity, BLEU, ROUGE-L, EM."""
    from splitlora.eval import task
    from splitlora.eval.generate import evaluate_run

    result, root = chat_run
    test = write_jsonl(root / "test.jsonl", conv_rows(3))
    out = evaluate_run(result.out_dir, data=str(test), beams=1, max_new_tokens=3, progress=False, show=False)
    rows = [json.loads(line) for line in (result.out_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["Yes, under 20 pounds.", "Aromi is a pub.", "Yes, under 20 pounds."]
    assert rows[1]["prompt"] == "<|user|>name[Aromi], eatType[pub]<|end|>\n<|assistant|>"
    assert out["n_rows"] == 3 and out["perplexity"] == pytest.approx(np.exp(out["loss"]))
    assert {k: out[k] is not None for k in task.TASK_METRICS} == dict.fromkeys(task.TASK_METRICS, True)
    (result.out_dir / "predictions.jsonl").unlink()
    monkeypatch.setattr(task, "score_task", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        evaluate_run(result.out_dir, data=str(test), beams=1, max_new_tokens=2, progress=False, show=False)
    assert len((result.out_dir / "predictions.jsonl").read_text().splitlines()) == 3


def test_task_scores():
    from splitlora.eval.task import score_task

    refs = ["the cat sat on the mat all day", "a dog ran in the park at noon"]
    same = score_task(list(refs), refs)
    assert same == pytest.approx({"bleu": 100.0, "rouge_l": 100.0, "exact_match": 100.0})
    half = score_task([refs[0], "nothing"], refs)
    assert half["exact_match"] == 50.0 and half["rouge_l"] == pytest.approx(50.0) and 0 < half["bleu"] < 100


# ---- partitions and validation data -------------------------------------------------------------

def test_partition_by_column_and_by_file(tmp_path, tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    path = write_jsonl(tmp_path / "chat.jsonl", conv_rows(9))
    data = prepare_data(cfg_for(path, clients=3, partition="column:site", data_format={"chat_template": CHAT}), tok)
    assert data.client_names == ["alice", "bob", "carol"]
    sites = data.train_rows["site"]
    assert [{sites[i] for i in ix} for ix in data.client_indices] == [{"alice"}, {"bob"}, {"carol"}]
    assert sorted(i for ix in data.client_indices for i in ix) == list(range(9))
    with pytest.raises(UserError, match="gives 3 clients.*--clients 3"):
        prepare_data(cfg_for(path, clients=2, partition="column:site", data_format={"chat_template": CHAT}), tok)
    sites_dir = tmp_path / "sites"
    sites_dir.mkdir()
    write_jsonl(sites_dir / "alice.jsonl", pc_rows(3))
    write_jsonl(sites_dir / "bob.jsonl", pc_rows(5))
    data = prepare_data(cfg_for(sites_dir, partition="files", data_format={"columns": "prompt=question,completion=answer"}), tok)
    assert data.client_names == ["alice", "bob"] and [len(ix) for ix in data.client_indices] == [3, 5]
    data = prepare_data(cfg_for(sites_dir, partition="dirichlet:0.1", partition_key="site",
                                data_format={"columns": "prompt=question,completion=answer"}), tok)
    assert sorted(i for ix in data.client_indices for i in ix) == list(range(8))


def test_val_data_and_val_fraction(tmp_path, tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    train_path = write_jsonl(tmp_path / "train.jsonl", pc_rows(10))
    val_path = write_jsonl(tmp_path / "val.jsonl", pc_rows(3))
    fmt = {"columns": "prompt=question,completion=answer"}
    data = prepare_data(cfg_for(train_path, data_format={**fmt, "val_data": str(val_path)}), tok)
    assert len(data.train) == 10 and len(data.val) == 3
    data = prepare_data(cfg_for(train_path, val_fraction=0.3, data_format=fmt), tok)
    assert len(data.train) == 7 and len(data.val) == 3


def test_converted_smollm2_keeps_its_chat_template():
    from splitlora.models.loading import cache_dir

    where = cache_dir() / "models" / "smollm2-135m"
    if not (where / "tokenizer_config.json").is_file():
        pytest.skip("smollm2-135m is not converted in this cache")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(where))
    assert tok.chat_template == SMOLLM2


# ---- bad input: one line, naming the file and row ------------------------------------------------

def bad(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name,content,kw,needle", [
    ("a.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', {}, r"a\.jsonl, line 2: malformed JSON"),
    ("a.jsonl", b'{"prompt": "a", "completion": "\xff"}\n', {}, r"line 1: not UTF-8"),
    ("a.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n', {}, r"row 2: field 'completion' is missing or empty"),
    ("a.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', {}, r"row 2: field 'completion' is missing"),
    ("a.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", {"data_format": {"chat_template": CHAT}}, r"row 1: the conversation has no assistant turn"),
    ("a.jsonl", json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}) + "\n", {"data_format": {"chat_template": CHAT}}, r"row 1: unknown role 'robot'"),
    ("a.jsonl", json.dumps({"messages": CONVS[1]}) + "\n", {}, r"no chat template: pass one with --chat-template FILE"),
    ("a.jsonl", json.dumps({"q": "a", "a": "b"}) + "\n", {"data_format": {"columns": "prompt=question"}}, r"'question', which is not a column"),
    ("a.jsonl", json.dumps({"q": "a", "a": "b"}) + "\n", {}, r"cannot tell the row shape"),
    ("a.jsonl", json.dumps({"prompt": "a " * 80, "completion": "b"}) + "\n", {"max_length": 64}, r"max_length 64 leaves no completion tokens"),
    ("a.jsonl", "", {}, r"a\.jsonl is empty"),
    ("a.csv", "prompt,completion\n", {}, r"a\.csv has no rows"),
    ("a.txt", "hello", {}, r"unknown format '.txt'"),
])
def test_bad_input_is_one_line(tmp_path, tiny_gpt2, name, content, kw, needle):
    path = bad(tmp_path, name, content)
    with pytest.raises(UserError, match=needle) as info:
        prepare_data(cfg_for(path, clients=1, **kw), tiny_gpt2.tokenizer)
    assert "\n" not in str(info.value)


def test_bad_input_on_the_command_line(tmp_path, capsys):
    from splitlora.cli import main

    path = bad(tmp_path, "a.jsonl", '{"prompt": "a", "completion": "b"}\n{oops}\n')
    assert main(["train", "--model", "tiny-gpt2", "--data", str(path), "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.jsonl, line 2: malformed JSON" in err[0]
    assert main(["train", "--model", "tiny-gpt2", "--chat-template", str(tmp_path / "none.jinja"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "chat template file not found" in capsys.readouterr().err


def test_a_hub_id_offline_is_one_line(tiny_gpt2):
    with pytest.raises(UserError, match="not a local path and could not be read as a hub data set"):
        prepare_data(cfg_for("nobody-here/no-such-data-set"), tiny_gpt2.tokenizer)


def test_e2e_rows_encode_as_the_papers_prompt(e2e_dir, tiny_gpt2):
    """E2E through datasets gives the rows, split, encodings and partition of the plain CSV reading:
    whole MR groups held out, prompt_template(mr) + ' ref<eos>', loss on the reference."""
    from splitlora.data.batching import encode_labelled, encode_all
    from splitlora.data.e2e import read_e2e_csv
    from splitlora.data.partition import partition

    tok = tiny_gpt2.tokenizer
    cfg = tiny_config(data=str(e2e_dir / "devset.csv"), val_fraction=0.1, max_length=40, clients=3,
                      partition="dirichlet:0.5")  # 40: some rows are dropped, as before
    examples = read_e2e_csv(e2e_dir / "devset.csv")
    mrs = sorted({ex.mr for ex in examples})
    val_mrs = {mrs[i] for i in np.random.default_rng(cfg.seed).permutation(len(mrs))[:round(len(mrs) * 0.1)]}
    kept, train = encode_labelled([e for e in examples if e.mr not in val_mrs], tok, cfg.prompt_template, cfg.max_length)
    val = encode_all([e for e in examples if e.mr in val_mrs], tok, cfg.prompt_template, cfg.max_length)
    parts = partition(len(kept), cfg.clients, cfg.partition, cfg.seed,
                      key_of=lambda i: kept[i].slots().get(cfg.partition_key, ""))
    data = prepare_data(cfg, tok)
    assert list(data.train) == train and list(data.val) == val and data.client_indices == parts
    assert list(data.train_examples) == kept
