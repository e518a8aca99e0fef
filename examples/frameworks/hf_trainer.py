"""The Hugging Face Trainer on a tiny BERT built from a config (no download), on CPU:
`pip install transformers accelerate`, then `ddplaunch --nproc 2 [--warm] examples/frameworks/hf_trainer.py`."""
import os, tempfile
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
model = BertForSequenceClassification(cfg)
class DS(torch.utils.data.Dataset):
    def __len__(self): return 64
    def __getitem__(self, i): return {"input_ids": torch.randint(0, 100, (8,)), "labels": torch.tensor(i % 2)}
args = TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "hf-trainer-output"), per_device_train_batch_size=8, num_train_epochs=1, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
tr = Trainer(model=model, args=args, train_dataset=DS())
out = tr.train()
if tr.is_world_process_zero(): print("HF OK world", args.world_size, "steps", out.global_step, flush=True)
