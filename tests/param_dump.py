"""A test-only callback: every rank saves its model parameters at the end of fit."""

import os

import lightning as L
import torch


class DumpParams(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.folder, f"params_rank{trainer.global_rank}.pt"))
