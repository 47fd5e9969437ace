"""Training: flags (config), the machine (hardware), data checks and sampling (data_checks,
dataset, mixset), the validation loss (validation), the optimiser recipe (optim), PROJ_DIR's files (rundir, checkpoint, trainlog), the
Lightning module and its progress bar (lit, progress), and the run itself (run: train.py).

Importing this package imports nothing else: `rwkvlm.train.config` stays light."""
