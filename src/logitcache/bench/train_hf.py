"""The ``hf-trainer`` variant of ``logitcache bench train``: the Hugging Face Trainer path.

In: a ``bench train`` job (cache, student config, batch size, steps, device). Out: a
``VariantResult`` comparable with ``offline-kd`` (what ``logitcache train`` does): the same
student (same seed), cache, batch size and loss (forward KL, bucket tail), trained by
``DistillationTrainer`` from a ``CacheDataset`` with the same optimizer settings (torch
AdamW, betas 0.9/0.95, weight decay 0.1, gradient clipping at 1, constant learning rate,
bf16 autocast on CUDA).

A step is timed from the Trainer's ``on_step_begin`` to ``on_step_end`` callbacks (forward,
backward, clipping, optimizer and scheduler step, and the Trainer's own bookkeeping), with
the device synchronized at both ends. The batch is already collated and on the device at
``on_step_begin``: the Trainer fetches it first, where ``offline-kd``'s timer includes its
host-to-device copy. Peak memory is measured as for the other variants.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .peak import VariantPeak, sync

__all__ = ["run_hf_variant"]


def run_hf_variant(job: dict[str, Any], *, measure_rss: bool = False):
    """Train ``warmup + steps`` steps with ``DistillationTrainer``; see the module docstring."""

    from transformers import TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from logitcache.train import CacheDataset, DistillationLoss
    from logitcache.train.hf import DistillationTrainer

    from .variant import VariantResult, build_model

    hf_logging.set_verbosity_error()
    device = torch.device(job["device"])
    student = _student_config(job)
    data = CacheDataset(job["cache"], split="all", vocab_limit=student["vocab_size"], verify=False)
    n_steps, size = job["steps"] + job["warmup"], job["batch_size"]
    times: list[float] = []
    cpu_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.cpu0)

    memory = VariantPeak(device, measure_rss)
    memory.start()
    model = build_model(student, job["seed"]).to(device).train()
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=size,
            max_steps=n_steps,
            learning_rate=3e-4,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=device.type == "cpu",
            bf16=device.type == "cuda",
            seed=job["seed"],
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = DistillationTrainer(
            model=model,
            args=args,
            train_dataset=data,
            callbacks=[StepTimer()],
            distillation_loss=DistillationLoss("forward-kl", tail="bucket", chunk_size=1024),
        )
        trainer.train()
    peak = memory.added()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    warm = job["warmup"]
    step_s = statistics.median(times[warm:])
    tokens = sum(int(data[i]["input_ids"].shape[0]) for i in range(size))
    return VariantResult(
        "hf-trainer",
        step_s,
        times[warm:],
        statistics.median(cpu_times[warm:]),
        tokens,
        tokens / step_s,
        peak,
        float(losses[-1]),
    )


def _student_config(job: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(Path(job["student_config"]).read_text())
