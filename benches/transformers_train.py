"""Anchor for `fulgur bench --train`: a training step of transformers' MiniMaxForCausalLM on a config.

    python3 benches/transformers_train.py models/configs/bench-m.json --shapes 1x8192,4x2048 [--repeats 5]
    python3 benches/transformers_train.py models/configs/minimax-tiny-hf.json --shapes 2x64 --device cpu

Builds the model from the config with random weights (seeded), f32 master weights, and times whole training
steps: the forward under bf16 autocast (sdpa attention), the mean next-token cross-entropy with labels = the
tokens, the backward, global-norm clipping to 1.0 and torch's AdamW (fused on CUDA; lr 1e-4, betas 0.9/0.95,
eps 1e-8, weight decay 0.1), then zeroing the gradients. Two warm-up steps, then the median of REPEATS steps
(wall time after a synchronize). Prints one JSON object (and a line per shape on stderr) with the peak memory.
On the CPU (a smoke test of the script), autocast and the fused optimizer are off.
"""

import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--shapes", default="1x8192,4x2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    cuda = a.device == "cuda"
    torch.manual_seed(a.seed)
    with open(a.config) as f:
        cfg = json.load(f)
    cfg.pop("dtype", None)
    config = MiniMaxConfig(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device(a.device):
        model = MiniMaxForCausalLM(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )

    def sync():
        if cuda:
            torch.cuda.synchronize()

    results = []
    for shape in a.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        g = torch.Generator(device=a.device).manual_seed(a.seed + 1)
        ids = torch.randint(0, config.vocab_size, (b, t), generator=g, device=a.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(a.repeats + 2):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
                out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
            losses.append(out.loss.item())
        ms = statistics.median(times)
        row = {"batch": b, "seq": t, "step_ms": ms, "tokens_per_s": b * t / (ms / 1e3), "all_ms": times,
               "losses": losses, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
               # what the caching allocator held from the device at its peak, and the device's memory in use
               # (with the CUDA context): the measures beside fulgur's program-held bytes and cuMemGetInfo
               "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
               "device_used_bytes": (lambda f, t: t - f)(*torch.cuda.mem_get_info()) if cuda else None}
        print(f"transformers training step {b}x{t}: {ms:.1f} ms ({b * t / (ms / 1e3):.0f} tokens/s)",
              file=sys.stderr)
        results.append(row)
    print(json.dumps({
        "config": a.config, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "autocast": "bfloat16" if cuda else None, "fused_adamw": cuda, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
