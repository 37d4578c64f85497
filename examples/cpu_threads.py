"""One vs two torch threads per process: seconds per training step of the demo's tiny LLaVA.

``python examples/cpu_threads.py [REPEATS]``: forward + backward + AdamW step at 144 vision
tokens, batch 24, the two settings interleaved so a change in the machine's load hits both
(docs/TRAINING.md, "CPU threads")."""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from flexproj.demo.config import DemoConfig
from flexproj.demo.scratch import answer_logits, build_model, encode, sample_stream

cfg = DemoConfig(batch_size=24, train_vision=False)
model, processor = build_model(cfg, 0)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
stream = sample_stream(cfg, 0)
batches = [encode(processor, next(stream), 144, cfg.prompt) for _ in range(4)]
times = {1: [], 2: []}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    for threads in (1, 2) if rep % 2 == 0 else (2, 1):
        torch.set_num_threads(threads)
        b = batches[rep % 4]
        t0 = time.perf_counter()
        loss = F.cross_entropy(answer_logits(model, b, 144).float(), b["answer_id"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times[threads].append(time.perf_counter() - t0)
for t, v in times.items():
    print(f"threads={t}: median {statistics.median(v):.3f} s/step, min {min(v):.3f} (n={len(v)})")
