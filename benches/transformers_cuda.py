"""GPU anchor for `fulgur bench --target cuda`: transformers' MiniMaxForCausalLM on a config, bf16, sdpa.

    python3 benches/transformers_cuda.py models/configs/bench-m.json --shapes 1x8192,8x2048 [--repeats 10]

Builds the model from the config with random weights (seeded) in bf16 on GPU 0 with
attn_implementation="sdpa", then for each shape BxT times the forward pass with logits_to_keep=1 (the logits
of the last position only, as `fulgur bench --last-logits`) under torch.inference_mode(): two warm-up passes,
then the median of REPEATS passes timed with CUDA events. Prints one JSON object (and a table on stderr).
"""

import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--shapes", default="1x8192,8x2048")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    torch.manual_seed(a.seed)
    with open(a.config) as f:
        cfg = json.load(f)
    cfg.pop("dtype", None)
    config = MiniMaxConfig(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = MiniMaxForCausalLM(config).to(torch.bfloat16).eval()
    results = []
    for shape in a.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(a.seed + 1)
        ids = torch.randint(0, config.vocab_size, (b, t), generator=g, device="cuda")
        times = []
        with torch.inference_mode():
            for i in range(a.repeats + 2):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
                end.record()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(start.elapsed_time(end))
        assert out.logits.shape == (b, 1, config.vocab_size), out.logits.shape
        ms = statistics.median(times)
        row = {"batch": b, "seq": t, "forward_ms": ms, "tokens_per_s": b * t / (ms / 1e3),
               "all_ms": times, "peak_bytes": torch.cuda.max_memory_allocated()}
        print(f"transformers {b}x{t}: {ms:.1f} ms ({b * t / (ms / 1e3):.0f} tokens/s)", file=sys.stderr)
        results.append(row)
    print(json.dumps({
        "config": a.config, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": "bfloat16",
        "attn_implementation": model.config._attn_implementation, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
