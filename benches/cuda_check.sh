#!/bin/bash
# The CUDA backend on the GPU machine, in one call: the GPU tests, tiny-a through the CLI (compile --target
# cuda, run, generate), then bench-m. Run from the repository root with .device/ packed by
#   ../shared/tools/gpu-pack --workspace --no-default-features --features fulgur/cuda
# Logs go to $OUT (or /tmp/fulgur-cuda when OUT is unset).
#   benches/cuda_check.sh [tests|cli|parallel|pipeline|overlap|bench|anchor|decode|train|trainstep|trainbench]...   (default: all)
# `trainbench` takes TRAIN_LEVELS (default none,full) and TRAIN_ANCHOR=0 to leave transformers out.
# `train` also needs the text corpus beside the pack: mkdir -p .device/data && cp ../shared/data/tinyshakespeare.txt .device/data/
# One device call runs at most 10 minutes: the stages together can take longer (bench-m's random weights are
# generated on the host for every bench), so give them in two or three calls, e.g. `tests cli anchor`, then
# `bench`, then `decode`.
set -uo pipefail
out=${OUT:-/tmp/fulgur-cuda}
mkdir -p "$out"
export FULGUR_CACHE_DIR=${FULGUR_CACHE_DIR:-/tmp/fulgur-nvrtc-cache}
stages=${*:-tests cli parallel pipeline overlap bench anchor decode train trainstep trainbench}
fx=.device/fixtures/tiny-a
bin=.device/bin/fulgur
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
for s in $stages; do
  case $s in
    tests)
      echo "=== GPU tests"
      .device/run-tests gpu_ --test-threads 1 2>&1 | tee "$out/tests.log" | grep -E "^test |test result|panicked|GPU:|rel |error" || status=1
      ;;
    cli)
      echo "=== tiny-a through the CLI"
      { $bin compile $fx --target cuda --loss -o /tmp/tiny-a.cuda &&
        $bin run /tmp/tiny-a.cuda --weights $fx --inputs $fx/reference.safetensors --out /tmp/tiny-a.out.safetensors --print &&
        $bin generate $fx --target cuda --tokens $fx/decode.safetensors --max-new-tokens 16 --out /tmp/tiny-a.gen.safetensors --print; } 2>&1 | tee "$out/cli.log" | grep -vE "^ *\[" | tail -20 || status=1
      ;;
    parallel)
      echo "=== tiny-a sharded on the GPU: a parallel artifact (simulated and launched ranks), training and generation"
      rm -rf /tmp/fulgur-par /tmp/fulgur-part; mkdir -p /tmp/fulgur-part
      { $bin compile $fx --target cuda --parallel ep=2,tp=2,etp=2 --batch 2 --seq 40 --loss -o /tmp/fulgur-par | tail -2
        $bin run /tmp/fulgur-par --weights $fx --inputs $fx/reference.safetensors -o /tmp/fulgur-part/art.safetensors
        FULGUR_RANK_TIMEOUT=120 $bin launch -n 4 --timeout 300 -- fulgur run /tmp/fulgur-par --weights $fx --inputs $fx/reference.safetensors -o /tmp/fulgur-part/launched.safetensors
        rm -rf /tmp/fulgur-tr; $bin train $fx --data $fx/train/train.safetensors --steps 3 --lr 0.01 --out /tmp/fulgur-tr --parallel dp=2,tp=2 --target cuda | tr '\r' '\n' | tail -1
        $bin generate $fx --tokens $fx/decode.safetensors --max-new-tokens 10 --greedy --out /tmp/fulgur-part/gen.safetensors --target cuda --parallel tp=2,etp=2 --print | tail -2
        $bin eval-model $fx --tokens $fx/reference.safetensors --target cuda --parallel pp=2,tp=2 --out /tmp/fulgur-part/pp.safetensors
        $bin eval-model $fx --tokens $fx/reference.safetensors --target cuda --parallel ep=2,tp=2 --out /tmp/fulgur-part/eval.safetensors
        # the routed MoE exchange: expert parallel over two simulated ranks, the forward and an artifact
        $bin eval-model $fx --tokens $fx/reference.safetensors --target cuda --parallel ep=2 --out /tmp/fulgur-part/routed.safetensors
        $bin compile $fx --target cuda --parallel ep=2 --batch 2 --seq 40 --loss -o /tmp/fulgur-parep | tail -1
        $bin run /tmp/fulgur-parep --weights $fx --inputs $fx/reference.safetensors -o /tmp/fulgur-part/artrouted.safetensors
        # routed generation needs a batch the expert group divides: two prompts, against one device's tokens
        python3 -c "import numpy as np; from safetensors.numpy import save_file; save_file({'prompt': np.random.default_rng(3).integers(0, 512, (2, 12)).astype(np.int64)}, '/tmp/fulgur-part/prompt2.safetensors')"
        $bin generate $fx --tokens /tmp/fulgur-part/prompt2.safetensors --max-new-tokens 10 --greedy --out /tmp/fulgur-part/gen1.safetensors --target cuda | tail -1
        $bin generate $fx --tokens /tmp/fulgur-part/prompt2.safetensors --max-new-tokens 10 --greedy --out /tmp/fulgur-part/genep.safetensors --target cuda --parallel ep=2 | tail -1
        FULGUR_TRANSPORT=nccl $bin launch -n 1 --gpu-per-rank -- fulgur eval-model $fx --tokens $fx/reference.safetensors --target cuda --parallel dp=1 --out /tmp/fulgur-part/evalnccl.safetensors
        rm -rf /tmp/fulgur-trpp; $bin train $fx --data $fx/train/train.safetensors --steps 3 --lr 0.01 --out /tmp/fulgur-trpp --parallel pp=2,tp=2 --target cuda | tr '\r' '\n' | tail -1
        # the routed exchange in the training step: two simulated ranks' programs on the GPU
        rm -rf /tmp/fulgur-trep; $bin train $fx --data $fx/train/train.safetensors --steps 3 --lr 0.01 --out /tmp/fulgur-trep --parallel ep=2 --target cuda 2>&1 | tr '\r' '\n' | grep -E "sharded|step 3" | cut -c1-200
        # a launched rank training on its GPU with its collectives through NCCL (one GPU: a job of one rank)
        rm -rf /tmp/fulgur-trnccl; FULGUR_TRANSPORT=nccl $bin launch -n 1 --gpu-per-rank -- fulgur train $fx --data $fx/train/train.safetensors --steps 3 --lr 0.01 --out /tmp/fulgur-trnccl --parallel dp=1 --target cuda | tr '\r' '\n' | tail -1
        python3 - <<'PY'
import json
import numpy as np
from safetensors.numpy import load_file
fx, o = ".device/fixtures/tiny-a", "/tmp/fulgur-part"
ref = load_file(f"{fx}/reference.safetensors")
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
for n in ["art", "launched", "pp", "eval", "evalnccl", "routed", "artrouted"]:
    print(n, "logits rel", rel(load_file(f"{o}/{n}.safetensors")["logits"], ref["logits"]))
w = load_file(f"{fx}/decode.safetensors")
g = load_file(f"{o}/gen.safetensors")
print("generate: tokens equal", bool((g["generated"] == w["generated"]).all()), "step logits rel", rel(g["step_logits"], w["step_logits"]))
g1, ge = load_file(f"{o}/gen1.safetensors"), load_file(f"{o}/genep.safetensors")
print("routed generate (ep=2): tokens equal one device's", bool((g1["generated"] == ge["generated"]).all()), "step logits rel", rel(ge["step_logits"], g1["step_logits"]))
want = load_file(f"{fx}/train/train.safetensors")["loss"]
got = [json.loads(l)["loss"] for l in open("/tmp/fulgur-tr/log.jsonl")]
print("train losses", got, "worst difference from transformers", max(abs(a - float(b)) for a, b in zip(got, want)))
for name, d in [("pipeline", "/tmp/fulgur-trpp"), ("routed ep=2", "/tmp/fulgur-trep"), ("launched nccl", "/tmp/fulgur-trnccl")]:
    got = [json.loads(l)["loss"] for l in open(f"{d}/log.jsonl")]
    print(name, "train losses", got, "worst difference from transformers", max(abs(a - float(b)) for a, b in zip(got, want)))
PY
      } 2>&1 | tee "$out/parallel.log" | tail -16 || status=1
      ;;
    pipeline)
      echo "=== tiny-a in pipeline stages on the GPU: launched training, generation, a pipeline artifact"
      rm -rf /tmp/fulgur-pl /tmp/fulgur-plart /tmp/fulgur-pltr /tmp/fulgur-plsim; mkdir -p /tmp/fulgur-pl
      { export FULGUR_RANK_TIMEOUT=120
        # two launched processes sharing the GPU, each its stage's programs and its own parameters' update
        $bin launch -n 2 --timeout 300 -- fulgur train $fx --data $fx/train/train.safetensors --steps 3 --lr 0.01 --out /tmp/fulgur-pltr --parallel pp=2 --target cuda 2>&1 | tr '\r' '\n' | grep -E "pipeline stages|trained" | cut -c1-220
        $bin train $fx --data $fx/train/train.safetensors --steps 3 --lr 0.01 --out /tmp/fulgur-plsim --parallel pp=2 --target cuda 2>&1 | tr '\r' '\n' | grep -E "trained" | cut -c1-160
        $bin generate $fx --tokens $fx/decode.safetensors --max-new-tokens 10 --greedy --out /tmp/fulgur-pl/gen.safetensors --target cuda --parallel pp=2,tp=2 --print | tail -2
        $bin launch -n 2 --timeout 300 -- fulgur generate $fx --tokens $fx/decode.safetensors --max-new-tokens 10 --greedy --out /tmp/fulgur-pl/genl.safetensors --target cuda --parallel pp=2 | tail -1
        $bin compile $fx --target cuda --parallel pp=2,tp=2 --batch 2 --seq 40 --loss -o /tmp/fulgur-plart | head -1
        $bin run /tmp/fulgur-plart --weights $fx --inputs $fx/reference.safetensors -o /tmp/fulgur-pl/art.safetensors
        $bin launch -n 4 --timeout 300 -- fulgur run /tmp/fulgur-plart --weights $fx --inputs $fx/reference.safetensors -o /tmp/fulgur-pl/artl.safetensors
        python3 - <<'PY'
import json
import numpy as np
from safetensors.numpy import load_file
fx, o = ".device/fixtures/tiny-a", "/tmp/fulgur-pl"
ref = load_file(f"{fx}/reference.safetensors")
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
for n in ["art", "artl"]:
    r = load_file(f"{o}/{n}.safetensors")
    print("pipeline artifact", n, "logits rel", rel(r["logits"], ref["logits"]), "loss", float(r["loss"][0]), "transformers", float(ref["loss"][0]))
w = load_file(f"{fx}/decode.safetensors")
for n in ["gen", "genl"]:
    g = load_file(f"{o}/{n}.safetensors")
    print("generate", n, "tokens equal", bool((g["generated"] == w["generated"]).all()), "step logits rel", rel(g["step_logits"], w["step_logits"]))
want = load_file(f"{fx}/train/train.safetensors")["loss"]
for name, d in [("launched pp=2", "/tmp/fulgur-pltr"), ("simulated pp=2", "/tmp/fulgur-plsim")]:
    got = [json.loads(l)["loss"] for l in open(f"{d}/log.jsonl")]
    print(name, "train losses", got, "worst difference from transformers", max(abs(a - float(b)) for a, b in zip(got, want)))
PY
      } 2>&1 | tee "$out/pipeline.log" | tail -16 || status=1
      ;;
    overlap)
      echo "=== the routed exchange chunked for overlap: tiny-a ep=2 compiled for a cost where hiding it pays, on the GPU"
      rm -rf /tmp/fulgur-ov /tmp/fulgur-ovart; mkdir -p /tmp/fulgur-ov
      { echo '{"launch_s": 0, "link_bw": 1e6, "matmul_flops_bf16": 1e9, "matmul_flops_tf32": 1e9}' > /tmp/fulgur-ov/slow.json
        $bin compile $fx --target cuda --parallel ep=2 --batch 2 --seq 40 --loss --ceilings /tmp/fulgur-ov/slow.json -o /tmp/fulgur-ovart | head -1 | cut -c1-160
        echo "rank 0: $(grep -c 'op="all_to_all_dispatch"' /tmp/fulgur-ovart/rank0/graph.fir) dispatches, $(grep -c 'overlap_flops=' /tmp/fulgur-ovart/rank0/graph.fir) exchanges overlapping"
        $bin run /tmp/fulgur-ovart --weights $fx --inputs $fx/reference.safetensors -o /tmp/fulgur-ov/sim.safetensors
        FULGUR_RANK_TIMEOUT=120 $bin launch -n 2 --timeout 300 -- fulgur run /tmp/fulgur-ovart --weights $fx --inputs $fx/reference.safetensors -o /tmp/fulgur-ov/launched.safetensors
        python3 - <<'PY'
import numpy as np
from safetensors.numpy import load_file
fx, o = ".device/fixtures/tiny-a", "/tmp/fulgur-ov"
ref = load_file(f"{fx}/reference.safetensors")
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
for n in ["sim", "launched"]:
    r = load_file(f"{o}/{n}.safetensors")
    print("chunked artifact", n, "logits rel", rel(r["logits"], ref["logits"]), "loss", float(r["loss"][0]), "transformers", float(ref["loss"][0]))
PY
      } 2>&1 | tee "$out/overlap.log" | tail -8 || status=1
      ;;
    bench)
      echo "=== bench-m, bf16: unfused against optimized"
      for shape in "1 8192" "8 2048"; do
        set -- $shape
        timeout 230 $bin bench models/configs/bench-m.json --target cuda --dtype bf16 --compare none,full --batch $1 --seq $2 --last-logits --repeats 5 --top 14 2>&1 | tee -a "$out/bench.log" | grep -v "^full: \|^none: " | tail -36 || status=1
      done
      ;;
    anchor)
      echo "=== transformers MiniMaxForCausalLM, bf16, sdpa"
      PYTHONUNBUFFERED=1 timeout 200 python3 benches/transformers_cuda.py models/configs/bench-m.json --shapes 1x8192,8x2048 > "$out/transformers.json" 2> "$out/transformers.err"; tail -3 "$out/transformers.err"
      ;;
    decode)
      echo "=== bench-m decode, bf16: CUDA graphs (a profiled eager step after), then launched kernel by kernel"
      for e in "" --eager; do
        timeout 250 $bin bench models/configs/bench-m.json --target cuda --dtype bf16 --compare none,full --batch 8 --seq 512 --decode 64 --top 12 $e 2>&1 | tr '\r' '\n' | grep -v " token " | tee -a "$out/decode.log" | grep -v ": optimizing\|: compiling" | tail -32 || status=1
      done
      ;;
    train)
      echo "=== training on the GPU: tiny-a/train's three steps (f32), tinyshakespeare from scratch in f32 and in bf16"
      sh=.device/data/tinyshakespeare.txt; rm -rf /tmp/fulgur-r1 /tmp/fulgur-sh /tmp/fulgur-sh16
      { timeout 120 $bin train $fx --data $fx/train/train.safetensors --steps 3 --lr 0.01 --target cuda --out /tmp/fulgur-r1 2>&1 | tr '\r' '\n' | tail -1; cat /tmp/fulgur-r1/log.jsonl
        for dt in f32 bf16; do
          d=/tmp/fulgur-sh; [ $dt = bf16 ] && d=/tmp/fulgur-sh16
          timeout 200 $bin train models/configs/minimax-tiny-hf.json --data $sh --steps 500 --batch 16 --seq 128 --lr 3e-3 --schedule cosine --warmup 20 --eval-every 50 --target cuda --dtype $dt --out $d 2>&1 | tr '\r' '\n' | tail -1; grep heldout $d/log.jsonl
          cp $d/log.jsonl "$out/tinyshakespeare-$dt.jsonl"
        done
      } 2>&1 | tee "$out/train.log" | cut -c1-200 || status=1
      ;;
    trainstep)
      echo "=== bench-m: four training steps through fulgur train (bf16, f32 master weights)"
      sh=.device/data/tinyshakespeare.txt; rm -rf /tmp/fulgur-bm
      { timeout 240 $bin train models/configs/bench-m.json --data $sh --steps 4 --batch 4 --seq 2048 --dtype bf16 --eval-every 0 --eval-batches 1 --target cuda --out /tmp/fulgur-bm 2>&1 | tr '\r' '\n' | tail -2; cat /tmp/fulgur-bm/log.jsonl
      } 2>&1 | tee "$out/trainstep.log" | cut -c1-300 || status=1
      ;;
    trainbench)
      echo "=== bench-m training steps (bf16 compute, f32 master weights): fulgur unfused/optimized, then transformers"
      for shape in "4 2048" "1 8192"; do
        set -- $shape
        timeout 240 $bin bench models/configs/bench-m.json --target cuda --dtype bf16 --train --compare ${TRAIN_LEVELS:-none,full} --batch $1 --seq $2 --repeats 3 --top 16 2>&1 | tr '\r' '\n' | grep -v ": step \|: compiling\|: building" | tee -a "$out/trainbench.log" | tail -24 || status=1
      done
      [ "${TRAIN_ANCHOR:-1}" = 1 ] && PYTHONUNBUFFERED=1 timeout 200 python3 benches/transformers_train.py models/configs/bench-m.json --shapes 4x2048,1x8192 > "$out/transformers_train.json" 2> "$out/transformers_train.err"; tail -3 "$out/transformers_train.err"
      ;;
  esac
done
exit $status
