"""An Accelerate training loop on CPU: `pip install accelerate`, then
`ddplaunch --nproc 2 [--warm] examples/frameworks/accelerate_loop.py`."""
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=True)
model = torch.nn.Linear(8, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(128, 8), torch.randn(128, 1)), batch_size=16)
model, opt, data = acc.prepare(model, opt, data)
for x, y in data:
    loss = torch.nn.functional.mse_loss(model(x), y); acc.backward(loss); opt.step(); opt.zero_grad()
acc.wait_for_everyone()
if acc.is_main_process: print("ACCELERATE OK processes", acc.num_processes, flush=True)
