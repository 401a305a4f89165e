"""PyTorch anchor for `fulgur bench`: transformers' MiniMaxForCausalLM on a config, on this CPU, in f32.

Run through benches/pytorch.sh, which sets up the Python environment. This script:
  1. builds MiniMaxForCausalLM from CONFIG with random weights (seeded) and saves it as a checkpoint in OUT_DIR
     (so that Fulgur runs exactly the same weights),
  2. draws B x T random token ids (seeded) and saves them as OUT_DIR/tokens.safetensors (`input_ids`),
  3. in each of ROUNDS rounds, times PyTorch's forward pass (a warm-up, then the median of REPEATS, under
     torch.inference_mode() on all cores) and then, with --fulgur BIN, `BIN bench OUT_DIR --compare full
     --json` on the same shape and repeats (a child process: JIT, warm-up, median). Alternating the two in
     rounds keeps a shared machine's drifting speed out of the ratio: each round's ratio compares runs seconds
     apart, and the result gives every round and the median ratio,
  4. compares the logits (`BIN eval-model` on the same tokens against PyTorch's, relative L2 distance) and
     the peak resident sets (ru_maxrss) of the PyTorch process and of the fulgur bench process: weights,
     activations and each runtime's libraries,
  5. prints one JSON object.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("out_dir")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fulgur", help="the fulgur binary to compare against (default: PyTorch alone)")
    a = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file, save_file
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

    def torch_forward():
        times, logits = [], None
        with torch.inference_mode():
            for i in range(a.repeats + 1):
                t = time.perf_counter()
                logits = model(input_ids=tokens, use_cache=False).logits
                if i > 0:
                    times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3, logits

    def fulgur_forward():
        out = subprocess.run(
            [a.fulgur, "bench", a.out_dir, "--compare", "full", "--batch", str(a.batch), "--seq", str(a.seq),
             "--repeats", str(a.repeats), "--json"],
            check=True, capture_output=True, text=True,
        )
        return next(lv for lv in json.loads(out.stdout)["levels"] if lv["level"] == "full")

    rounds = []
    logits = None
    for r in range(a.rounds if a.fulgur else 1):
        t_ms, logits = torch_forward()
        row = {"torch_ms": t_ms}
        if a.fulgur:
            f = fulgur_forward()
            row.update({"fulgur_ms": f["forward_ms"], "speedup": t_ms / f["forward_ms"]})
            last = f
        rounds.append(row)
        print(f"round {r + 1}: {json.dumps(row)}", file=sys.stderr)
    torch_ms = statistics.median(x["torch_ms"] for x in rounds)
    result = {
        "config": a.config,
        "batch": a.batch,
        "seq": a.seq,
        "repeats": a.repeats,
        "threads": threads,
        "torch": {
            "forward_ms": torch_ms,
            "tokens_per_s": a.batch * a.seq / (torch_ms / 1e3),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attn_implementation": model.config._attn_implementation,
        },
        "rounds": rounds,
    }
    if a.fulgur:
        fulgur_ms = statistics.median(x["fulgur_ms"] for x in rounds)
        last["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        last["forward_ms_median_of_rounds"] = fulgur_ms
        result["fulgur"] = last
        result["speedup_median"] = statistics.median(x["speedup"] for x in rounds)
        out = os.path.join(a.out_dir, "fulgur_logits.safetensors")
        subprocess.run(
            [a.fulgur, "eval-model", a.out_dir, "--tokens", os.path.join(a.out_dir, "tokens.safetensors"),
             "--out", out],
            check=True, capture_output=True, text=True,
        )
        mine = load_file(out)["logits"]
        result["logits_rel_l2"] = float((mine - logits).norm() / logits.norm())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
