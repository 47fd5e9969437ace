"""Held-out arithmetic evaluation: scoring, tables, checkpoint lists, the CLI."""
import json
import re
from collections import Counter
from decimal import Decimal
from types import SimpleNamespace

import pytest
import torch

from rwkvlm.data.arithmetic import KINDS, make_eval_set
from rwkvlm.errors import UserError
from rwkvlm.infer.evaluate import (
    _summary, evaluate_with, expand_checkpoints, format_errors, format_table, labels_for, main, reply_of, restatement_of,
    score, write_json,
)


def test_restatement_is_the_answer_before_its_result():
    assert restatement_of("32 + 15 = 47") == "32 + 15"
    assert restatement_of("x = 12 - 5 = 7") == "x = 12 - 5"
    assert restatement_of("5 - (-3) = 8") == "5 - (-3)"
    assert restatement_of("no number") == "no number"


def test_reply_is_cut_at_the_blank_line_and_stripped():
    assert reply_of(" 3 + 3 = 6\n\nUser: next") == "3 + 3 = 6"
    assert reply_of(" x = 9 - 2 = 7  ") == "x = 9 - 2 = 7"
    assert reply_of("\n\n3") == ""


def _wrong(answer: str) -> str:
    """A well-formed but wrong answer: the final number off by one."""
    head, _, last = answer.rpartition(" = ")
    return f"{head} = {Decimal(last) + 1}"


def _cells(table: str, row: str) -> list:
    """The `correct/n` cells of a table row."""
    line = next(ln for ln in table.splitlines() if ln.split()[:1] == [row])
    return re.findall(r"\d+/\d+", line)


def test_fake_model_scores_each_kind_on_seen_and_unseen_wordings(tmp_path):
    """Right answers on every seen wording and on the unseen wordings of three kinds, wrong (off by
    one, or junk) elsewhere: the per-kind, per-split accuracy reaches the table and the JSON."""
    items = make_eval_set(160, seed=5)
    assert Counter((it.kind, it.split) for it in items) == {(k, s): 10 for k in KINDS for s in ("seen", "unseen")}
    answers = {it.question: it for it in items}
    good = {"ascii", "english", "equation"}

    slipped = []  # the wrong answers that restate the problem right (the rest restate 0 + 0)

    def fake(prompts):
        out = []
        for p in prompts:
            it = answers[p[len("User: "):-len("\n\nAssistant:")]]
            if it.split == "seen" or it.kind in good:
                out.append(f" {it.answer}\n\nUser: junk")
            elif len(out) % 3:  # two in three: the problem restated right, the result off by one
                out.append(" " + _wrong(it.answer))
                slipped.append(it)
            else:
                out.append(" 0 + 0 = 0")
        return out

    res = evaluate_with(items, fake, label="fake")
    for k in KINDS:
        assert (res.by_kind[k].n, res.by_kind[k].correct) == (20, 20 if k in good else 10)
        assert (res.by_split["seen"].by_kind[k].n, res.by_split["seen"].by_kind[k].correct) == (10, 10)
        assert (res.by_split["unseen"].by_kind[k].n, res.by_split["unseen"].by_kind[k].correct) == \
            (10, 10 if k in good else 0)
    assert (res.overall.correct, res.overall.n) == (110, 160)
    assert (res.by_split["seen"].overall.correct, res.by_split["unseen"].overall.correct) == (80, 30)
    assert len(res.errors) == 50 and {(e["kind"], e["split"]) for e in res.errors} == \
        {(k, "unseen") for k in set(KINDS) - good}
    assert 0 < len(slipped) < 50
    assert res.overall.restated == 110 + len(slipped) and res.by_split["seen"].overall.restated == 80
    for k in set(KINDS) - good:
        assert res.by_split["unseen"].by_kind[k].restated == sum(it.kind == k for it in slipped)
    line = _summary(res)
    assert f"of the 50 misses {50 - len(slipped)} misread the problem, {len(slipped)} slipped in the result" in line

    table = format_table([res])
    lines = table.splitlines()
    assert lines[0].split() == ["kind", "fake"] and lines[1].split() == ["seen", "unseen", "all"]
    assert [ln.split()[0] for ln in lines[3:3 + len(KINDS)]] == list(KINDS)
    assert _cells(table, "ascii") == ["10/10", "10/10", "20/20"]
    assert _cells(table, "decimal") == ["10/10", "0/10", "10/20"]
    assert lines[-1].startswith("overall") and _cells(table, "overall") == ["80/80", "30/80", "110/160"]
    assert "37.5%" in lines[-1] and "68.8%" in lines[-1]

    write_json(tmp_path / "eval.json", [res], len(items), 5, KINDS)
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["split"] == "both"
    ck = doc["checkpoints"][0]
    assert ck["overall"] == {"n": 160, "correct": 110, "accuracy": 68.75, "not_in_vocab": 0,
                             "restated": 110 + len(slipped)}
    assert ck["by_split"]["seen"]["overall"] == {"n": 80, "correct": 80, "accuracy": 100.0, "not_in_vocab": 0,
                                                 "restated": 80}
    assert ck["by_split"]["unseen"]["overall"] == {"n": 80, "correct": 30, "accuracy": 37.5, "not_in_vocab": 0,
                                                   "restated": 30 + len(slipped)}
    assert {k: v["accuracy"] for k, v in ck["by_split"]["unseen"]["by_kind"].items()} == \
        {k: 100.0 if k in good else 0.0 for k in KINDS}
    assert ck["by_kind"]["chinese"] == {"n": 20, "correct": 10, "accuracy": 50.0, "not_in_vocab": 0,
                                        "restated": 10 + sum(it.kind == "chinese" for it in slipped)}
    assert all(e["split"] == "unseen" for e in ck["errors"])
    assert "[decimal, unseen wording]" in format_errors(res, 50)


