"""--data_type utf-8: a .txt file (or a folder of them) as training data, a character vocabulary with
--vocab_size 0 (PROJ_DIR/vocab.json), the World vocabulary with --vocab_size 65536, and every bad
input refused before anything is written. The end-to-end trainings are in the slow tier."""
import json
import shutil

import numpy as np
import pytest

from trainkit import (char_args, prepare_args, run_args, same_weights, snapshot, text_numbers, train_main,
                      write_text)

from rwkvlm.data.charvocab import CharVocab
from rwkvlm.data.text import load_text_data, read_utf8
from rwkvlm.errors import UserError


# ================================================================ the character vocabulary

def test_char_vocab_is_the_sorted_characters_and_round_trips(tmp_path):
    text = "héllo, wörld\n你好 ok"
    v = CharVocab.build([text[:7], text[7:]])
    assert v.chars == sorted(set(text)) and v.vocab_size == len(set(text))
    ids = v.encode(text)
    assert ids.dtype == np.int64 and [v.chars[i] for i in ids] == list(text)
    assert v.decode(ids) == text and v.decode_bytes(ids) == text.encode("utf-8")
    assert v.decode([0, 999, -1]) == v.chars[0] + "\ufffd\ufffd"  # never raises
    assert v.end_of_doc is None  # id 0 is a character
    # vocab.json: RWKV-LM's format, {"0": char, ...}
    (tmp_path / "vocab.json").write_text(v.to_json(), encoding="utf-8")
    obj = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert obj == {str(i): c for i, c in enumerate(v.chars)}
    assert CharVocab.read(tmp_path / "vocab.json") == v
    with pytest.raises(UserError, match=r"does not have: 'Z'"):
        v.encode("hello Z")
    (tmp_path / "bad.json").write_text('{"0": "b", "1": "a"}')
    with pytest.raises(UserError, match="not a character vocabulary"):
        CharVocab.read(tmp_path / "bad.json")


def test_text_file_and_folder_tokenize_as_documented(tmp_path):
    write_text(tmp_path / "one.txt", 40, seed=1)
    d = load_text_data(tmp_path / "one.txt", 0)
    text = (tmp_path / "one.txt").read_text()
    assert d.vocab.chars == sorted(set(text)) and d.vocab_size == d.vocab.vocab_size
    assert d.num_tokens == len(text) and d.vocab.decode(d.tokens) == text
    assert d.tokens.dtype == np.uint16
    # a folder: its *.txt files (sub-folders too) by sorted relative path, characters back to back;
    # other files and empty ones are left out
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "x.txt").write_text("second\n")
    (folder / "a.txt").write_text("first\n")
    (folder / "c.txt").write_text("")
    (folder / "notes.md").write_text("not read")
    d = load_text_data(folder, 0)
    assert d.vocab.decode(d.tokens) == "first\nsecond\n" and len(d.files) == 2
    # a fixed vocab_size that holds the characters keeps its size
    assert load_text_data(folder, 300).vocab_size == 300
    # a byte-order mark is dropped
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfabc")
    assert read_utf8(tmp_path / "bom.txt") == "abc"


def test_world_vocabulary_path_tokenizes_each_file_then_token_0(tmp_path):
    from rwkvlm.data.tokenizer import get_tokenizer

    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "1.txt").write_text("Hello world.\n")
    (folder / "2.txt").write_text("你好, RWKV!")
    d = load_text_data(folder, 65536)
    tok = get_tokenizer()
    want = tok.encode("Hello world.\n") + [0] + tok.encode("你好, RWKV!") + [0]
    assert d.tokens.tolist() == want and d.vocab is None and d.vocab_size == 65536


# ================================================================ bad input: a UserError, nothing written

