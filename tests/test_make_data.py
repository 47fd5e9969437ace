"""make_data: the tutorial command, N shuffled copies, exact tokens, bad input, atomic output,
workers, uint32."""
import hashlib
import json
import mmap
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import rwkvlm.data.copies as copies
import rwkvlm.data.make_data as md
import rwkvlm.data.tokenize_jsonl as tj
from rwkvlm.data.binidx import BinIdx
from rwkvlm.data.magic_prime import magic_prime
from rwkvlm.data.make_data import read_meta
from rwkvlm.data.shuffle import copy_orders
from rwkvlm.data.tokenizer import get_tokenizer
from rwkvlm.errors import UserError
from trainkit import run_make_data

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "RWKV-v5" / "make_data.py"

DOCS = [
    "Hello world.",
    "User: 三十二加十五等于多少？\n\nAssistant: 32 + 15 = 47",
    "全角 １２３ and emoji 👩‍👩‍👧 ZWJ",
    "",  # an empty document is still a document: just its end-of-document token
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "x" * 3000,
    "def f():\n    return 1\n",
] + [f"document number {i} 第{i}号 {'ab' * (i % 7)}" for i in range(40)]


def write_jsonl(path, docs, extra_lines=()):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=bool(len(d) % 2)) + "\n")
        for line in extra_lines:
            f.write(line)


def decoded_items(prefix):
    tok = get_tokenizer()
    d = BinIdx(prefix)
    out = []
    for i in range(d.num_items):
        ids = d.get(i).tolist()
        assert ids[-1] == 0 and 0 not in ids[:-1]
        out.append(tok.decode(ids[:-1]))
    return d, out


def test_every_document_exactly_n_times_each_copy_a_permutation(tmp_path, capsys):
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    assert run_make_data(tmp_path, "demo.jsonl", 4, 512, "--seed", 3) == 0
    d, items = decoded_items(tmp_path / "demo")
    assert d.num_items == 4 * len(DOCS) and d.dtype == np.dtype("<u2")
    assert Counter(items) == Counter({t: 4 for t in DOCS})
    n = len(DOCS)
    copies = [items[k * n : (k + 1) * n] for k in range(4)]
    for copy in copies:
        assert sorted(copy) == sorted(DOCS)
    assert len({tuple(c) for c in copies}) == 4  # each copy shuffled afresh
    orders = list(copy_orders(n, 4, 3))  # the documented order (the benchmark's baseline uses it)
    assert copies == [[DOCS[i] for i in order] for order in orders]
    assert d.doc_idx.tolist() == list(range(4 * n + 1))


