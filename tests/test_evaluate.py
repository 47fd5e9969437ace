"""Held-out arithmetic evaluation: scoring, tables, checkpoint lists, the CLI."""
import json

import pytest
import torch

from rwkvlm.data.arithmetic import KINDS, make_eval_set
from rwkvlm.errors import UserError
from rwkvlm.infer.evaluate import (
    evaluate_with, expand_checkpoints, format_table, labels_for, main, reply_of, score,
)


def test_reply_is_cut_at_the_blank_line_and_stripped():
    assert reply_of(" 3 + 3 = 6\n\nUser: next") == "3 + 3 = 6"
    assert reply_of(" x = 9 - 2 = 7  ") == "x = 9 - 2 = 7"
    assert reply_of("\n\n3") == ""


def test_fake_generator_gives_the_right_table():
    items = make_eval_set(80, seed=5)
    answers = {it.question: it for it in items}
    good = {"ascii", "english", "equation"}

    def fake(prompts):
        out = []
        for p in prompts:
            q = p[len("User: "):-len("\n\nAssistant:")]
            it = answers[q]
            out.append(f" {it.answer}\n\nUser: junk" if it.kind in good else " 0 + 0 = 0")
        return out

    res = evaluate_with(items, fake, label="fake")
    for k in KINDS:
        assert res.by_kind[k].n == 10
        assert res.by_kind[k].correct == (10 if k in good else 0)
    assert res.overall.correct == 30 and res.overall.n == 80
    assert len(res.errors) == 50 and {e["kind"] for e in res.errors} == set(KINDS) - good
    table = format_table([res])
    lines = table.splitlines()
    assert lines[-1].startswith("overall") and "30/80" in lines[-1] and "37.5%" in lines[-1]
    ascii_line = next(ln for ln in lines if ln.startswith("ascii"))
    assert "10/10" in ascii_line and "100.0%" in ascii_line
    assert [ln.split()[0] for ln in lines[2:2 + len(KINDS)]] == list(KINDS)


def test_two_results_give_two_columns():
    items = make_eval_set(16, seed=1)
    r1 = score(items, [" " + it.answer for it in items], "rwkv-1")
    r2 = score(items, ["nope" for _ in items], "rwkv-final")
    header, *_, last = format_table([r1, r2]).splitlines()
    assert header.split() == ["kind", "rwkv-1", "rwkv-final"]
    assert "16/16" in last and "0/16" in last


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
    doc = json.loads(out_json.read_text())
    assert [c["label"] for c in doc["checkpoints"]] == ["rwkv-0", "rwkv-final"]
    assert all(c["overall"]["n"] == 16 for c in doc["checkpoints"])
    assert set(doc["checkpoints"][0]["by_kind"]) == set(KINDS)