def test_one_split_gives_one_column_and_items_without_a_split_count_as_seen():
    items = make_eval_set(16, seed=2, split="unseen")
    assert {it.split for it in items} == {"unseen"}
    res = score(items, [" " + it.answer for it in items], "rwkv-final")
    assert list(res.by_split) == ["unseen"] and res.by_split["unseen"].overall.correct == 16
    lines = format_table([res]).splitlines()
    assert lines[0].split() == ["kind", "rwkv-final"] and lines[1].split() == ["unseen"]
    assert _cells(format_table([res]), "overall") == ["16/16"]
    old = [SimpleNamespace(kind=it.kind, question=it.question, answer=it.answer) for it in items]
    assert list(score(old, ["no"] * 16).by_split) == ["seen"]


def test_two_results_give_two_columns():
    items = make_eval_set(16, seed=1)
    r1 = score(items, [" " + it.answer for it in items], "rwkv-1")
    r2 = score(items, ["nope" for _ in items], "rwkv-final")
    header, *_, last = format_table([r1, r2]).splitlines()
    assert header.split() == ["kind", "rwkv-1", "rwkv-final"]
    assert re.findall(r"\d+/\d+", last) == ["8/8", "8/8", "16/16", "0/8", "0/8", "0/16"]


def test_expand_checkpoints(tmp_path):
    for n in (1, 2, 3, 10):
        (tmp_path / f"rwkv-{n}.pth").write_bytes(b"x")
    (tmp_path / "rwkv-init.pth").write_bytes(b"x")
    (tmp_path / "rwkv-final.pth").write_bytes(b"x")
    got = expand_checkpoints([tmp_path], last=2)
    assert [p.name for p in got] == ["rwkv-3.pth", "rwkv-10.pth", "rwkv-final.pth"]
    got = expand_checkpoints([tmp_path / "rwkv-1.pth", tmp_path], last=0)
    assert [p.name for p in got] == ["rwkv-1.pth", "rwkv-final.pth"]
    with pytest.raises(UserError, match="no such checkpoint"):
        expand_checkpoints([tmp_path / "rwkv-99.pth"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no rwkv-N.pth"):
        expand_checkpoints([empty])
    assert labels_for([tmp_path / "a" / "rwkv-final.pth", tmp_path / "b" / "rwkv-final.pth"]) == \
        ["a/rwkv-final", "b/rwkv-final"]


def test_cli_one_column_per_checkpoint(tmp_path, capsys):
    from trainkit import perturbed_model

    model = perturbed_model(n_layer=1)
    torch.save(model.state_dict(), tmp_path / "rwkv-0.pth")
    torch.save({k: v * 1.01 for k, v in model.state_dict().items()}, tmp_path / "rwkv-final.pth")
    out_json = tmp_path / "eval.json"
    rc = main([str(tmp_path), "--n", "16", "--device", "cpu", "--max-tokens", "3", "--json", str(out_json),
               "--show-errors", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    header = next(ln for ln in text.splitlines() if ln.startswith("kind"))
    assert header.split() == ["kind", "rwkv-0", "rwkv-final"]
    assert "expected" in text  # --show-errors
    assert "seen wordings" in text and re.search(r"rwkv-final: \d+/16 = .*\(seen .*%, unseen .*%;", text)
    doc = json.loads(out_json.read_text())
    assert [c["label"] for c in doc["checkpoints"]] == ["rwkv-0", "rwkv-final"]
    assert all(c["overall"]["n"] == 16 for c in doc["checkpoints"])
    assert set(doc["checkpoints"][0]["by_kind"]) == set(KINDS)
    for c in doc["checkpoints"]:
        assert {s: v["overall"]["n"] for s, v in c["by_split"].items()} == {"seen": 8, "unseen": 8}
        assert set(c["by_split"]["unseen"]["by_kind"]) == set(KINDS)
    rc = main([str(tmp_path / "rwkv-final.pth"), "--n", "8", "--split", "unseen", "--device", "cpu",
               "--max-tokens", "2", "--json", str(out_json)])
    assert rc == 0 and "unseen wordings" in capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    assert doc["split"] == "unseen" and list(doc["checkpoints"][0]["by_split"]) == ["unseen"]


# ---------------------------------------------------------------- a char-level model

def _not_in_vocab(items, chars) -> list:
    """The items whose prompt or answer holds a character outside `chars` (computed here, not by evaluate)."""
    from rwkvlm.data.arithmetic import format_prompt

    return [it for it in items if set(format_prompt(it.question) + " " + it.answer) - set(chars)]


@pytest.fixture(scope="module")
def arith_char_proj(tmp_path_factory):
    """A char-level PROJ_DIR (--data_type utf-8 --vocab_size 0: vocab.json, rwkv-init.pth) for a .txt of
    arithmetic dialogues (documents joined by blank lines), and the text's numbers."""
    from rwkvlm.data.arithmetic import generate_documents
    from rwkvlm.train.run import main as train
    from trainkit import char_args, prepare_args, text_numbers

    root = tmp_path_factory.mktemp("charith")
    (root / "arith.txt").write_text("".join(d + "\n\n" for d in generate_documents(150, 0)), encoding="utf-8")
    proj = root / "proj"
    assert train(char_args(prepare_args(proj, "--data_file", str(root / "arith.txt")))) == 0
    assert (proj / "rwkv-init.pth").is_file() and (proj / "vocab.json").is_file()
    return proj, text_numbers(root / "arith.txt")


def _check_char_evaluation(weights, label, tmp_path, capsys, n=16):
    """evaluate.py on a char-level model: the items its vocab.json can write are asked (a normal table),
    those with other characters (held-out wordings bring new ones) are counted per kind as not in the
    vocabulary, named under the table and in the JSON. Returns the checkpoint's JSON."""
    from rwkvlm.data.charvocab import CharVocab

    vocab_file = weights.parent / "vocab.json"
    vocab = CharVocab.read(vocab_file)
    items = make_eval_set(n, 0)
    missing = _not_in_vocab(items, vocab.chars)
    assert 0 < len(missing) < len(items) and all(it.split == "unseen" for it in missing)
    out_json = tmp_path / "eval.json"
    rc = main([str(weights), "--n", str(n), "--device", "cpu", "--max-tokens", "4", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    asked = n - len(missing)
    assert re.search(rf"{label}: \d+/{asked} = .*; {len(missing)} of {n} items not in the vocabulary;", text), text
    assert f"vocabulary char: {vocab.vocab_size} characters ({vocab_file})" in text
    table = text[text.index("\nkind") + 1:text.index("\n\nwrote")]
    lines = table.splitlines()
    assert lines[1].split() == ["seen", "unseen", "all", "not", "in", "vocab"]
    for k in KINDS:
        row = next(ln for ln in lines if ln.split()[:1] == [k])
        assert row.split()[-1] == str(sum(it.kind == k for it in missing)), row
        asked_k = sum(it.kind == k for it in items) - sum(it.kind == k for it in missing)
        assert _cells(table, k)[-1].endswith(f"/{asked_k}"), row
    assert lines[-2].startswith("not in vocab: items whose question or answer holds a character")
    gone = sorted({c for it in missing for c in set(it.question + it.answer) - set(vocab.chars)})
    assert all(repr(c) in lines[-1] for c in gone[:12]) and f"{len(missing)} of {n} items" in lines[-1]

    ck = json.loads(out_json.read_text())["checkpoints"][0]
    assert ck["overall"]["n"] == asked and ck["overall"]["not_in_vocab"] == len(missing)
    assert ck["by_split"]["seen"]["overall"] == dict(ck["by_split"]["seen"]["overall"], n=n // 2, not_in_vocab=0)
    assert ck["by_split"]["unseen"]["overall"]["n"] + len(missing) == n // 2
    assert {k: v["not_in_vocab"] for k, v in ck["by_kind"].items()} == \
        {k: sum(it.kind == k for it in missing) for k in KINDS}
    assert ck["not_in_vocab"]["items"] == len(missing) and set(ck["not_in_vocab"]["characters"]) == set(gone)
    assert ck["vocabulary"].startswith(f"char: {vocab.vocab_size} characters")
    assert {e["question"] for e in ck["errors"]}.isdisjoint(it.question for it in missing)
    return ck


def test_a_char_vocabulary_asks_what_it_can_write_and_counts_the_rest():
    """Scoring with a character vocabulary (that of an arithmetic text): right answers on every item asked
    give 100%; the items with other characters are neither asked nor wrong, counted per kind and split."""
    from rwkvlm.data.arithmetic import format_prompt, generate_documents
    from rwkvlm.data.charvocab import CharVocab

    vocab = CharVocab.build(["".join(d + "\n\n" for d in generate_documents(150, 0))])
    items = make_eval_set(32, 0)
    missing = _not_in_vocab(items, vocab.chars)
    assert 0 < len(missing) < len(items)
    asked_prompts = []

    def right(prompts):
        asked_prompts.extend(prompts)
        by_prompt = {format_prompt(it.question): it for it in items}
        return [f" {by_prompt[p].answer}\n\n" for p in prompts]

    res = evaluate_with(items, right, "fake", tokenizer=vocab)
    assert asked_prompts == [format_prompt(it.question) for it in items if it not in missing]
    assert (res.overall.n, res.overall.correct, res.overall.not_in_vocab) == (32 - len(missing),) * 2 + (len(missing),)
    for k in KINDS:
        assert res.by_kind[k].not_in_vocab == sum(it.kind == k for it in missing)
        for split in ("seen", "unseen"):
            ks = res.by_split[split].by_kind[k]
            assert ks.n + ks.not_in_vocab == sum(it.kind == k and it.split == split for it in items)
            assert ks.not_in_vocab == sum(it.kind == k and it.split == split for it in missing)
    assert res.errors == [] and res.overall.accuracy == 100.0
    assert res.vocabulary == f"char: {vocab.vocab_size} characters (vocab.json)"
    table = format_table([res])
    assert table.splitlines()[1].split() == ["seen", "unseen", "all", "not", "in", "vocab"]
    assert _cells(table, "overall")[-1] == f"{32 - len(missing)}/{32 - len(missing)}"
    assert table.splitlines()[-1].startswith(f"  fake: {len(missing)} of 32 items; vocabulary char:")


@pytest.mark.slow
def test_char_model_trained_on_arithmetic_text_is_evaluated_in_its_vocabulary(arith_char_proj, tmp_path, capsys):
    """evaluate.py on a PROJ_DIR of a char-level model trained for 6 steps on arithmetic text; --eod-prefix,
    which feeds the World vocabulary's end-of-document token, is refused for it."""
    import shutil

    from rwkvlm.errors import run_cli
    from trainkit import char_args, run_args, train_main

    src, meta = arith_char_proj
    proj = tmp_path / "proj"
    shutil.copytree(src, proj)
    assert train_main(char_args(run_args(meta, proj, "--my_exit_tokens", str(6 * 4 * 64)))) == 0
    capsys.readouterr()
    ck = _check_char_evaluation(proj / "rwkv-final.pth", "rwkv-final", tmp_path, capsys)
    assert ck["info"]["vocab_size"] == len(json.loads((proj / "vocab.json").read_text()))
    rc = main([str(proj), "--last", "0", "--n", "16", "--device", "cpu", "--max-tokens", "4"])  # the PROJ_DIR
    assert rc == 0 and "rwkv-final: " in capsys.readouterr().out
    assert run_cli(main, [str(proj), "--n", "4", "--device", "cpu", "--eod-prefix"]) == 2
    err = capsys.readouterr().err
    assert "--eod-prefix" in err and "char-level model" in err and "id 0 is the character '\\n'" in err


def test_a_world_tokenizer_asks_every_item():
    items = make_eval_set(8, 0)
    res = evaluate_with(items, lambda ps: [""] * len(ps), "w")
    assert res.overall.n == 8 and res.overall.not_in_vocab == 0 and "not in vocab" not in format_table([res])
    assert res.vocabulary == "World"
