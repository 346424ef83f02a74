"""Scored tokens per second of ppldelta's scoring loop (``ppldelta.hf.score``) against a plain
transformers loop computing the same perplexity, and the fraction of the model's pure forward
throughput that each keeps, on a random Llama built from a config (no downloads), on the CPU,
measured in one run on the same batches.

- forward: ``model(input_ids=x).logits`` on every batch, nothing else (the ceiling);
- transformers: ``model(input_ids=x, labels=x).loss`` per batch, token-weighted into a
  perplexity (float32 loss, as the usual loop);
- ppldelta: ``hf.score(model, ids, protocol="gptq", batch_size=B)``: the same windows
  (disjoint, every token after the first of each scored), float64 log-probs per token.

    python benchmarks/bench_throughput.py                 # default size
    python benchmarks/bench_throughput.py --windows 8     # quicker
"""
import argparse
import math
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppldelta import hf, perplexity


def best(fn, repeat):
    fn()  # warm up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 128), max_position_embeddings=a.seq)
    model = LlamaForCausalLM(cfg).eval()
    n = a.windows * a.seq
    ids = torch.randint(0, a.vocab, (n,), generator=torch.Generator().manual_seed(1))
    batches = [ids[i:i + a.batch * a.seq].view(-1, a.seq) for i in range(0, n, a.batch * a.seq)]
    scored = a.windows * (a.seq - 1)

    def forward():
        with torch.no_grad():
            for x in batches:
                model(input_ids=x, use_cache=False).logits

    state = {}

    def plain():
        nll = cnt = 0.0
        with torch.no_grad():
            for x in batches:
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                k = x.shape[0] * (x.shape[1] - 1)
                nll += float(loss) * k
                cnt += k
        state["plain"] = math.exp(nll / cnt)

    def ours():
        lp, _ = hf.score(model, ids, protocol="gptq", max_length=a.seq, batch_size=a.batch, progress=False)
        state["ours"] = float(perplexity(lp))

    t_fwd = best(forward, a.repeat)
    t_plain = best(plain, a.repeat)
    t_ours = best(ours, a.repeat)
    print(f"random Llama: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, {a.windows} windows of "
          f"{a.seq} tokens, batch {a.batch}, {torch.get_num_threads()} torch thread(s); "
          f"{scored:,} scored tokens; best of {a.repeat}")
    print(f"{'loop':<14}{'seconds':>9}{'tok/s':>11}{'of forward':>12}")
    for name, t in (("forward only", t_fwd), ("transformers", t_plain), ("ppldelta", t_ours)):
        print(f"{name:<14}{t:>9.3f}{scored / t:>11,.0f}{t_fwd / t:>12.3f}")
    print(f"ppldelta / transformers throughput: {t_plain / t_ours:.3f}")
    print(f"perplexity: transformers {state['plain']:.6f} (float32 loss), ppldelta {state['ours']:.6f} "
          f"(float64 log-probs)")


if __name__ == "__main__":
    main()
