"""The LightningModule that trains RWKV-7 by the recipe: data, optimiser, step and learning rate.

Global step numbers count from the very first run: a run that resumes at step k continues the
schedule, the data order and the mini-epoch numbering from k. The module restores the optimiser
state (and, continuing exactly, the RNG) of the state it starts from; the bookkeeping runs in
Lightning callbacks beside it (run.py lists them): the logs (logs.TrainLogs), the save policy
(saving.SaveStates), the divergence guard (guard.DivergenceGuard), signals and the profiler
(callbacks). The running sums they share (the mini-epoch's loss, the last steps' losses, the
wandb run id) are the module's attributes, so that every exact-resume state carries them.
"""
from __future__ import annotations

import collections

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from rwkvlm.errors import UserError
from rwkvlm.rundir import DS_DIR, DS_TAG, RunDir, rng_file
from rwkvlm.rundir.weights import load_checkpoint_file
from rwkvlm.train.dataset import StepSampler
from rwkvlm.train.mixset import training_dataset
from rwkvlm.train.optim import lr_at, make_optimizer, param_groups
from rwkvlm.train.resume import RECENT_STEPS
from rwkvlm.train.rng import set_rng_state


class RWKVTrainModule(pl.LightningModule):
    def __init__(self, cfg, model, data, start, log=print, seed=None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.data = data  # BinIdx, TextData or DataMix (rwkvlm.train.data_checks.open_training_data)
        self.start = start  # resume.StartPoint
        self.print_fn = log
        self.seed = seed  # recorded in the states: an exact resume reuses it (run._seed)
        self.end_message = None  # why the run ended (saving.SaveStates), printed once the progress bar is closed
        st = start.state if start.exact else {}  # a run that continues exactly keeps its running sums
        self.run_start_step = start.run_start_step
        self.epoch_loss_sum = float(st.get("epoch_loss_sum", 0.0))
        self.epoch_loss_count = int(st.get("epoch_loss_count", 0))
        self.recent_losses = collections.deque(st.get("recent_losses", []), maxlen=RECENT_STEPS)
        self.wandb_id = st.get("wandb_id")
        self.stop_requested = False  # set by callbacks.StopOnSignal (Ctrl-C / SIGTERM)
        self.kt_s = 0.0
        self.lr_now = 0.0
        self.rd = RunDir(cfg.proj_dir)
        self._loss = (None, 0.0)  # (global_step, loss) of the step last read by step_loss
        self.batch_step = None  # the step being run, from its start (None: no step started yet)

    # ------------------------------------------------------------ steps
    @property
    def step(self) -> int:
        """Global optimiser step about to run (before the step) or just run (after it)."""
        return self.start.step + self.trainer.global_step

    def step_loss(self, outputs) -> float:
        """The loss of the step just run, as a float: one host sync per step, whichever
        callback asks first."""
        at, value = self._loss
        if at != self.trainer.global_step:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            value = float(loss.detach())
            self._loss = (self.trainer.global_step, value)
        return value

    def train_dataloader(self):
        self.dataset = ds = training_dataset(self.data, self.cfg, rank=self.global_rank)
        sampler = StepSampler(self.cfg.micro_bsz, self.start.step, self.cfg.total_steps)
        # no pin_memory: pinning each fresh 0.5 MB batch cost 13 ms per tensor on the H200 host,
        # on the step's critical path, far more than the plain copy it would speed up
        return DataLoader(ds, batch_size=self.cfg.micro_bsz, sampler=sampler, num_workers=0,
                          pin_memory=False, drop_last=True)

    def configure_optimizers(self):
        groups = param_groups(self.model, self.cfg.weight_decay)
        lr = lr_at(self.start.step, self.start.step - self.run_start_step, self.cfg)
        # the strategy's device, not self.device: DeepSpeed builds the optimiser before moving the model
        return make_optimizer(groups, self.cfg, lr, self.trainer.strategy.root_device.type)

    def forward(self, idx):
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        idx, targets = batch  # (B, T), (B, T)
        return self.model.loss(idx, targets)

    # ------------------------------------------------------------ hooks
    def on_fit_start(self):
        # the optimiser exists (the strategy is set up) and no callback has started yet
        if self.start.resume_dir is not None and self.start.restore_optimizer:
            self.restore_resume_state()

    def on_train_batch_start(self, batch, batch_idx):
        step = self.step
        self.batch_step = step + 1  # the step being run (counted from 1), for the messages of its errors
        self.lr_now = lr_at(step, step - self.run_start_step, self.cfg)
        for g in self.trainer.optimizers[0].param_groups:
            g["lr"] = self.lr_now * g.get("lr_scale", 1.0)

    def on_train_end(self):
        if self.end_message:  # after the progress bar's last line (callbacks' on_train_end run first)
            self.print_fn(self.end_message)

    # ------------------------------------------------------------ weights and optimiser state
    def engine(self):
        """The DeepSpeed engine under a DeepSpeed strategy, else None."""
        return getattr(self.trainer.strategy, "deepspeed_engine", None)

    def gathered_state_dict(self) -> dict | None:
        """The model's full state dict on rank 0 (None elsewhere); collective under ZeRO-3."""
        engine = self.engine()
        if engine is not None and engine.zero_optimization_stage() == 3:
            full = engine._zero3_consolidated_16bit_state_dict()  # collective
            if self.global_rank != 0:
                return None
            return {k.removeprefix("model."): v for k, v in full.items()}
        if self.global_rank != 0:
            return None
        return self.model.state_dict()

    def restore_resume_state(self):
        """The optimiser state of the start's state folder (and, continuing exactly, the RNG).

        The optimiser hyperparameters (betas, eps, weight decay) stay this run's: a state
        brings its moments, not its settings.
        """
        d, start = self.start.resume_dir, self.start
        engine = self.engine()
        optimizer = self.trainer.optimizers[0]
        mine = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            if engine is not None:
                engine.load_checkpoint(str(d / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=True)
            else:
                optimizer.load_state_dict(start.payload["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            if start.exact or engine is not None:
                raise UserError(f"cannot restore the optimiser state of {d} ({str(e).splitlines()[0]}). If "
                                f"you changed --weight_decay since it was saved, change it back; or pass "
                                f"--resume_from with an rwkv-N.pth to continue from weights alone.") from None
            self.print_fn(f"note: the optimiser state of {d.name} does not fit this run's optimiser "
                          f"({str(e).splitlines()[0]}); it restarts.")
            return
        for group, own in zip(optimizer.param_groups, mine):
            group.update(own)
        if not start.exact:
            return
        set_rng_state(load_checkpoint_file(d / rng_file(self.global_rank)))
        if self.global_rank == 0:
            self.print_fn(f"resumed exactly from {d} (step {start.step})")
