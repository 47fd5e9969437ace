"""train.py: train_stage 1 writes rwkv-init.pth; train_stage 3 trains.

    python train.py --train_stage 1 ...   # demo-training-prepare.sh
    python train.py --train_stage 3 ...   # demo-training-run.sh (re-run to resume)

Every setting is checked before any training work (rwkvlm.train.config,
rwkvlm.train.data_checks, rwkvlm.train.resume); mistakes end with a message that says
what to change, never with an AssertionError.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
import warnings

from rwkvlm.train.config import TrainConfig, parse_args
from rwkvlm.errors import UserError, is_out_of_memory, run_cli


def log(msg: str) -> None:
    """Print on rank 0 only; above the progress bar while one is shown (rwkvlm.train.progress)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        from tqdm import tqdm

        if getattr(tqdm, "_instances", None):  # a bar is shown: clear it, print, draw it again
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(msg, flush=True)


def _seed(cfg: TrainConfig, start=None) -> tuple[int, str]:
    """Seed every RNG; returns (seed, how the run's first line names it).

    An exact resume reuses the seed its state recorded (the RNG states it restores were drawn
    from it); otherwise --random_seed, or a fresh one for -1."""
    recorded = start.state.get("seed") if start is not None and start.exact else None
    if isinstance(recorded, int):
        seed, said = recorded, f"seed {recorded} (from the state)"
    else:
        seed = cfg.random_seed if cfg.random_seed >= 0 else random.SystemRandom().randrange(2**31)
        said = f"seed {seed}"
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    return seed, said