def test_tokens_equal_reference_tokenizer(tmp_path):
    rwkv = pytest.importorskip("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    ref = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    assert run_make_data(tmp_path, "demo.jsonl", 2, 512, "--seed", 0) == 0
    d = BinIdx(tmp_path / "demo")
    expected = {tuple(ref.encode(t) + [0]) for t in DOCS}
    got = {tuple(d.get(i).tolist()) for i in range(d.num_items)}
    assert got == expected
    assert d.num_tokens == 2 * sum(len(ref.encode(t)) + 1 for t in DOCS)


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    outs = []
    for seed in (5, 5, 6):
        assert run_make_data(tmp_path, "demo.jsonl", 3, 512, "--seed", seed) == 0
        outs.append(((tmp_path / "demo.bin").read_bytes(), (tmp_path / "demo.idx").read_bytes()))
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    assert sorted(outs[0][0]) == sorted(outs[2][0])  # same tokens, other order


def test_chunked_and_file_read_paths_give_identical_bytes(tmp_path, monkeypatch):
    """Pass 2's token file in memory or read by document, in pieces of any size, its copies put in
    order in one segment or in many (through the file of records): the same bytes."""
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    assert run_make_data(tmp_path, "demo.jsonl", 3, 512, "--seed", 9) == 0
    expected = (tmp_path / "demo.bin").read_bytes(), (tmp_path / "demo.idx").read_bytes()
    for in_memory, chunk_docs, chunk_tokens, segment, scan in ((0, 5, 40, 1 << 19, 1 << 17), (1 << 30, 1, 1, 7, 5),
                                                                (0, 2048, 1 << 20, 16, 100), (0, 3, 1 << 20, 1, 1)):
        monkeypatch.setattr(copies, "IN_MEMORY_BYTES", in_memory)
        monkeypatch.setattr(copies, "CHUNK_DOCS", chunk_docs)
        monkeypatch.setattr(copies, "CHUNK_TOKENS", chunk_tokens)
        monkeypatch.setattr(copies, "SEGMENT_DOCS", segment)
        monkeypatch.setattr(copies, "SCAN_DOCS", scan)
        assert run_make_data(tmp_path, "demo.jsonl", 3, 512, "--seed", 9) == 0
        got = (tmp_path / "demo.bin").read_bytes(), (tmp_path / "demo.idx").read_bytes()
        assert got == expected, (in_memory, chunk_docs, chunk_tokens, segment, scan)


def test_printed_numbers_and_meta(tmp_path, capsys):
    docs = [f"line {i}: " + "token " * (i % 50) for i in range(400)]
    write_jsonl(tmp_path / "big.jsonl", docs, extra_lines=["\n", "   \n"])
    assert run_make_data(tmp_path, "big.jsonl", 30, 512, "--seed", 1) == 0
    out = capsys.readouterr().out
    d = BinIdx(tmp_path / "big")
    p = magic_prime(d.num_tokens, 512)
    assert p is not None
    assert f"\n--my_exit_tokens {d.num_tokens} --magic_prime {p} --ctx_len 512\n" in out
    assert "Found 400 non-empty lines" in out
    assert f"{d.num_tokens} tokens, {d.num_items} items" in out
    assert re.search(r"^### Done in [\d.]+ s: [\d.]+ [kM]?B of input at [\d.]+ [kM]?B/s \(tokenizing [\d.]+ s, "
                     rf"[\d.]+ [kM]?B/s, 1 worker\), {d.num_tokens} tokens written$", out, re.M), out[-300:]
    assert re.search(r"\[big idx 0 sz \d+\]", out) and f"[big idx {d.num_items - 1} sz" in out
    meta = read_meta(tmp_path / "big")
    assert meta["tokens"] == d.num_tokens and meta["items"] == d.num_items == 12000
    assert meta["documents"] == 400 and meta["copies"] == 30 and meta["ctx_len"] == 512
    assert meta["magic_prime"] == p and meta["dtype"] == "uint16" and meta["seed"] == 1
    assert meta["vocab"] == "rwkv_vocab_v20230424" and meta["source"].endswith("big.jsonl")
    assert read_meta(tmp_path / "missing") is None


def test_preview_is_shortened_for_long_documents(tmp_path, capsys):
    write_jsonl(tmp_path / "long.jsonl", ["START " + "word " * 500 + "END"])
    assert run_make_data(tmp_path, "long.jsonl", 1, 512) == 0
    out = capsys.readouterr().out
    assert "START" in out and "END" in out and "· " * 30 in out
    assert out.count("word") < 300


def test_too_little_data_prints_no_magic_prime(tmp_path, capsys):
    write_jsonl(tmp_path / "tiny.jsonl", ["a few tokens only"])
    assert run_make_data(tmp_path, "tiny.jsonl", 2, 4096, "--seed", 0) == 0
    out = capsys.readouterr().out
    assert "--magic_prime" not in out and "fewer than 3 x ctx_len" in out
    assert read_meta(tmp_path / "tiny")["magic_prime"] is None


def test_magic_prime_under_ninety_percent_is_flagged(tmp_path, capsys):
    # 129 slots -> p = 113, and 113/129 < 0.9: the trainer would refuse it, so say so
    doc = "hello " * 100
    per_copy = len(get_tokenizer().encode(doc)) + 1
    ctx = 512  # make_data takes multiples of 512 (test_user_mistakes.py): the copies give the 129 slots
    copies = -(-129 * ctx // per_copy)
    tokens = copies * per_copy
    assert tokens // ctx == 129 and magic_prime(tokens, ctx) == 113
    write_jsonl(tmp_path / "w.jsonl", [doc])
    assert run_make_data(tmp_path, "w.jsonl", copies, ctx) == 0
    out = capsys.readouterr().out
    assert f"--magic_prime 113 --ctx_len {ctx}" in out and "WARNING" in out and "refuse" in out


def test_bom_crlf_blank_lines_and_extra_fields(tmp_path):
    raw = ("\ufeff" + json.dumps({"text": "first", "meta": 1}) + "\r\n\r\n"
           + json.dumps({"id": 7, "text": "second"}) + "\r\n   \n\t\n" + json.dumps({"text": "third"}))
    (tmp_path / "x.jsonl").write_bytes(raw.encode("utf-8"))
    assert run_make_data(tmp_path, "x.jsonl", 1, 512) == 0
    _, items = decoded_items(tmp_path / "x")
    assert sorted(items) == ["first", "second", "third"]


BAD_CASES = {
    "invalid JSON": (b'{"text": "ok"}\n{"text": "broken\n', 2, "not valid JSON"),
    "missing text": (b'{"text": "ok"}\n{"content": "x"}\n', 2, 'no "text" field'),
    "text is a number": (b'{"text": "ok"}\n\n{"text": 5}\n', 3, "must be a string"),
    "text is null": (b'{"text": null}\n', 1, "must be a string"),
    "not an object": (b'{"text": "ok"}\n["text", "x"]\n', 2, "JSON object"),
    "invalid UTF-8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "UTF-8"),
    "lone surrogate": (b'{"text": "ok"}\n{"text": "bad \\ud800 here"}\n', 2, "surrogate"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, case):
    content, line_no, words = BAD_CASES[case]
    (tmp_path / "demo.jsonl").write_bytes(content)
    assert run_make_data(tmp_path, "demo.jsonl", 3, 512) == 2
    err = capsys.readouterr().err
    assert f"line {line_no}" in err and words in err and "--skip-bad" in err, err
    assert sorted(os.listdir(tmp_path)) == ["demo.jsonl"]  # no .bin/.idx/.meta, no temporaries


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_skip_bad_skips_and_reports(tmp_path, capsys, case):
    content, line_no, words = BAD_CASES[case]
    (tmp_path / "demo.jsonl").write_bytes(content + b'{"text": "last good"}\n')
    assert run_make_data(tmp_path, "demo.jsonl", 2, 512, "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "Skipped 1 bad lines" in out and f"line {line_no}" in out
    _, items = decoded_items(tmp_path / "demo")
    good = ["ok", "last good"] if content.startswith(b'{"text": "ok"}') else ["last good"]
    assert Counter(items) == Counter({g: 2 for g in good})
    assert read_meta(tmp_path / "demo")["skipped_lines"] == 1


def test_empty_and_blank_files(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert run_make_data(tmp_path, "empty.jsonl", 30, 4096) == 2
    assert "it is empty" in capsys.readouterr().err
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\t\n")
    assert run_make_data(tmp_path, "blank.jsonl", 30, 4096) == 2
    assert "only blank lines" in capsys.readouterr().err
    (tmp_path / "allbad.jsonl").write_bytes(b"nope\n{]\n")
    assert run_make_data(tmp_path, "allbad.jsonl", 30, 4096, "--skip-bad") == 2
    assert "all 2 non-empty lines" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["allbad.jsonl", "blank.jsonl", "empty.jsonl"]


def test_100_mb_line(tmp_path, capsys):
    with open(tmp_path / "huge.jsonl", "wb") as f:
        f.write(b'{"text": "fine"}\n{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(100):
            f.write(chunk)
        f.write(b'"}\n{"text": "after"}\n')
    assert run_make_data(tmp_path, "huge.jsonl", 2, 512) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "104.9 MB" in err and "--max-line-mb" in err
    assert sorted(os.listdir(tmp_path)) == ["huge.jsonl"]
    assert run_make_data(tmp_path, "huge.jsonl", 2, 512, "--skip-bad") == 0
    _, items = decoded_items(tmp_path / "huge")
    assert sorted(items) == ["after", "after", "fine", "fine"]


def test_failure_keeps_previous_outputs(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    assert run_make_data(tmp_path, "demo.jsonl", 2, 512, "--seed", 1) == 0
    before = {p: (tmp_path / p).read_bytes() for p in ("demo.bin", "demo.idx", "demo.meta.json")}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(md, "write_copies", boom)
    with pytest.raises(RuntimeError):
        run_make_data(tmp_path, "demo.jsonl", 5, 512, "--seed", 2)
    assert sorted(os.listdir(tmp_path)) == ["demo.bin", "demo.idx", "demo.jsonl", "demo.meta.json"]
    assert {p: (tmp_path / p).read_bytes() for p in before} == before


@pytest.mark.parametrize("argv, words", [
    (["demo.jsonl", "0", "512"], "copies"),
    (["demo.jsonl", "abc", "512"], "whole number"),
    (["demo.jsonl", "3", "0"], "ctx_len"),
    (["nope.jsonl", "3", "512"], "does not exist"),
    (["demo.jsonl", "3", "512", "--seed", "-4"], "--seed"),
])
def test_bad_arguments(tmp_path, capsys, argv, words):
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    assert run_make_data(tmp_path, *argv) == 2
    assert words in capsys.readouterr().err


def test_refuses_to_overwrite_its_input(tmp_path, capsys):
    write_jsonl(tmp_path / "demo.bin", DOCS)
    assert run_make_data(tmp_path, "demo.bin", 2, 512) == 2
    assert "overwrite the input" in capsys.readouterr().err


def test_out_dir(tmp_path):
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    assert run_make_data(tmp_path, "demo.jsonl", 1, 512, "--out-dir", "sub/dir") == 0
    assert BinIdx(tmp_path / "sub" / "dir" / "demo").num_items == len(DOCS)


def test_tutorial_command_through_the_wrapper(tmp_path):
    """`cd RWKV-v5 && python make_data.py demo.jsonl 30 4096`, run from the data's directory."""
    write_jsonl(tmp_path / "demo.jsonl", DOCS * 10)
    r = subprocess.run([sys.executable, str(WRAPPER), "demo.jsonl", "30", "4096"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = BinIdx(tmp_path / "demo")
    m = re.search(r"^--my_exit_tokens (\d+) --magic_prime (\d+) --ctx_len 4096$", r.stdout, re.M)
    assert m and int(m.group(1)) == d.num_tokens and int(m.group(2)) == magic_prime(d.num_tokens, 4096)
    assert d.num_items == 30 * len(DOCS) * 10


def test_the_demo_scripts_defaults_are_the_line_the_tutorials_demo_data_prints(tmp_path, capsys):
    """README's step 1 on the demo corpus (make_arithmetic_data.py demo.jsonl --docs 20000 --seed 0, then
    make_data.py demo.jsonl 30 4096) prints the MY_EXIT_TOKENS / MAGIC_PRIME that demo-training-prepare.sh and
    demo-training-run.sh ship with and the README shows: the scripts run as shipped on that data."""
    from rwkvlm.data.arithmetic import write_jsonl as write_demo

    write_demo(tmp_path / "demo.jsonl", docs=20000, seed=0)
    capsys.readouterr()
    assert run_make_data(tmp_path, "demo.jsonl", 30, 4096) == 0
    line = re.search(r"^--my_exit_tokens (\d+) --magic_prime (\d+) --ctx_len 4096$", capsys.readouterr().out, re.M)
    assert line, "make_data printed no line to copy"
    tokens, prime = line.groups()
    for script in ("demo-training-prepare.sh", "demo-training-run.sh"):
        text = (ROOT / "RWKV-v7" / "train_temp" / script).read_text()
        assert re.search(rf'^MY_EXIT_TOKENS="{tokens}"', text, re.M), script
        assert re.search(rf'^MAGIC_PRIME="{prime}"', text, re.M), script
    readme = (ROOT / "README.md").read_text()
    assert f"#   ... --my_exit_tokens {tokens} --magic_prime {prime} --ctx_len 4096   <- copy this line" in readme


def test_wrapper_without_package_says_what_to_do(tmp_path):
    r = subprocess.run([sys.executable, "-S", str(WRAPPER), "demo.jsonl", "30", "4096"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 1
    assert "pip install -e ." in r.stderr


def test_memory_does_not_grow_with_copies(tmp_path):
    """Peak RSS at N=200 stays within a few MiB of N=1 (the output is ~65 MB at N=200)."""
    write_jsonl(tmp_path / "m.jsonl", [f"doc {i} " + "lorem ipsum " * (i % 80) for i in range(2000)])
    code = ("import resource, sys, rwkvlm.data.make_data as m; from rwkvlm.errors import run_cli;"
            "rc = run_cli(m.main, sys.argv[1:]);"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    rss = {}
    for n in (1, 200):
        r = subprocess.run([sys.executable, "-c", code, "m.jsonl", str(n), "512", "--seed", "0"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        rss[n] = int(r.stdout.rsplit("RSS", 1)[1]) / 1024
    assert (tmp_path / "m.bin").stat().st_size > 50e6
    assert rss[200] - rss[1] < 20, rss


KILLPOINT = ROOT / "tests" / "killpoint.py"


def _set(prefix):
    """The bytes of <prefix>.bin/.idx/.meta.json (None for a missing file)."""
    out = []
    for ext in (".bin", ".idx", ".meta.json"):
        p = Path(f"{prefix}{ext}")
        out.append(p.read_bytes() if p.is_file() else None)
    return tuple(out)


@pytest.mark.parametrize("kill", ["replace:demo.bin:1", "replace:demo.idx:1", "replace:demo.meta.json:1",
                                  "replace:.demo.binidx-commit.json:1", "create:.demo.meta.json.*:1",
                                  "create:.demo.idx.*:1"])
def test_kill_while_replacing_keeps_a_whole_set(tmp_path, kill):
    """SIGKILL at each moment of make_data's final writes: the old set or the new one (.bin, .idx and
    .meta.json that belong together) is there for the trainer, and the next run leaves no temporary."""
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    new = tmp_path / "new"
    new.mkdir()
    (new / "demo.jsonl").write_bytes((tmp_path / "demo.jsonl").read_bytes())
    assert run_make_data(tmp_path, "demo.jsonl", 3, 16, "--seed", "1") == 0
    assert run_make_data(new, "demo.jsonl", 3, 16, "--seed", "2") == 0
    old_set, new_set = _set(tmp_path / "demo"), _set(new / "demo")
    new_set = new_set[:2] + (new_set[2].replace(str(new).encode(), str(tmp_path).encode()),)
    r = subprocess.run([sys.executable, str(KILLPOINT), "--kill", kill, str(WRAPPER), "demo.jsonl", "3", "16",
                        "--seed", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    data = BinIdx(tmp_path / "demo")  # what the trainer opens; completes a half-done replacement
    meta = read_meta(tmp_path / "demo")
    assert (data.num_tokens, data.num_items) == (meta["tokens"], meta["items"])
    assert _set(tmp_path / "demo") in (old_set, new_set), "a mixed set of old and new files"
    assert run_make_data(tmp_path, "demo.jsonl", 3, 16, "--seed", "2") == 0
    assert _set(tmp_path / "demo") == new_set
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporaries left"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    """Temporaries of a killed make_data (its pid is gone) go on the next run; a live writer's stay."""
    from rwkvlm.atomic import _host

    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f".demo.bin.{_host()}-{dead}-abcd1234.tmp", tmp_path / f".demo.meta.json.{_host()}-{dead}-x1y2z3w4.tmp"]
    live = tmp_path / f".demo.idx.{_host()}-{os.getpid()}-abcd1234.tmp"
    other_host = tmp_path / f".demo.bin.otherhost-{dead}-abcd1234.tmp"
    for p in (*stale, live, other_host):
        p.write_bytes(b"x" * 1000)
    assert run_make_data(tmp_path, "demo.jsonl", 2, 16, "--seed", "1") == 0
    assert not any(p.exists() for p in stale)
    assert live.exists() and other_host.exists()


# ---------------------------------------------------------------- today's bytes, with any number of workers

WORDS = ["the", "data", "RWKV", "模型", "训练数据", "１２３", "👩‍👩‍👧", "tab\t", "new\nline", "  ", "ünïcödé",
         "العربية", "é", "x" * 40, "def f():\n    return 1\n", "3.14", "\r\n", "¿qué?", "日本語のテキスト", "\\", '"quoted"',
         "Ω≈ç√∫", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a\u00adb", "\u200b", "Hello, World!"]
BAD_LINES = [b'{"text": "broken\n', b'{"content": 1}\n', b'{"text": 5}\n', b'[1, 2]\n', b'{"text": "caf\xe9"}\n',
             b'{"text": "lone \\ud800 s"}\n', b'{"text": "a"} x\n']


def golden_jsonl(bad: bool) -> bytes:
    """A fixed 2.5 MB input: BOM, CRLF, blank lines, extra fields, both JSON escapings, NUL and
    surrogate-pair texts, one text larger than a tokenizer batch, and (bad) a bad line of each kind."""
    rng = random.Random(20261203)
    out = [b"\xef\xbb\xbf"]
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 80))) for _ in range(3000)] + DOCS
    docs[1000] = "long " * 70_000
    for i, text in enumerate(docs):
        obj = {"text": text} if i % 4 else {"id": i, "text": text}
        out.append(json.dumps(obj, ensure_ascii=bool(i % 3)).encode() + (b"\r\n" if i % 5 == 0 else b"\n"))
        if i % 97 == 0:
            out.append(b"\n   \t\n")
        if i % 211 == 0:
            out.append(json.dumps({"text": "nul \u0000 inside"}).encode() + b"\n")
        if i % 307 == 0:
            out.append(json.dumps({"text": "pair \ud83d\ude00 ok " * (i % 7)}).encode() + b"\n")
        if bad and i % 173 == 5:
            out.append(BAD_LINES[i % 7])
    return b"".join(out)


# What make_data writes for golden_jsonl (3 copies, ctx 512, --seed 11): sha256 of .bin then .idx;
# with bad lines and --skip-bad the same documents remain, so the same bytes. The tokens are those
# make_data wrote before it had workers (commit 324b5fc, one process): that output, each copy's
# documents put back in input order (it shuffled with numpy's rng.permutation), hashes to
# GOLDEN_INPUT_ORDER_SHA256, and so does this one (each copy in the order of copy_orders).
GOLDEN_SHA256 = "d1f7e9b2e441deba1769c1015733679759f1154f483e0bb357482834b93a4bd9"
GOLDEN_INPUT_ORDER_SHA256 = "94c4a2098b1b1f0e67110940a0246706b136685820b01e401cbccf22e4ad19d0"
GOLDEN_TOKENS = 1765152
GOLDEN_SKIPPED = ('### Skipped 18 bad lines: 3 does not round-trip (lines 11, 1261, 2515); 3 not an object (lines '
                  '187, 1441, 2693); 3 no "text" (lines 367, 1621, 2873); 5 invalid JSON (lines 546, 1082, 1798, '
                  '2336, 3051); 2 invalid UTF-8 (lines 726, 1978); 2 "text" not a string (lines 903, 2156)')
GOLDEN_ERROR = ("ERROR: g.jsonl, line 11: the text does not survive tokenization: it contains the lone surrogate "
                "\\ud800 at character 6 (a JSON \\uXXXX escape without its pair), which UTF-8 cannot encode; fix "
                "the text. Fix or delete that line, or run again with --skip-bad to skip bad lines. Nothing was written.")


def _sha256(prefix) -> str:
    h = hashlib.sha256()
    for ext in (".bin", ".idx"):
        h.update(Path(f"{prefix}{ext}").read_bytes())
    return h.hexdigest()


def _input_order_sha256(prefix, n_copies: int, seed: int) -> str:
    """sha256 of each copy's documents (tokens) in input order, copy after copy."""
    d = BinIdx(prefix)
    n = d.num_items // n_copies
    h = hashlib.sha256()
    for c, order in enumerate(copy_orders(n, n_copies, seed)):
        place = np.empty(n, np.int64)
        place[order] = np.arange(n)
        for doc in range(n):
            h.update(np.ascontiguousarray(d.get(c * n + int(place[doc]))).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    (d / "good").mkdir()
    (d / "bad").mkdir()
    (d / "good" / "g.jsonl").write_bytes(golden_jsonl(False))
    (d / "bad" / "g.jsonl").write_bytes(golden_jsonl(True))
    return d


@pytest.mark.parametrize("workers, chunk_bytes, batch_bytes", [
    (1, None, None),  # the default path of one worker
    (1, 4096, 1),  # many chunks, each text tokenized alone
    (2, 65536, None),  # a pool of 2 over 38 chunks
    (3, 4096, 300),
])
def test_output_is_todays_with_any_workers_chunks_and_batches(golden_dir, capsys, monkeypatch, workers,
                                                              chunk_bytes, batch_bytes):
    if chunk_bytes:
        monkeypatch.setattr(tj, "CHUNK_BYTES", chunk_bytes)
    if batch_bytes:
        monkeypatch.setattr(tj, "BATCH_BYTES", batch_bytes)
    for case, extra in (("good", ()), ("bad", ("--skip-bad",))):
        folder = golden_dir / case
        assert run_make_data(folder, "g.jsonl", 3, 512, "--seed", 11, "--workers", workers, *extra) == 0
        out = capsys.readouterr().out
        assert _sha256(folder / "g") == GOLDEN_SHA256, (case, workers)
        if case == "good" and workers == 1:
            assert _input_order_sha256(folder / "g", 3, 11) == GOLDEN_INPUT_ORDER_SHA256
        assert read_meta(folder / "g")["tokens"] == GOLDEN_TOKENS
        assert (GOLDEN_SKIPPED in out) == (case == "bad")
        assert f"{min(workers, -(-len(golden_jsonl(False)) // tj.CHUNK_BYTES))} worker" in out
    assert run_make_data(golden_dir / "bad", "g.jsonl", 3, 512, "--seed", 11, "--workers", workers,
                         "--out-dir", "none") == 2
    assert capsys.readouterr().err.strip() == GOLDEN_ERROR
    assert not (golden_dir / "bad" / "none").exists() or not os.listdir(golden_dir / "bad" / "none")


def _random_texts(n: int, seed: int) -> list:
    """Texts from all Unicode planes (no surrogates, no NUL), whitespace runs, and WORDS."""
    rng = random.Random(seed)
    ranges = [(1, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            lo, hi = rng.choice(ranges)
            out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(0, 40))))
        elif kind < 0.5:
            out.append(rng.choice([" ", "\n", "\t", "\r\n"]) * rng.randint(1, 300))
        else:
            out.append("".join(rng.choice(WORDS) for _ in range(rng.randint(0, 30))))
    return out


def test_batched_tokenization_equals_one_call_per_document():
    """The texts of a batch, joined with NUL and tokenized in one call, give each text's own tokens."""
    tok = get_tokenizer()
    texts = DOCS + _random_texts(3000, 7)
    for size in (1, 7, 500, len(texts)):
        for i in range(0, len(texts), size):
            batch = texts[i : i + size]
            tokens, lengths = tj._encode_batch(tok, batch, "<u2")
            expected = [t for text in batch for t in tok.encode(text) + [0]]
            assert tokens.tolist() == expected
            assert lengths.tolist() == [len(tok.encode(text)) + 1 for text in batch]
    assert tj._encode_batch(tok, ["fine", "lone \ud800"], "<u2") is None  # then one by one


FAST_LINES = [  # lines of the form json.dumps writes, and lines that look like it but are not
    b'{"text": "plain"}\n', b'{"text":"no space"}\n', b'{"text": "crlf"}\r\n', b'{"text": "blanks after"}  \t\n',
    b'\n', b'   \n', b'\t\r\n', json.dumps({"text": "esc \\ \" \n \t \u00e9 \U0001f600 \u4e2d"}).encode() + b"\n",
    json.dumps({"text": "raw \u4e2d\u6587 \U0001f600"}, ensure_ascii=False).encode() + b"\n", b'{"text": ""}\n',
]
ODD_LINES = [  # each sends its chunk line by line (but a byte-order mark at the start): same tokens, same bad lines
    b'  {"text": "leading blanks"}\n', b'{"text": "a", "id": 1}\n', b'{"id": 1, "text": "b"}\n',
    b'{"text": "nul \\u0000 inside"}\n', b'{"text": "lone \\ud800"}\n', b'{"text": "bad \\x escape"}\n',
    b'{"text": "raw\ttab"}\n', b'{"text": "caf\xe9"}\n', b'{"text": "x"} trailing\n', b'{"text": "open\n',
    b'{"text": 5}\n', b'\xef\xbb\xbf{"text": "bom"}\n', b'{"text": "no newline at the end"}',
]


@pytest.mark.parametrize("odd", [None] + ODD_LINES)
def test_fast_path_gives_the_tokens_of_the_line_by_line_path(tmp_path, odd):
    """A chunk of lines as json.dumps writes them goes through the fast path; a chunk with any other
    line goes line by line (same tokens, same counts, same bad lines): compared on every kind."""
    rng = random.Random(5)
    lines = [rng.choice(FAST_LINES) for _ in range(300)] + FAST_LINES
    if odd is not None:
        lines.insert(150 if not odd.startswith(b"\xef") else 0, odd)
        if not odd.endswith(b"\n"):
            lines.append(lines.pop(150))
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"".join(lines))
    for skip_bad in (True, False):
        job = tj.ChunkJob(str(path), 0, path.stat().st_size, 16_000_000, skip_bad, "<u2")
        fast = tj._ChunkTokenizer(job)._fast(path.read_bytes())
        by_line = tj._ChunkTokenizer(job)._line_by_line()
        got = tj.tokenize_chunk(job)
        assert (fast is not None) == (odd is None or odd.startswith(b"\xef\xbb\xbf")), odd
        for result in ([fast] if fast is not None else []) + [got]:
            assert np.array_equal(result.tokens, by_line.tokens) and np.array_equal(result.lengths, by_line.lengths)
            assert (result.lines, result.non_empty, result.bad, result.nbytes) == by_line[2:]
    if odd is None:
        expected = [t for line in lines if line.strip() for t in get_tokenizer().encode(json.loads(line)["text"]) + [0]]
        assert got.tokens.tolist() == expected


def test_bad_line_in_a_later_chunk_gives_the_same_message_with_workers(tmp_path, capsys, monkeypatch):
    """Every kind of bad line, 300 lines in (a later chunk of 2 workers): the message of one worker."""
    monkeypatch.setattr(tj, "CHUNK_BYTES", 2048)
    good = b"".join(json.dumps({"text": f"good line {i} " * 3}).encode() + b"\n" for i in range(300))
    for case, (content, line_no, words) in sorted(BAD_CASES.items()):
        (tmp_path / "demo.jsonl").write_bytes(good + content + good)
        errors = []
        for workers in (1, 2):
            assert run_make_data(tmp_path, "demo.jsonl", 2, 512, "--workers", workers) == 2
            errors.append(capsys.readouterr().err)
            assert sorted(os.listdir(tmp_path)) == ["demo.jsonl"], case
        assert errors[0] == errors[1], case
        assert f"line {300 + line_no}" in errors[0] and words in errors[0], errors[0]


def _square_and_pid(i: int) -> tuple:
    time.sleep(0.001 * (i % 3))  # tasks that end out of order
    return i * i, os.getpid()


def test_workers_give_results_in_job_order():
    from rwkvlm.data.workers import worker_pool

    with worker_pool(3) as pool:
        out = list(pool.map(_square_and_pid, range(300)))
    assert [r for r, _ in out] == [i * i for i in range(300)]
    assert len({pid for _, pid in out}) >= 2 and os.getpid() not in {pid for _, pid in out}


def _tokens_of(n: int):
    return tj.ChunkTokens(np.arange(n, dtype="<u2") % 65000, np.array([n]), 1, 1, [], n)


def test_results_come_back_through_shared_slots_or_the_pipe():
    """map(..., shared="tokens"): arrays that fit a slot come through the shared memory, larger ones
    through the pipe; each result holds its own tokens (while the next are being made)."""
    from rwkvlm.data.workers import worker_pool

    sizes = [random.Random(1).choice([0, 1, 7, 499, 500, 501, 5000]) for _ in range(200)]
    with worker_pool(2, slot_bytes=1000) as pool:
        for n, r in zip(sizes, pool.map(_tokens_of, sizes, shared="tokens")):
            assert r.tokens.dtype == np.dtype("<u2") and np.array_equal(r.tokens, np.arange(n) % 65000), n
            in_slot = isinstance(getattr(r.tokens.base, "obj", None), mmap.mmap)
            assert in_slot == (2 * n <= 1000), n


def test_empty_and_blank_files_with_workers(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert run_make_data(tmp_path, "empty.jsonl", 3, 512, "--workers", 4) == 2
    assert "it is empty" in capsys.readouterr().err
    (tmp_path / "blank.jsonl").write_bytes(b"\n" * 3_000_000)  # 3 chunks of blank lines
    assert run_make_data(tmp_path, "blank.jsonl", 3, 512, "--workers", 2) == 2
    assert "only blank lines" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["blank.jsonl", "empty.jsonl"]


@pytest.mark.parametrize("argv, words", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "two"], "--workers must be a whole number"),
])
def test_bad_workers(tmp_path, capsys, argv, words):
    write_jsonl(tmp_path / "demo.jsonl", DOCS)
    assert run_make_data(tmp_path, "demo.jsonl", 2, 512, *argv) == 2
    assert words in capsys.readouterr().err


def test_progress_bar_on_a_terminal(tmp_path):
    """On a terminal, pass 1 shows input bytes, MB/s and the time left on stderr; not in a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    write_jsonl(tmp_path / "demo.jsonl", DOCS * 20)
    code = ("import sys, rwkvlm.data.make_data as m, rwkvlm.data.tokenize_jsonl as t;"
            "from rwkvlm.errors import run_cli;"
            "m.PROGRESS_MIN_BYTES = 0; t.CHUNK_BYTES = 4096; sys.exit(run_cli(m.main, sys.argv[1:]))")
    argv = [sys.executable, "-c", code, "demo.jsonl", "2", "512", "--workers", "2"]
    main_fd, sub_fd = pty.openpty()
    fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns
    r = subprocess.run(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=sub_fd, timeout=120)
    os.close(sub_fd)
    err = b""
    while True:
        try:
            data = os.read(main_fd, 1 << 16)
        except OSError:
            break
        if not data:
            break
        err += data
    os.close(main_fd)
    assert r.returncode == 0, err
    err = err.decode(errors="replace")
    assert "tokenizing" in err and re.search(r"\[\d\d:\d\d<(\?|\d\d:\d\d), ", err) and "B/s" in err, err
    piped = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "tokenizing" not in piped.stderr
    assert "### Done in" in piped.stdout


# ---------------------------------------------------------------- uint32

def test_token_dtype():
    assert md.token_dtype(None, 65536) == np.dtype("<u2")
    assert md.token_dtype(None, 65537) == np.dtype("<u4")
    assert md.token_dtype("uint32", 65536) == np.dtype("<u4")
    with pytest.raises(UserError, match="--dtype uint32"):
        md.token_dtype("uint16", 100_000)


def test_uint32_file_gives_the_trainer_the_same_samples(tmp_path):
    """--dtype uint32 writes the same tokens (dtype code 9); the trainer's dataset reads the same windows."""
    import torch

    from rwkvlm.train.dataset import MagicPrimeDataset

    write_jsonl(tmp_path / "demo.jsonl", DOCS * 5)
    (tmp_path / "u32").mkdir()
    assert run_make_data(tmp_path, "demo.jsonl", 4, 64, "--seed", 2) == 0
    assert run_make_data(tmp_path, "demo.jsonl", 4, 64, "--seed", 2, "--dtype", "uint32", "--out-dir", "u32") == 0
    a, b = BinIdx(tmp_path / "demo"), BinIdx(tmp_path / "u32" / "demo")
    assert (a.dtype, a.dtype_code, b.dtype, b.dtype_code) == (np.dtype("<u2"), 8, np.dtype("<u4"), 9)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.sizes, b.sizes)
    assert np.array_equal(a.pointers * 2, b.pointers) and np.array_equal(a.doc_idx, b.doc_idx)
    assert (tmp_path / "u32" / "demo.bin").stat().st_size == 2 * (tmp_path / "demo.bin").stat().st_size
    assert read_meta(tmp_path / "u32" / "demo")["dtype"] == "uint32" and read_meta(tmp_path / "demo")["dtype"] == "uint16"
    p = magic_prime(a.num_tokens, 64)
    sets = [MagicPrimeDataset(d.tokens, 64, p, micro_bsz=4, epoch_steps=20, rank=0, world_size=1) for d in (a, b)]
    for s in range(80):
        (x1, y1), (x2, y2) = sets[0][s], sets[1][s]
        assert x1.dtype == x2.dtype == torch.int64 and x1.equal(x2) and y1.equal(y2)
