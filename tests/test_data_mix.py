"""A weighted mix of binidx files (--data_file "a:0.7,b:0.3" or mix.json): the deterministic rule that
gives each sample its file, each file's own magic prime, mix_data.py's line, the run fingerprint, bad
mixes, and (slow tier) exact resume with a mix."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from trainkit import REPO, make_binidx, prepare_args, run_args, same_weights, snapshot, train_main

from rwkvlm.data.magic_prime import magic_prime, sample_start
from rwkvlm.data.mix import MIX_PERIOD, DataMix, MixEntry, MixRule, MixSource, parse_mix, period_counts
from rwkvlm.errors import UserError
from rwkvlm.train.dataset import MagicPrimeDataset
from rwkvlm.train.mixset import MixDataset

WEIGHTS = (0.7, 0.2, 0.1)
VOCAB = ["--vocab_size", "512"]  # token ids below 512: a small head keeps the trainings fast


def _fake_mix(sizes, weights, ctx=16):
    """A DataMix over in-memory token arrays (token = its own offset)."""
    sources = []
    for i, (n, w) in enumerate(zip(sizes, weights)):
        data = SimpleNamespace(tokens=np.arange(n, dtype=np.int64), num_tokens=n)
        sources.append(MixSource(MixEntry(f"f{i}", w), data, magic_prime(n, ctx), 0))
    for s, c in zip(sources, period_counts(weights)):
        s.count = c
    return DataMix(spec="fake", sources=sources, ctx_len=ctx)


# ================================================================ the rule

def test_rule_is_deterministic_and_keeps_the_weights():
    a, b = MixRule(period_counts(WEIGHTS)), MixRule(period_counts(WEIGHTS))
    files = [a.locate(g)[0] for g in range(10_000)]
    assert files == [b.locate(g)[0] for g in range(10_000)]
    share = np.bincount(files, minlength=3) / 10_000
    assert np.all(np.abs(share - WEIGHTS) < 0.01), share
    # low discrepancy: every prefix is within a few samples of its share
    counts = np.zeros(3)
    for g, f in enumerate(files, 1):
        counts[f] += 1
        assert np.all(np.abs(counts - g * np.array(WEIGHTS)) < 3)
    # each file's samples are numbered 0, 1, 2, ... in order, also across periods
    seen = [[], [], []]
    for g in range(2 * MIX_PERIOD + 500):
        f, k = a.locate(g)
        seen[f].append(k)
    assert all(s == list(range(len(s))) for s in seen)
    assert period_counts(WEIGHTS) == (28224, 8064, 4032) and sum(period_counts((1, 1, 1))) == MIX_PERIOD
    assert a.samples_of(2, 10_000) == files.count(2)


def test_windows_are_distinct_within_each_file_and_ranks_disjoint():
    ctx, world, mbsz = 16, 2, 4
    mix = _fake_mix((40_000, 20_000, 10_000), WEIGHTS, ctx)
    epoch_steps = MIX_PERIOD // (mbsz * world)
    sets = [MixDataset(mix, ctx, mbsz, epoch_steps, r, world, MIX_PERIOD) for r in range(world)]
    per_file = [set(), set(), set()]
    n_local = 1500
    for ds in sets:
        for s in range(n_local):
            f, start = ds.locate(s)
            assert start % ctx == 0 and start + ctx + 1 <= mix.sources[f].num_tokens
            assert (f, start) not in per_file[f]  # fewer samples than each p_f: all distinct
            per_file[f].add((f, start))
            x, y = ds[s]
            assert int(x[0]) == start and (x[1:] == y[:-1]).all()
    assert sum(map(len, per_file)) == world * n_local
    # file f's k-th sample is its magic-prime window 1 + k
    ds = sets[0]
    f, k = mix.rule.locate(ds.ii(7) - 1)
    assert ds.locate(7) == (f, sample_start(1 + k, mix.sources[f].magic_prime, ctx))


def test_a_mix_of_one_file_samples_as_the_plain_data_file():
    ctx = 16
    mix = _fake_mix((30_000,), (1.0,), ctx)
    plain = MagicPrimeDataset(mix.sources[0].tokens, ctx, mix.sources[0].magic_prime, 4, 12, 1, 2, 96)
    mixed = MixDataset(mix, ctx, 4, 12, 1, 2, 96)
    assert [plain.start(s) for s in range(300)] == [mixed.start(s) for s in range(300)]


# ================================================================ the spec and its mistakes

def test_parse_string_and_json(tmp_path):
    assert parse_mix("web:0.7, code:0.2,math:0.1") == [MixEntry("web", 0.7), MixEntry("code", 0.2),
                                                      MixEntry("math", 0.1)]
    p = tmp_path / "mix.json"
    p.write_text(json.dumps([{"path": "a/web", "weight": 3}, {"path": "b", "weight": 1}]))
    assert parse_mix(str(p)) == [MixEntry("a/web", 3.0), MixEntry("b", 1.0)]


@pytest.mark.parametrize("spec, needle", [
    ("web:abc,code:1", "not a positive number"), ("web:0,code:1", "not a positive number"),
    ("web:-1", "not a positive number"), ("web:nan", "not a positive number"), ("web:inf", "not a positive number"),
    ("web:1,code", "has no weight"), ("web:1,,code:1", "empty item"), ("web.bin:1", "WITHOUT the extension"),
    ("web:1,web:2", "appears twice"), ("nope.json", "no such mix file"),
])
def test_bad_specs_are_user_errors(spec, needle):
    with pytest.raises(UserError, match=needle) as e:
        parse_mix(spec)
    assert "--data_file" in str(e.value)


def test_json_weight_that_is_not_a_number(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps([{"path": "a", "weight": "lots"}]))
    with pytest.raises(UserError, match="not a positive number"):
        parse_mix(str(p))
    p.write_text(json.dumps([{"path": "a", "weight": True}]))
    with pytest.raises(UserError, match="not a positive number"):
        parse_mix(str(p))
    p.write_text(json.dumps({"path": "a"}))
    with pytest.raises(UserError, match="non-empty JSON list"):
        parse_mix(str(p))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    metas = {name: make_binidx(root / name, n, seed=i, vocab="test512", high=512) for i, (name, n) in
             enumerate((("web", 30_000), ("code", 12_000), ("math", 6_000)))}
    return dict(root=root, metas=metas)


def _spec(files, weights=WEIGHTS):
    return ",".join(f"{files['root'] / n}:{w}" for n, w in zip(("web", "code", "math"), weights))


def _mix_meta(files, weights=WEIGHTS):
    tokens = sum(m["tokens"] for m in files["metas"].values())
    return {"base": _spec(files, weights), "tokens": tokens, "magic_prime": 0}


def test_mix_data_prints_the_line(files, capsys):
    from rwkvlm.data.mix import main

    root = files["root"]
    assert main([str(root / "web"), str(root / "code"), str(root / "math"), "--weights", "0.7,0.2,0.1",
                 "--ctx_len", "64", "--relative-to", str(root)]) == 0
    out = capsys.readouterr().out
    total = sum(m["tokens"] for m in files["metas"].values())
    assert f'--data_file "web:0.7,code:0.2,math:0.1" --my_exit_tokens {total} --magic_prime 0 --ctx_len 64' in out
    assert f"magic_prime {files['metas']['web']['magic_prime']}" in out
    assert "28224 of every 40320" in out
    with pytest.raises(UserError, match="2 weight"):
        main([str(root / "web"), str(root / "code"), str(root / "math"), "--weights", "1,2", "--ctx_len", "64"])


def test_the_script_wrapper_runs(files, cpu_env):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "RWKV-v5" / "mix_data.py"), str(files["root"] / "web"),
                        str(files["root"] / "math"), "--ctx_len", "64"], capture_output=True, text=True,
                       env=cpu_env, timeout=120)
    assert r.returncode == 0 and "--magic_prime 0 --ctx_len 64" in r.stdout, r.stderr


def test_fingerprint_records_a_mix_and_leaves_single_files_as_they_were(files):
    from rwkvlm.rundir.saves import changed_settings, run_fingerprint
    from rwkvlm.train.config import parse_args

    single = parse_args(run_args(files["metas"]["web"], files["root"] / "p"))
    assert sorted(run_fingerprint(single)) == sorted(
        ["n_layer", "n_embd", "vocab_size", "head_size", "ctx_len", "micro_bsz", "world_size", "magic_prime",
         "precision", "deepspeed", "my_exit_tokens", "mini_epoch_samples", "strategy"])
    mix = parse_args(run_args(_mix_meta(files), files["root"] / "p"))
    fp = run_fingerprint(mix)
    assert fp["data_mix"].count(":p=") == 3 and "28224/40320" in fp["data_mix"]
    assert changed_settings(fp, mix) == {}
    other = parse_args(run_args(_mix_meta(files, (0.5, 0.3, 0.2)), files["root"] / "p"))
    assert "data_mix" in changed_settings(fp, other)
    assert "data_mix" in changed_settings(run_fingerprint(single), mix)


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


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    from rwkvlm.train.run import main

    d = tmp_path_factory.mktemp("proj")
    assert main(prepare_args(d, *VOCAB)) == 0
    return d


def test_trainer_refuses_bad_mixes_before_writing(files, proj):
    meta = _mix_meta(files)
    _fails(run_args(dict(meta, magic_prime=12437), proj, *VOCAB), "--magic_prime 0", "--magic_prime is 12437",
           "--ctx_len 64", proj=proj)
    missing = dict(meta, base=meta["base"] + f",{files['root'] / 'nope'}:0.5")
    _fails(run_args(missing, proj, *VOCAB), "nope", "not found", "leave it out", proj=proj)
    _fails(run_args(dict(meta, base=meta["base"].replace(":0.2", ":zero")), proj, *VOCAB), "not a positive number",
           proj=proj)
    # files of different vocabularies
    make_binidx(files["root"] / "odd", 6_000, vocab="char42", high=42)
    odd = dict(meta, base=meta["base"] + f",{files['root'] / 'odd'}:0.1")
    _fails(run_args(odd, proj, *VOCAB), "different vocabularies", "char42", proj=proj)
    # token ids beyond the vocabulary
    _fails(run_args(meta, proj, "--vocab_size", "300"), "token id", "--vocab_size is 300", proj=proj)


# ================================================================ exact resume with a mix (slow)

def _mix_run(meta, proj, *extra):
    return run_args(meta, proj, "--my_exit_tokens", str(24 * 4 * 64), "--mini_epoch_samples", "48",
                    "--save_every_steps", "4", "--dump_samples", str(proj / "samples"), *VOCAB, *extra)


@pytest.mark.slow
def test_mix_stop_and_resume_is_exact_and_a_changed_mix_continues_from_weights(files, proj, tmp_path, capsys):
    meta = _mix_meta(files)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        shutil.copytree(proj, d)
    assert train_main(_mix_run(meta, a)) == 0
    assert "a mix of 3 binidx files" in capsys.readouterr().out
    assert train_main(_mix_run(meta, b), stop_at=10) == 0
    assert train_main(_mix_run(meta, b)) == 0
    assert "resumed exactly" in capsys.readouterr().out
    assert same_weights(a / "rwkv-final.pth", b / "rwkv-final.pth")
    rows = lambda d: [r.split(",")[:3] for r in (d / "loss_log.csv").read_text().splitlines()]  # noqa: E731
    assert rows(a) == rows(b)
    # the samples: step,rank,start,file; each file's windows distinct, the files in the mix's proportions
    dumped = [tuple(map(int, ln.split(","))) for ln in (a / "samples.rank0.csv").read_text().splitlines()]
    assert len(dumped) == 24 * 4
    by_file = np.bincount([f for *_, f in dumped], minlength=3)
    assert np.all(np.abs(by_file / len(dumped) - WEIGHTS) < 0.03), by_file
    assert len({(f, s) for _, _, s, f in dumped}) == len(dumped)
    # the mix is recorded
    head = (a / "train_log.txt").read_text().splitlines()[0]
    assert "data_mix=" in head and ":p=" in head
    record = json.loads((a / "train_config.json").read_text())["data"]
    assert record["kind"] == "mix" and [f["weight"] for f in record["files"]] == list(WEIGHTS)
    # a changed mix is a changed setting: it continues from the weights, not exactly
    assert train_main(_mix_run(meta, c), stop_at=8) == 0
    capsys.readouterr()
    assert train_main(_mix_run(_mix_meta(files, (0.4, 0.4, 0.2)), c)) == 0
    out = capsys.readouterr().out
    assert "the settings changed" in out and "data_mix" in out and "resumed exactly" not in out
