"""Greedy decoding speed, side by side: Hugging Face transformers' generate() and sirius_min.generate().

A sanity check that the plain-PyTorch decoder is not slower than the reference for a silly reason (and
that the two still agree token for token), not a benchmark. It needs transformers, which the project
does not depend on, so it is run BY HAND in the scratch environment that also makes the golden fixture:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tests/reference/hf_speed.py [-n 64] [--rounds 5]

Both models run in one process, one thread (torch.set_num_threads(1): on a shared CPU more threads
mostly measure the neighbours), fp32, on the same converted folder and the same chat prompt. EOS is
switched off on both sides so both decode exactly N tokens. HF uses its default SDPA attention.

Only decode time is compared. sirius_min's `ms_per_token` already excludes the prefill; generate()
offers no such split, so HF's decode ms/token is (time for N new tokens - time for 1 new token) / (N-1):
the 1-token call pays the same prefill and setup. The two are interleaved round by round, so drift in
the machine's load hits both, and medians over the rounds are reported.
"""
import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is all we have; never try the network
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repo is not installed in the scratch environment

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, LlamaForCausalLM  # noqa: E402

import sirius_min  # noqa: E402
from checkpoint import load_model  # noqa: E402
from folder import chat_ids, few_shot, load_tokenizer, read_prompting  # noqa: E402

DEFAULT_DIR = Path("~/.cache/sirius-min/SmolLM2-135M-Instruct").expanduser()
# A question with a long answer, so neither side would want to stop early anyway.
QUESTION = "Explain step by step why the sum of two odd numbers is always even."


def hf_generate(model, ids, n):
    """Greedy, exactly n new tokens: no EOS at all (so none is suppressed either, unlike min_new_tokens
    with an EOS set, which would make HF pick a different token wherever the model wants to stop)."""
    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=0, bos_token_id=None)
    start = time.perf_counter()
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), generation_config=cfg)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[0]:].tolist()
    assert len(new) == n, f"transformers generated {len(new)} tokens, not {n}"
    return new, seconds


def ours_generate(model, ids, n):
    """sirius_min.generate, dense, with no EOS; its signature may move, its first three arguments not."""
    params = inspect.signature(sirius_min.generate).parameters
    kwargs = {"eos_ids": ()} if "eos_ids" in params else {}
    res = sirius_min.generate(model, ids, n, **kwargs)
    assert len(res.tokens) == n, f"sirius_min generated {len(res.tokens)} tokens, not {n}"
    return res.tokens, res.ms_per_token


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--new-tokens", type=int, default=64, help="tokens to decode (>= 2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    n = args.new_tokens
    if n < 2 or args.rounds < 1:
        ap.error("need --new-tokens >= 2 and --rounds >= 1")
    torch.set_num_threads(1)

    tok = load_tokenizer(args.model_dir)
    ids = torch.tensor(chat_ids(tok, read_prompting(args.model_dir, tok), few_shot(QUESTION)))
    hf = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                          local_files_only=True).eval()
    ours = load_model(args.model_dir, max_seq_len=ids.shape[0] + n + 8)

    with torch.inference_mode():
        hf_generate(hf, ids, 2)           # warm-up: first calls pay one-off allocation and dispatch costs
        ours_generate(ours, ids, 2)
        hf_ms, our_ms = [], []
        for r in range(args.rounds):
            hf_tokens, t_n = hf_generate(hf, ids, n)
            _, t_1 = hf_generate(hf, ids, 1)
            our_tokens, ms = ours_generate(ours, ids, n)
            hf_ms.append(1000 * (t_n - t_1) / (n - 1))
            our_ms.append(ms)
            print(f"round {r + 1}/{args.rounds}: transformers {hf_ms[-1]:6.2f} ms/token, "
                  f"sirius_min {ms:6.2f} ms/token", flush=True)

    same = [a == b for a, b in zip(hf_tokens, our_tokens)]
    prefix = same.index(False) if False in same else n
    h, o = statistics.median(hf_ms), statistics.median(our_ms)
    print(f"\nSmolLM2-135M-Instruct, fp32, CPU, 1 thread, prompt {ids.shape[0]} tokens, {n} new tokens, "
          f"median of {args.rounds} rounds")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'':22s}{'decode ms/token':>16s}{'tokens/s':>10s}")
    print(f"{'transformers':22s}{h:16.2f}{1000 / h:10.1f}")
    print(f"{'sirius_min.generate':22s}{o:16.2f}{1000 / o:10.1f}")
    print(f"ratio transformers/sirius_min: {h / o:.2f}x")
    print(f"greedy tokens agreeing: first {prefix} of {n} identical ({sum(same)}/{n} position by position)")
    print(f"text: {tok.decode(our_tokens)[:160]!r}")


if __name__ == "__main__":
    main()
