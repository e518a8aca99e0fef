"""A Lightning Trainer.fit with DDP on CPU, 2 epochs: `pip install lightning`, then
`ddplaunch --nproc 2 [--warm] examples/frameworks/lightning_fit.py`. Lightning sees torchrun's
variables (TORCHELASTIC_RUN_ID) and joins the job ddplaunch started."""
import time, os, torch
from torch.utils.data import DataLoader, TensorDataset
import lightning as L
class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.l = torch.nn.Linear(8, 1)
    def training_step(self, b, i):
        x, y = b; loss = torch.nn.functional.mse_loss(self.l(x), y); return loss
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)
if __name__ == "__main__":
    ds = TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t.fit(M(), DataLoader(ds, batch_size=32))
    if t.global_rank == 0: print("LIGHTNING OK world", t.world_size, "steps", t.global_step, flush=True)