def test_invalid_utf8_names_the_byte_offset_and_what_to_do(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("line one\ncaf".encode() + b"\xe9 au lait\n")
    with pytest.raises(UserError) as e:
        read_utf8(p)
    msg = str(e.value)
    assert "byte offset 12" in msg and "line 2" in msg and "iconv" in msg and "--data_file" in msg


@pytest.mark.parametrize("what", ["empty_file", "empty_folder", "folder_of_empty_files", "missing", "one_char"])
def test_no_text_is_refused(tmp_path, what):
    target = tmp_path / "data"
    if what == "empty_file":
        target = tmp_path / "empty.txt"
        target.write_text("")
        needle = "is an empty file"
    elif what == "empty_folder":
        target.mkdir()
        needle = "without any .txt file"
    elif what == "folder_of_empty_files":
        target.mkdir()
        (target / "a.txt").write_text("")
        needle = "are all empty"
    elif what == "one_char":
        target = tmp_path / "a.txt"
        target.write_text("aaaa")
        needle = "repeated"
    else:
        needle = "not found"
    with pytest.raises(UserError, match=needle):
        load_text_data(target, 0)


def test_vocab_size_smaller_than_the_characters_names_the_flag(tmp_path):
    write_text(tmp_path / "t.txt", 20)
    n = CharVocab.build([(tmp_path / "t.txt").read_text()]).vocab_size
    with pytest.raises(UserError, match=rf"--vocab_size is 10, but .* holds {n} different characters"):
        load_text_data(tmp_path / "t.txt", 10)


def test_config_refuses_vocab_size_0_without_text():
    from rwkvlm.train.config import parse_args

    with pytest.raises(UserError, match="--vocab_size 0"):
        parse_args(["--train_stage", "1", "--vocab_size", "0"])
    with pytest.raises(UserError, match="is a mix of binidx files, but --data_type is utf-8"):
        parse_args(["--train_stage", "1", "--vocab_size", "0", "--data_type", "utf-8", "--data_file", "a:1,b:1"])


@pytest.fixture(scope="module")
def char_proj(tmp_path_factory):
    """A text, its numbers and a PROJ_DIR prepared for it with --vocab_size 0."""
    root = tmp_path_factory.mktemp("char")
    write_text(root / "book.txt", 300, seed=0)
    meta = text_numbers(root / "book.txt")
    proj = root / "proj"
    from rwkvlm.train.run import main

    assert main(char_args(prepare_args(proj, "--data_file", str(root / "book.txt")))) == 0
    return dict(root=root, meta=meta, proj=proj)


def _fails(args, *needles, proj=None):
    from rwkvlm.train.run import main

    before = snapshot(proj) if proj else None
    with pytest.raises(UserError) as e:
        main([str(a) for a in args])
    for n in needles:
        assert n in str(e.value), f"{n!r} not in:\n{e.value}"
    if proj is not None:
        assert snapshot(proj) == before, "PROJ_DIR changed"
    return str(e.value)


def test_prepare_writes_vocab_json_and_sizes_the_model(char_proj):
    import torch

    proj, meta = char_proj["proj"], char_proj["meta"]
    vocab = CharVocab.read(proj / "vocab.json")
    text = (char_proj["root"] / "book.txt").read_text()
    assert vocab.chars == sorted(set(text)) and meta["vocab_size"] == vocab.vocab_size
    sd = torch.load(proj / "rwkv-init.pth", weights_only=True)
    assert sd["emb.weight"].shape[0] == vocab.vocab_size == sd["head.weight"].shape[0]


def test_the_run_prints_the_magic_prime_line_of_the_text(char_proj):
    meta = dict(char_proj["meta"], magic_prime=7)
    right = f"--my_exit_tokens {meta['tokens']} --magic_prime {char_proj['meta']['magic_prime']} --ctx_len 64"
    _fails(char_args(run_args(meta, char_proj["proj"])), "--magic_prime is wrong", right, proj=char_proj["proj"])


def test_another_text_than_the_vocab_json_is_refused(char_proj, tmp_path):
    other = tmp_path / "other.txt"
    write_text(other, 300, seed=1)
    with open(other, "a") as f:
        f.write("Zebra? Yes!\n")
    meta = text_numbers(other)
    _fails(char_args(run_args(meta, char_proj["proj"])), "unlike the one the model", "vocab.json", "new character",
           proj=char_proj["proj"])


def test_world_vocabulary_run_in_a_char_proj_dir_and_char_run_without_vocab_json(char_proj, tmp_path):
    meta = text_numbers(char_proj["root"] / "book.txt", 65536)
    _fails(char_args(run_args(meta, char_proj["proj"]), 65536), "holds vocab.json", "char-level",
           proj=char_proj["proj"])
    bare = tmp_path / "bare"
    shutil.copytree(char_proj["proj"], bare)
    (bare / "vocab.json").unlink()
    _fails(char_args(run_args(char_proj["meta"], bare)), "has no vocab.json", "demo-training-prepare.sh", proj=bare)


def test_invalid_utf8_and_empty_text_stop_the_run_before_writing(char_proj, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok text\n\xff\xfe more")
    meta = dict(char_proj["meta"], base=str(bad))
    _fails(char_args(run_args(meta, char_proj["proj"])), "not valid UTF-8", "byte offset 8", proj=char_proj["proj"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(char_args(run_args(dict(meta, base=str(empty)), char_proj["proj"])), "empty file", proj=char_proj["proj"])


def test_generator_decodes_with_the_vocab_json_beside_the_weights(char_proj):
    from rwkvlm.data.tokenizer import get_tokenizer
    from rwkvlm.infer.generate import Generator, SamplingOptions, load_model

    model = load_model(char_proj["proj"] / "rwkv-init.pth", "cpu", log=lambda m: None)
    assert isinstance(model.tokenizer, CharVocab)
    gen = Generator(model)
    assert gen.tokenizer is model.tokenizer and gen.end_of_doc is None
    out = gen.generate("The cat", opts=SamplingOptions(temperature=1.0, max_tokens=12, stop=None))
    assert len(out.tokens) == 12 and out.stop_reason == "length"  # id 0 ('\n') does not end it
    assert out.text == model.tokenizer.decode(out.tokens)
    with pytest.raises(UserError, match="needs a model with the World vocabulary"):
        Generator(model, get_tokenizer())  # the World tokenizer forced on a char-level model


# ================================================================ end to end (slow)

def _char_run(meta, proj, *extra, steps=24):
    return char_args(run_args(meta, proj, "--my_exit_tokens", str(steps * 4 * 64), "--mini_epoch_samples", "48",
                              "--save_every_steps", "4", *extra))


@pytest.mark.slow
def test_char_level_end_to_end_train_chat_generate_evaluate_plot(char_proj, tmp_path, capsys):
    from rwkvlm.errors import run_cli
    from rwkvlm.infer.chat import chat_main
    from rwkvlm.infer.evaluate import main as evaluate_main
    from rwkvlm.infer.plot import plot_run

    proj = tmp_path / "proj"
    shutil.copytree(char_proj["proj"], proj)
    assert train_main(_char_run(char_proj["meta"], proj)) == 0
    out = capsys.readouterr().out
    n = char_proj["meta"]["vocab_size"]
    assert f"a character vocabulary of {n} characters (vocab.json), model vocab_size {n}" in out
    assert "(--vocab_size 0: the number of characters)" in out
    assert (proj / "rwkv-final.pth").is_file()
    head = (proj / "train_log.txt").read_text().splitlines()[0]
    assert f"vocab_size={n}" in head and "data_type=utf-8" in head and f"vocab=char{n}" in head
    assert json.loads((proj / "train_config.json").read_text())["data"]["vocab"] == f"char{n}"
    # the trained model writes words of the text (a 24-step tiny model: some of them)
    rc = run_cli(chat_main, [str(proj), "--raw", "--prompt", "The dog", "--max_tokens", "60", "--device", "cpu",
                             "--seed", "1", "--temperature", "0.5"])
    out = capsys.readouterr()
    assert rc == 0 and "char-level model" in out.err
    text = out.out.strip("\n")
    assert text and set(text) <= set(CharVocab.read(proj / "vocab.json").chars)
    # evaluate.py asks in the model's vocabulary: this text has no digits, so no arithmetic item can be
    # asked; they are counted as not in the vocabulary (tests/test_evaluate.py: a char model of arithmetic)
    assert run_cli(evaluate_main, [str(proj), "--n", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "rwkv-final: no item asked: all 4 hold characters its vocabulary lacks" in out
    assert "rwkv-final: 4 of 4 items; vocabulary char:" in out and "'='" in out.split("lacking")[-1]
    assert plot_run(proj).is_file()


@pytest.mark.slow
def test_char_level_stop_and_resume_is_exact(char_proj, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(char_proj["proj"], d)
    assert train_main(_char_run(char_proj["meta"], a)) == 0
    assert train_main(_char_run(char_proj["meta"], b), stop_at=10) == 0
    assert not (b / "rwkv-final.pth").exists()
    assert train_main(_char_run(char_proj["meta"], b)) == 0
    assert same_weights(a / "rwkv-final.pth", b / "rwkv-final.pth")
    rows = lambda d: [r.split(",")[:3] for r in (d / "loss_log.csv").read_text().splitlines()]  # noqa: E731
    assert rows(a) == rows(b)


@pytest.mark.slow
def test_world_vocabulary_text_run_trains(tmp_path, capsys):
    from rwkvlm.train.run import main

    write_text(tmp_path / "t.txt", 600, seed=3)
    meta = text_numbers(tmp_path / "t.txt", 65536)
    proj = tmp_path / "proj"
    assert main(prepare_args(proj)) == 0
    assert train_main(char_args(run_args(meta, proj, "--my_exit_tokens", str(6 * 4 * 64)), 65536)) == 0
    assert "tokens of the World vocabulary" in capsys.readouterr().out
    assert (proj / "rwkv-final.pth").is_file() and not (proj / "vocab.json").exists()
