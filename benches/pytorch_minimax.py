"""PyTorch anchor for `fulgur bench`: transformers' MiniMaxForCausalLM on a config, on this CPU, in f32.

Run through benches/pytorch.sh, which sets up the Python environment. This script:
  1. builds MiniMaxForCausalLM from CONFIG with random weights (seeded) and saves it as a checkpoint in OUT_DIR
     (so that Fulgur runs exactly the same weights),
  2. draws B x T random token ids (seeded), saves them as OUT_DIR/tokens.safetensors (`input_ids`),
  3. times the forward pass (one warm-up, then the median of REPEATS) under torch.inference_mode() on all cores,
  4. saves the logits as OUT_DIR/torch_logits.safetensors,
  5. with --fulgur BIN, frees the model and runs `BIN bench OUT_DIR --compare full --json` (same checkpoint,
     same shape, same repeats) and `BIN eval-model` on the same tokens, as child processes, and compares: the
     forward times, the logits (relative L2 distance), and the peak resident sets of the processes,
  6. prints one JSON object: torch (forward_ms, tokens_per_s, peak_rss_bytes, threads, versions), fulgur
     (the bench's level `full`, with the child's peak_rss_bytes), speedup and logits_rel_l2.
Peak RSS is the process's peak resident set (ru_maxrss): weights, activations, and each runtime's libraries.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("out_dir")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fulgur", help="the fulgur binary to compare against (default: no comparison)")
    a = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    torch.manual_seed(a.seed)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with open(a.config) as f:
        cfg = json.load(f)
    config = MiniMaxConfig(**cfg)
    model = MiniMaxForCausalLM(config).to(torch.float32).eval()
    os.makedirs(a.out_dir, exist_ok=True)
    model.save_pretrained(a.out_dir, safe_serialization=True)

    g = torch.Generator().manual_seed(a.seed + 1)
    tokens = torch.randint(0, config.vocab_size, (a.batch, a.seq), generator=g, dtype=torch.int64)
    save_file({"input_ids": tokens}, os.path.join(a.out_dir, "tokens.safetensors"))

    times = []
    logits = None
    with torch.inference_mode():
        for i in range(a.repeats + 1):
            t = time.perf_counter()
            out = model(input_ids=tokens, use_cache=False)
            dt = time.perf_counter() - t
            if i > 0:
                times.append(dt)
            logits = out.logits
            print(f"forward {i}/{a.repeats}: {dt * 1e3:.1f} ms", file=sys.stderr)
    save_file({"logits": logits.contiguous()}, os.path.join(a.out_dir, "torch_logits.safetensors"))
    ms = statistics.median(times) * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "torch": {
            "forward_ms": ms,
            "forward_ms_all": [t * 1e3 for t in times],
            "tokens_per_s": a.batch * a.seq / (ms / 1e3),
            "peak_rss_bytes": peak,
            "threads": threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attn_implementation": model.config._attn_implementation,
        }
    }
    if a.fulgur:
        del model, out
        result.update(compare(a, logits))
    print(json.dumps(result, indent=2))


def compare(a, torch_logits):
    import subprocess

    from safetensors.torch import load_file

    bench = subprocess.run(
        [a.fulgur, "bench", a.out_dir, "--compare", "full", "--batch", str(a.batch), "--seq", str(a.seq),
         "--repeats", str(a.repeats), "--json"],
        check=True, capture_output=True, text=True,
    )
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    full = next(lv for lv in json.loads(bench.stdout)["levels"] if lv["level"] == "full")
    full["peak_rss_bytes"] = rss
    out = os.path.join(a.out_dir, "fulgur_logits.safetensors")
    subprocess.run(
        [a.fulgur, "eval-model", a.out_dir, "--tokens", os.path.join(a.out_dir, "tokens.safetensors"),
         "--out", out],
        check=True, capture_output=True, text=True,
    )
    mine = load_file(out)["logits"]
    rel = float((mine - torch_logits).norm() / torch_logits.norm())
    return {"fulgur": full, "logits_rel_l2": rel}


if __name__ == "__main__":
    main()
