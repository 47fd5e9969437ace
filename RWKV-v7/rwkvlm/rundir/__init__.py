"""PROJ_DIR, the run directory: every file name and format a run keeps there, and reading them.

layout.py: the names (RunDir, the lock); weights.py: writing and the one safe load of weight files;
saves.py: the saves there (exact-resume states, rwkv-*.pth) ranked by training progress; find.py:
the weights the tools load for a path. Training's decisions on top of these (where a run starts,
what it saves) are rwkvlm.train.resume.
"""
from rwkvlm.rundir.layout import (DIVERGED, DS_DIR, DS_TAG, FINAL, FINAL_INFO, INIT, LATEST, LOSS_LOG, LOSS_LOG_HEADER,
                                  LOSS_LOG_VAL_HEADER, PROFILE, RESUME, SET_ASIDE, STATE_FILE, STATE_WEIGHTS, TRAIN_CONFIG, TRAIN_LOG,
                                  TRAINER_FILE, VOCAB, RunDir, RunLock, check_proj_dir, ensure_proj_dir, epoch_name, rng_file,
                                  state_folder_of, state_name)

__all__ = ["DIVERGED", "DS_DIR", "DS_TAG", "FINAL", "FINAL_INFO", "INIT", "LATEST", "LOSS_LOG", "LOSS_LOG_HEADER",
           "LOSS_LOG_VAL_HEADER", "PROFILE", "RESUME", "SET_ASIDE", "STATE_FILE", "STATE_WEIGHTS", "TRAIN_CONFIG", "TRAIN_LOG", "TRAINER_FILE",
           "VOCAB", "RunDir", "RunLock", "check_proj_dir", "ensure_proj_dir", "epoch_name", "rng_file", "state_folder_of",
           "state_name"]
