"""train.py's flags: declared once as TrainConfig fields, checked when the config is made,
and resolved against the machine without changing the config."""
import dataclasses

import pytest

from rwkvlm.train.config import TrainConfig, build_parser, parse_args
from rwkvlm.errors import UserError
from rwkvlm.train.hardware import resolve

RUN = ["--data_file", "x", "--my_exit_tokens", "409600", "--magic_prime", "97", "--ctx_len", "512",
       "--micro_bsz", "4"]


def test_every_field_is_a_flag_with_its_default():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        assert actions[name].default == f.default, name
        assert actions[name].option_strings == [f"--{name}"]
        assert f.metadata["help"], f"--{name} has no help text"
    # the tutorial's defaults
    cfg = parse_args(RUN)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.precision, cfg.strategy, cfg.lr_init) == \
        (12, 768, 65536, "bf16", "deepspeed_stage_2", 6e-4)


def test_values_are_parsed_by_the_fields_type():
    cfg = parse_args(RUN + ["--lr_init", "1e-3", "--grad_cp", "1", "--enable_progress_bar", "False",
                            "--accelerator", "cuda"])
    assert cfg.lr_init == 1e-3 and cfg.grad_cp == 1 and cfg.enable_progress_bar is False
    assert cfg.accelerator == "gpu"  # the alias, normalised once
    with pytest.raises(SystemExit):
        parse_args(RUN + ["--grad_cp", "2"])  # not a choice: argparse's own message


def test_config_is_frozen():
    cfg = parse_args(RUN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.strategy = "ddp"


@pytest.mark.parametrize("flag, value, words", [
    ("--beta1", "2", "--beta1 is 2.0"),
    ("--beta2", "-0.1", "--beta2"),
    ("--adam_eps", "-1", "--adam_eps is -1.0"),
    ("--weight_decay", "-1", "--weight_decay is -1.0"),
    ("--grad_clip", "nan", "--grad_clip is nan"),
    ("--warmup_steps", "-5", "--warmup_steps is -5"),
    ("--epoch_begin", "-1", "--epoch_begin is -1"),
    ("--my_exit_tokens", "-5", "below 0"),
    ("--lr_init", "inf", "--lr_init"),
    ("--save_every_minutes", "-1", "--save_every_minutes"),
    ("--ctx_len", "500", "multiple of 16"),
])
def test_nonsense_is_refused_naming_the_flag(flag, value, words):
    with pytest.raises(UserError, match=None) as e:
        parse_args(RUN + [flag, value])
    assert words in str(e.value)


def test_likely_mistakes_are_warned_about():
    assert parse_args(RUN).warnings() == []
    long_warmup = parse_args(RUN + ["--warmup_steps", "1000"])  # the run is 200 steps
    assert any("--warmup_steps 1000" in w and "200 steps" in w for w in long_warmup.warnings())
    rising = parse_args(RUN + ["--lr_final", "1e-3"])
    assert any("--lr_final" in w and "rise" in w for w in rising.warnings())


def test_no_gpu_falls_back_to_cpu_fp32_without_deepspeed():
    cfg = parse_args(RUN)  # the scripts' defaults: gpu, deepspeed_stage_2, bf16
    hw = resolve(cfg, cuda_available=False)
    assert (hw.config.accelerator, hw.config.strategy, hw.config.precision) == ("cpu", "auto", "fp32")
    assert any("no CUDA GPU" in n for n in hw.notes) and any("DeepSpeed needs GPUs" in n for n in hw.notes)
    assert cfg.strategy == "deepspeed_stage_2" and cfg.precision == "bf16"  # the flags stay as given
    on_gpu = resolve(cfg, cuda_available=True)
    assert on_gpu.config == cfg and on_gpu.notes == () and on_gpu.precision_plugin == "bf16-mixed"


def test_several_cpu_processes_use_ddp():
    for strategy in ("auto", "ddp", "deepspeed_stage_2"):
        cfg = parse_args(RUN + ["--accelerator", "cpu", "--precision", "fp32", "--devices", "2",
                                "--strategy", strategy])
        assert resolve(cfg, cuda_available=False).config.strategy == "ddp", strategy
    one = parse_args(RUN + ["--accelerator", "cpu", "--precision", "fp32", "--strategy", "single_device"])
    assert resolve(one, cuda_available=False).config.strategy == "auto"


def test_explicit_cpu_keeps_the_precision_asked_for():
    cfg = parse_args(RUN + ["--accelerator", "cpu", "--precision", "bf16", "--strategy", "auto"])
    hw = resolve(cfg, cuda_available=True)
    assert (hw.config.accelerator, hw.config.precision, hw.notes) == ("cpu", "bf16", ())