def _ranks() -> tuple[int, int]:
    """(node rank, local rank) of this process, as the launchers set them."""
    return int(os.environ.get("NODE_RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def _locked(cfg: TrainConfig):
    """Hold PROJ_DIR's lock (one per node, taken by the node's first process) while the body runs."""
    from rwkvlm.rundir import RunDir

    node, local = _ranks()
    if local != 0:
        yield
        return
    with RunDir(cfg.proj_dir).lock(node) as lock:
        if lock.took_over:
            log(f"note: took over the PROJ_DIR lock of a run that is no longer running ({lock.took_over}).")
        yield


def prepare(cfg: TrainConfig) -> int:
    """train_stage 1: the spec's init pass, saved as rwkv-init.pth in the training precision."""
    with _locked(cfg):
        return _prepare(cfg)


def _prepare(cfg: TrainConfig) -> int:
    from rwkvlm.rundir.weights import SAVE_DTYPES, save_weights
    from rwkvlm.model import MODEL_TYPES
    from rwkvlm.rundir import RunDir

    cfg, vocab, text = _prepare_vocab(cfg)  # reads and checks only
    device = _init_device(cfg)
    seed, _ = _seed(cfg)
    proj = cfg.proj_path
    proj.mkdir(parents=True, exist_ok=True)
    _write_vocab(cfg, vocab)
    mcfg = cfg.model_config()
    model_cls = MODEL_TYPES[mcfg.model_type][2]
    log(f"initialising {mcfg.family} {mcfg.describe()}, vocab {cfg.vocab_size} "
        f"({model_cls.count_params(mcfg):,} parameters), seed {seed}, on {_describe_device(device)}")
    t0 = time.monotonic()
    sd = _initial_weights(model_cls, mcfg, SAVE_DTYPES[cfg.precision], device, seed)
    t1 = time.monotonic()
    out = RunDir(proj).init
    save_weights(sd, out, cfg.precision)
    del sd
    log(f"wrote {out} ({SAVE_DTYPES[cfg.precision]}): init {t1 - t0:.1f} s, write {time.monotonic() - t1:.1f} s")
    later = RunDir(proj).epoch_checkpoints()
    if later:
        log(f"note: {proj} already holds {later[0][1].name}; `sh demo-training-run.sh` resumes from it, not "
            f"from this rwkv-init.pth. Use a new PROJ_DIR to start from scratch.")
    if cfg.data_file:
        try:
            from rwkvlm.train.data_checks import check_text_data, open_training_data

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if text is not None:  # read already, for its vocabulary
                    check_text_data(cfg, text)
                else:
                    open_training_data(cfg)
        except UserError as e:
            log(f"note: the run script will stop with this unless it is fixed:\n  {e}")
    return 0


def _init_device(cfg: TrainConfig) -> str:
    """"cuda" or "cpu": where prepare draws the init (--init_device; auto: a visible CUDA GPU)."""
    import torch

    if cfg.init_device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if cfg.init_device == "cuda":
        raise UserError("--init_device cuda, but no CUDA GPU is visible to PyTorch (check CUDA_VISIBLE_DEVICES "
                        "and that torch is a CUDA build); use --init_device cpu or auto. Nothing was written.")
    return "cpu"


def _describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        return (f"the GPU ({torch.cuda.get_device_name(0)}; its random values are not the CPU's for the same seed: "
                f"--init_device cpu for those)")
    return f"the CPU ({torch.get_num_threads()} threads)"


def _initial_weights(model_cls, mcfg, dtype, device: str, seed: int) -> dict:
    """The init's state dict in `dtype` on the CPU (RWKVLM.initial_state_dict). A GPU without the room for
    the largest tensor's init falls back to the CPU, re-seeded, with a note."""
    import torch

    if device == "cuda":
        try:
            return model_cls.initial_state_dict(mcfg, dtype, device="cuda")
        except torch.cuda.OutOfMemoryError:
            free, total = torch.cuda.mem_get_info()
            log(f"note: the GPU has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, too little for the init; "
                f"drawing it on the CPU instead (slower).")
            torch.cuda.empty_cache()
            import pytorch_lightning as pl

            pl.seed_everything(seed, workers=True, verbose=False)
    return model_cls.initial_state_dict(mcfg, dtype, device="cpu")


def _prepare_vocab(cfg: TrainConfig):
    """(cfg, vocab, text) for the prepare stage. A char-level run (--data_type utf-8, --vocab_size 0 or
    below 65536): its text read and its character vocabulary built (cfg's vocab_size set to its size
    for 0), which must equal PROJ_DIR's vocab.json when the folder already holds trained saves. Other
    runs: (cfg, None, None), and PROJ_DIR must not hold trained saves of a char-level model.
    Writes nothing."""
    import dataclasses

    from rwkvlm.data.charvocab import CharVocab
    from rwkvlm.data.text import uses_world_vocab
    from rwkvlm.rundir import RunDir

    rd = RunDir(cfg.proj_dir)
    trained = bool(rd.epoch_checkpoints() or rd.state_dirs() or rd.final.is_file()) if rd.path.is_dir() else False
    char = cfg.data_type == "utf-8" and not uses_world_vocab(cfg.vocab_size)
    old = CharVocab.read(rd.vocab) if rd.vocab.is_file() else None
    if not char:
        if old is not None and trained:
            raise UserError(f"PROJ_DIR {rd.path} holds a char-level model ({rd.vocab.name}: {old.vocab_size} "
                            f"characters) and its saves; this prepare is for the World vocabulary. Use a new "
                            f"PROJ_DIR for the new model. Nothing was written.")
        return cfg, None, None
    from rwkvlm.train.data_checks import load_text

    text = load_text(cfg)
    if old is not None and old != text.vocab and trained:
        raise UserError(f"PROJ_DIR {rd.path} holds the saves of a char-level model made for another text "
                        f"({rd.vocab.name}: {old.vocab_size} characters; {cfg.data_file}: {text.vocab.vocab_size}, "
                        f"{old.describe_difference(text.vocab)}). Use a new PROJ_DIR for this text. Nothing was "
                        f"written.")
    if cfg.vocab_size == 0:
        cfg = dataclasses.replace(cfg, vocab_size=text.vocab_size)
    log(f"character vocabulary of {cfg.data_file}: {text.vocab.vocab_size} characters ({text.characters:,} "
        f"characters of text); the model's vocab_size is {cfg.vocab_size}")
    return cfg, text.vocab, text


def _write_vocab(cfg: TrainConfig, vocab) -> None:
    """PROJ_DIR/vocab.json for a char-level model (crash-safely); for another model, a vocab.json
    left from an untrained char-level model is removed."""
    from rwkvlm.atomic import atomic_open
    from rwkvlm.rundir import RunDir

    rd = RunDir(cfg.proj_dir)
    if vocab is None:
        if rd.vocab.is_file():
            rd.vocab.unlink()
            log(f"note: removed {rd.vocab} (a character vocabulary): this model uses the World vocabulary.")
        return
    with atomic_open(rd.vocab, "wb") as f:
        f.write(vocab.to_json().encode("utf-8"))
    log(f"wrote {rd.vocab} ({vocab.vocab_size} characters)")


def run(cfg: TrainConfig) -> int:
    """train_stage 3: load the newest save, train to --my_exit_tokens."""
    # The CUDA caching allocator grows its segments in place rather than caching many
    # fixed-size ones: the same training peak takes less GPU memory (the M_BSZ 1 row of
    # benchmarks/RESULTS.md). Set before the first CUDA allocation; a PYTORCH_CUDA_ALLOC_CONF
    # of the user's own wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from rwkvlm.train.resume import shapes_from_load_model
    from rwkvlm.train.data_checks import open_val_data, resolve_data

    from rwkvlm.train.hardware import lightning_strategy, resolve, set_matmul_precision

    cfg = shapes_from_load_model(cfg, log=log)  # --load_model FILE: the model is built to its shapes
    asked_vocab = cfg.vocab_size
    cfg, data = resolve_data(cfg)  # --vocab_size 0: the text's character vocabulary
    val = open_val_data(cfg, data)
    if cfg.data_type != "binidx" or hasattr(data, "sources"):
        vocab = f" (--vocab_size {asked_vocab}: the number of characters)" if asked_vocab != cfg.vocab_size else ""
        log(f"data: {data.describe()}{vocab}")
    if val is not None:
        log(val.describe(cfg))
    hw = resolve(cfg)
    for note in hw.notes:
        log(f"note: {note}")
    set_matmul_precision(hw)
    strategy = lightning_strategy(hw)
    with _locked(cfg):
        return _train(hw.config, data, hw.accelerator, strategy, hw.precision_plugin, val)


def _train(cfg: TrainConfig, data, accelerator, strategy, precision, val=None) -> int:
    """Train with `cfg` as it runs on this machine (rwkvlm.train.hardware's Hardware.config)."""
    from rwkvlm.train.resume import find_start
    from rwkvlm.rundir import RunDir

    rd = RunDir(cfg.proj_dir)
    if _ranks() == (0, 0):
        removed = rd.remove_leftovers()
        if removed:
            log(f"note: removed {len(removed)} leftover(s) of an interrupted save in {rd.path}: "
                + ", ".join(rd.relative(p) for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
    start = find_start(cfg, log=log)
    if start.finished:
        log(f"nothing to do: {start.source} is at step {start.step}, and --my_exit_tokens {cfg.my_exit_tokens} "
            f"ends at step {cfg.total_steps} ({rd.final}). Raise --my_exit_tokens to train on (the run then "
            f"continues exactly from there), or use a new PROJ_DIR.")
        return 0
    seed, said = _seed(cfg, start)
    run = {"where": "the set-up (the model's weights in host memory)", "module": None}
    try:
        return _fit(cfg, data, accelerator, strategy, precision, val, start, seed, said, run)
    except BaseException as e:
        if isinstance(e, UserError):
            raise
        from rwkvlm.train.memory import describe_cfg, is_peer_failure, out_of_memory, peer_stopped

        oom = is_out_of_memory(e)
        if not oom and not (cfg.world_size > 1 and is_peer_failure(e)):
            raise
        where = run["where"]
        m = run["module"]
        if m is not None and getattr(m, "batch_step", None):
            first = " (this run's first step: torch.compile, the optimiser state's first allocation)" \
                if m.batch_step == start.step + 1 else ""
            where = f"step {m.batch_step}{first}"
        node, local = _ranks()
        rank = node * cfg.devices + local
        if not oom:  # another rank ended (its own message says why): this one stops with a line, not a traceback
            err = peer_stopped(e, where, rank)
        else:
            from rwkvlm.model import MODEL_TYPES

            mcfg = cfg.model_config()
            params = MODEL_TYPES[mcfg.model_type][2].count_params(mcfg)
            err = out_of_memory(e, cfg, params, describe_cfg(cfg), where, rank=rank)
        if cfg.world_size > 1:
            _stop_together(local)
        raise err from None


def _stop_together(local_rank: int) -> None:
    """Several processes, one of which stops with a message: make the others stop with theirs too.

    Each process leaves the process group, so that the collectives the others wait in fail (each then
    says that another process ended, or gives its own error once the one it waits for has exited). A
    process Lightning launched (local rank > 0) waits at its exit for the launching process to end
    first: Lightning's launcher kills every process as soon as one of its children ends with an error,
    which would cut the launching process's message."""
    import atexit
    import time as _time

    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world = dist.group.WORLD
            for end in ("abort", "shutdown"):  # NCCL: the others' pending collectives fail at once
                try:
                    getattr(world, end)()
                    break
                except Exception:
                    continue
            dist.destroy_process_group()
    except Exception:  # the group may be broken already
        pass
    if local_rank > 0:
        parent = os.getppid()

        def wait_for_parent(deadline_s: float = 15.0) -> None:
            end = _time.monotonic() + deadline_s
            while _time.monotonic() < end and os.getppid() == parent:
                _time.sleep(0.1)

        atexit.register(wait_for_parent)


def _fit(cfg, data, accelerator, strategy, precision, val, start, seed, said, run) -> int:
    """_train's model, module, callbacks and trainer.fit; `run` says how far the set-up got."""
    import pytorch_lightning as pl

    from rwkvlm.rundir.weights import check_weights_fit
    from rwkvlm.train.lit import RWKVTrainModule
    from rwkvlm.model import MODEL_TYPES, build_model
    from rwkvlm.rundir import RunDir

    mcfg = cfg.model_config()
    if start.weights is not None:  # built around the weights: no init pass, about one copy of them in memory
        model = MODEL_TYPES[mcfg.model_type][2].from_weights(
            mcfg, start.weights, check=lambda m: check_weights_fit(start.weights, m, start.source))
        start.weights = None  # (emptied) the host copy is the model's
    else:  # a DeepSpeed state loads the weights into the model later (lit.restore_resume_state)
        model = build_model(mcfg)
    if accelerator == "gpu" and cfg.wkv_impl != "torch":
        _build_kernel_early(cfg)
    compiled = cfg.compile_on(accelerator)
    if compiled:
        model.compile_blocks()

    mcfg = model.cfg
    released = "" if getattr(mcfg, "layer0_v", True) else " (released layout)"
    log(f"{mcfg.family} {mcfg.describe()}{released}, ctx {cfg.ctx_len}, {cfg.world_size} x {cfg.micro_bsz} samples/step, "
        f"epoch_steps {cfg.epoch_steps}, {cfg.tokens_per_step} tokens/step, steps {start.step} -> "
        f"{cfg.total_steps}, mini-epoch {start.step // cfg.epoch_steps}, from {start.source}, {said}, "
        f"{accelerator} {cfg.strategy} {cfg.precision}{' compiled' if compiled else ''}")
    module = RWKVTrainModule(cfg, model, data, start, log=log, seed=seed)
    run["module"] = module
    from rwkvlm.train.callbacks import StepProfiler, StopOnSignal
    from rwkvlm.train.guard import DivergenceGuard
    from rwkvlm.train.logs import TrainLogs
    from rwkvlm.train.saving import SaveStates

    # after each step, in this order: the loss is checked, logged, validated, then a save is made if due
    guard = DivergenceGuard(log=log)
    logs = TrainLogs(log=log)
    callbacks = [guard, logs]
    if val is not None:
        from rwkvlm.train.validation import Validation

        callbacks.append(Validation(val, logs, log=log))
    if accelerator == "gpu":
        from rwkvlm.train.memory import MemoryProbe

        callbacks.append(MemoryProbe(log=log))
    callbacks += [SaveStates(guard), StopOnSignal()]
    if cfg.profile_steps > 0:
        callbacks.append(StepProfiler(cfg.profile_steps, RunDir(cfg.proj_dir).profile, log=log))
    if cfg.enable_progress_bar:
        from rwkvlm.train.progress import StepProgressBar

        callbacks.append(StepProgressBar(start.step, cfg.total_steps))
    trainer = pl.Trainer(
        accelerator=accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
        precision=precision, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=cfg.enable_progress_bar, enable_model_summary=False,
        gradient_clip_val=cfg.grad_clip if cfg.grad_clip > 0 else None, use_distributed_sampler=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=cfg.proj_dir,
        log_every_n_steps=1000000, callbacks=callbacks,
    )
    run["where"] = (f"the set-up (the model moved to the {'GPU' if accelerator == 'gpu' else 'CPU'}, "
                    f"{'DeepSpeed' if cfg.is_deepspeed else 'the strategy'}'s buffers, the optimiser)")
    trainer.fit(module)
    return 0


def _build_kernel_early(cfg: TrainConfig) -> None:
    """Compile (or load) the CUDA WKV kernel before training, so build problems show up first."""
    if cfg.my_testing == "x060":
        from rwkvlm.ops.wkv6.cuda import load_extension
    else:
        from rwkvlm.ops.wkv7.cuda import load_extension

    load_extension(cfg.head_size)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.train_stage == 3:
        for w in cfg.warnings():
            log(f"WARNING: {w}")
    quiet_libraries()
    if cfg.train_stage == 1:
        return prepare(cfg)
    return run(cfg)


# What Lightning and torch print that tells a user of the scripts nothing: the device banner (the
# run's first line names the accelerator), the note at every end of fit (the trainer says why it
# stopped), the float32 matmul hint (--precision decides the matmul precision:
# hardware.set_matmul_precision), per-rank process-group banners, an advert.
LIBRARY_NOISE = (
    "GPU available: ", "TPU available: ", "HPU available: ", "IPU available: ", "`Trainer.fit` stopped",
    "that has Tensor Cores", "set_float32_matmul_precision", "CUDA_VISIBLE_DEVICES: [",
    "Initializing distributed: ", "All distributed processes registered", "litlogger",
)
NOISY_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.distributed")
NOISY_WARNINGS = (
    ".*does not have many workers.*",
    ".*`training_step` returned `None`.*",
    ".*LeafSpec.*",  # a Lightning-internal deprecation, not the user's
    r"barrier\(\): using the device under current context",  # torch.distributed, every DDP save
    ".*GPU available but not used.*",  # --accelerator cpu on a GPU machine: what was asked for
)


def _not_noise(record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not any(s in msg for s in LIBRARY_NOISE)


def quiet_libraries() -> None:
    """Keep Lightning's and torch's notes that say nothing to the user out of the output
    (idempotent: called by every main())."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_not_noise)  # the same function object is added once
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if category is UserWarning and "rwkvlm" in str(filename):
        log(f"WARNING: {message}")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
