"""ppldelta's GGUF path (llama-cpp-python) against llama.cpp's own tool, llama-perplexity, on the
same tokens, and the split of ppldelta's time between the forward and its own work.  Every
configuration runs ``--repeat`` times, the configurations taking turns (a load that comes and
goes on a shared machine hits them alike); the table gives the best wall time, the spread
((worst - best) / best) and the ratio of the best to the row it is compared with.

- ``perplexity base`` / ``ppldelta build``: ``llama-perplexity --kl-divergence-base base.kld``
  vs ``ppldelta reference build GGUF --text FILE --protocol llama.cpp`` (whole processes);
- ``perplexity kld`` / ``ppldelta eval``: ``llama-perplexity --kl-divergence`` of the quant
  against base.kld vs ``ppldelta eval base.ppldref QUANT`` (whole processes);
- in one process, on the chunks of the same tokens: ``forward`` (``Llama.eval`` of each chunk with
  ``logits_all``, nothing else: llama-cpp-python's own throughput), ``forward, scored rows``
  (libllama's decode asking logits for the scored rows only, as llama-perplexity does: the
  ceiling), ``token_log_probs`` (ppldelta's scoring of the chunks);
- ``(eval route)`` rows: the same through ``Llama.eval`` (``_decodes_directly`` switched off):
  ppldelta before this change.

    PYTHONPATH=$SRC LLAMA_CPP_LIB_PATH=$SRC/vendor/llama.cpp/build/bin \\
    python benchmarks/bench_gguf.py --gguf base.gguf --quant q8.gguf --text wiki.txt --lines 120 \\
        --bin $SRC/vendor/llama.cpp/build/bin --work /tmp/gguf --repeat 3 [--only tools|inproc]

($SRC: the llama-cpp-python sdist, as .ci/agreement builds it; the quant made with
``llama-quantize --allow-requantize base.gguf q8.gguf Q8_0 2``.)

Measured on the CPU (2 cores, AVX2 build, a quiet machine: load 0.2 at the start),
SmolLM2-135M-Instruct Q4_1 (vocab 49152) and its Q8_0, the first 120 lines of WikiText-2 test:
7,462 tokens, 14 chunks of n_ctx 512, 3,570 scored tokens, 2 threads, llama-cpp-python 0.3.36;
best of 3 alternating runs, spread = (worst - best) / best, 2026-11-28:

    configuration                    best s  spread   ratio
    perplexity base                   26.33    15%
    ppldelta build                    27.00    22%   1.025 x perplexity base
    ppldelta build (eval route)       28.42    32%   1.079 x perplexity base
    perplexity kld                    15.69    26%
    ppldelta eval                     18.57    17%   1.184 x perplexity kld
    ppldelta eval (eval route)        22.43     3%   1.429 x perplexity kld
    forward                           27.25     3%
    forward, scored rows              25.35     5%   0.930 x forward
    token_log_probs                   25.99    11%   0.954 x forward
    token_log_probs (eval route)      28.43     3%   1.043 x forward

So a reference build keeps llama-perplexity's pace (1.03x its base run, which writes the
uint16 file) and an eval costs 1.18x its --kl-divergence run (was 1.43x through ``Llama.eval``:
every position's logits, all copied into ``Llama.scores``).  In one process ppldelta's scoring
is 0.95x llama-cpp-python's own forward (the rows not scored get no logits), against 0.93x for
the decode alone: ppldelta's own work (the log-prob kernel, the top-K and probes, a float64
copy of a few rows at a time) is about 2-4 % of the time; libllama's decode is the rest (87 %
of a build under cProfile).  The eval's extra 18 % was mostly importing torch (1.6 s under
cProfile) to ask whether a torch.distributed group was running; a process that never imported
torch, outside a torchrun world above one, now skips that (``hf._dist``): then, 3 alternating
runs each on the same machine, ``perplexity kld`` 16.34 s against ``ppldelta eval`` 17.78 s
(best of each), 1.09x.  What is left: the float64 copy of each row block (the C kernels take
float32 rows only with other bits) and the comparison kernel (about 1.3 s of the eval).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _run(cmd, env=None):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout.decode(errors='replace')[-3000:]}")


_EVAL_ROUTE = ("import sys; from ppldelta import llamacpp, cli; "
               "llamacpp._decodes_directly = lambda llama: False; sys.exit(cli.main(sys.argv[1:]))")


def tool_configs(a, text):
    ppl = os.path.join(a.bin, "llama-perplexity")
    base_kld, ref = os.path.join(a.work, "base.kld"), os.path.join(a.work, "base.ppldref")
    common = ["-f", text, "-c", str(a.n_ctx), "-b", str(a.n_ctx), "-t", str(a.threads)]
    py = [sys.executable, "-m", "ppldelta"]
    old = [sys.executable, "-c", _EVAL_ROUTE]
    build = ["reference", "build", a.gguf, "--text", text, "--protocol", "llama.cpp", "-o", ref,
             "--overwrite", "--no-progress"]
    ev = ["eval", ref, a.quant, "--no-progress"]
    return {
        "perplexity base": lambda: _run([ppl, "-m", a.gguf, "--kl-divergence-base", base_kld] + common),
        "ppldelta build": lambda: _run(py + build),
        "ppldelta build (eval route)": lambda: _run(old + build),
        "perplexity kld": lambda: _run([ppl, "-m", a.quant, "--kl-divergence-base", base_kld,
                                        "--kl-divergence"] + common),
        "ppldelta eval": lambda: _run(py + ev),
        "ppldelta eval (eval route)": lambda: _run(old + ev),
    }


def inproc_configs(a, text):
    import llama_cpp

    from ppldelta import llamacpp

    llama = llamacpp.load_gguf(a.gguf, n_ctx=a.n_ctx, n_threads=a.threads, n_threads_batch=a.threads)
    ids = np.asarray(llama.tokenize(llamacpp.prompt_bytes(open(text, "rb").read()), add_bos=True,
                                    special=False), np.int64)
    bos = llamacpp._bos_of(llama, None)
    windows = list(llamacpp._chunks(ids.size, a.n_ctx, llamacpp._first_scored(a.n_ctx), bos))

    def forward():
        for w in windows:
            chunk = ids[w.start : w.end].tolist()
            if w.bos is not None:
                chunk[0] = w.bos
            llama.reset()
            llama.eval(chunk)

    def scored():
        for w in windows:
            llamacpp._decode_rows_of(llama, ids[w.start : w.end], w.bos, w.a - w.start, w.b - w.start)

    def ours():
        llamacpp.token_log_probs(llama, ids, n_ctx=a.n_ctx)

    def ours_old():
        real = llamacpp._decodes_directly
        llamacpp._decodes_directly = lambda llama: False
        try:
            llamacpp.token_log_probs(llama, ids, n_ctx=a.n_ctx)
        finally:
            llamacpp._decodes_directly = real

    assert llamacpp._decodes_directly(llama), "this libllama offloads to a GPU: the fast route is off"
    print(f"in process: {ids.size} tokens, {len(windows)} chunks, llama-cpp-python {llama_cpp.__version__}",
          flush=True)
    return {"forward": forward, "forward, scored rows": scored, "token_log_probs": ours,
            "token_log_probs (eval route)": ours_old}


COMPARE = {"ppldelta build": "perplexity base", "ppldelta build (eval route)": "perplexity base",
           "ppldelta eval": "perplexity kld", "ppldelta eval (eval route)": "perplexity kld",
           "forward, scored rows": "forward", "token_log_probs": "forward",
           "token_log_probs (eval route)": "forward"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="the base GGUF")
    ap.add_argument("--quant", required=True, help="a quantized variant of it (e.g. Q8_0)")
    ap.add_argument("--text", required=True)
    ap.add_argument("--lines", type=int, default=None, help="use the text's first N lines only")
    ap.add_argument("--bin", required=True, help="the folder of llama-perplexity")
    ap.add_argument("--work", required=True, help="a folder for the text, base.kld and base.ppldref")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["tools", "inproc"], default=None)
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    text = a.text
    if a.lines:
        text = os.path.join(a.work, f"text-{a.lines}.txt")
        with open(a.text, encoding="utf-8") as f, open(text, "w", encoding="utf-8") as out:
            out.writelines(line for _, line in zip(range(a.lines), f))
    configs = {}
    if a.only != "inproc":
        configs.update(tool_configs(a, text))
    if a.only != "tools":
        configs.update(inproc_configs(a, text))
    times = {k: [] for k in configs}
    for r in range(a.repeat):
        for name, fn in configs.items():
            times[name].append(_timed(fn))
            print(f"round {r + 1}: {name:30s} {times[name][-1]:7.2f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"\n    {'configuration':30s} {'best s':>8s} {'spread':>7s}   ratio")
    for k, v in times.items():
        ref = COMPARE.get(k)
        ratio = f"{best[k] / best[ref]:.3f} x {ref}" if ref in best else ""
        print(f"    {k:30s} {best[k]:8.2f} {(max(v) - best[k]) / best[k]:6.0%}   {ratio}")


if __name__ == "__main__":
    main()
