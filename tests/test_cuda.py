"""The GPU path: run where CUDA exists, skipped elsewhere (the project's CI machines have no GPU).

What a CPU cannot check: CUDA against the CPU (fp32); strict Sirius = dense greedy on the device (fp32
exactly; bf16 trees up to near-ties, see below); captured graphs against eager; SDPA's flash and
memory-efficient kernels against its math kernel; the host waits of a period and of a token; peak memory.
`bash tests/gpu_check.sh` runs this file with -s, so the timings and memory figures printed here are kept.

Every model here has random weights (bench.random_llama), so nothing needs a checkpoint: SmolLM2-135M's
shape (model.LlamaConfig's defaults: 30 layers, tied) where the text does not matter, and where it does (the
tokens Sirius keeps) a 4-layer untied model of its widths whose lm_head is scaled up: a deep random model
repeats one or two tokens, and a flat next-token distribution would make the paper's rule reject every
draft. The 4 layers also keep cold compiles short. Prompts are random token ids. Errors are relative to
the output's scale (conftest.rel_err). A bf16 result is judged against what bf16 itself costs: its distance
from the fp32 model on the same input.
"""
import contextlib
import dataclasses
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import graphs
import kernels
import sirius_min
from conftest import rel_err
from model import LlamaConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPE = LlamaConfig()                                  # SmolLM2-135M's shape


def prompts(n=6, length=40):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(SHAPE.vocab_size, (length,), generator=g).cuda() for _ in range(n)]


@pytest.fixture(scope="module")
def cpu_model():
    return bench.random_llama(SHAPE, "cpu", torch.float32, max_seq_len=512)


@pytest.fixture(scope="module")
def cuda_model(cpu_model):
    """The same weights in fp32 on the GPU, TF32 off: fp32 means fp32 here, comparable with the CPU."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    model = bench.random_llama(SHAPE, "cuda", torch.float32, max_seq_len=512)
    model.load_state_dict(cpu_model.state_dict())
    yield model
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(scope="module")
def cuda_bf16(cpu_model):
    model = bench.random_llama(SHAPE, "cuda", torch.bfloat16, max_seq_len=512)
    model.load_state_dict(cpu_model.state_dict())
    return model


def varied(dtype):
    """4 layers of SmolLM2's widths, untied, the lm_head x 15 (on a CPU: AAL about 1.3 under the paper's
    rule at K = 8, coarse, and about 5 for a strict fine w = 4 tree, with corrections in both)."""
    cfg = dataclasses.replace(SHAPE, num_hidden_layers=4, tie_word_embeddings=False)
    model = bench.random_llama(cfg, "cuda", dtype, max_seq_len=512)
    with torch.no_grad():
        model.lm_head.mul_(15)
    return model


@pytest.fixture(scope="module")
def small_cuda(cuda_model):                  # cuda_model first: TF32 off
    return varied(torch.float32)


@pytest.fixture(scope="module")
def small_bf16():
    return varied(torch.bfloat16)


def count_syncs(fn):
    """fn()'s result and how many times it made the host wait for the GPU, as counted by torch's sync debug
    mode (it flags .item(), .tolist(), bool(), nonzero, blocking copies ...; docs: not every such call)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")               # every occurrence, not once per line
            result = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return result, sum("called a synchronizing" in str(w.message) for w in caught)


# --- CUDA computes what the CPU computes ----------------------------------------------------------------

def test_cuda_logits_match_cpu_fp32(cpu_model, cuda_model):
    ids, model = prompts(1)[0].cpu(), cpu_model
    cpu, gpu = model(ids, 0), cuda_model(ids.cuda(), 0).cpu()
    assert rel_err(gpu, cpu) <= 1e-4
    # and decoding through the cache (a multi-token pass after the prompt) agrees too
    step_cpu = model(ids[:5], len(ids))
    step_gpu = cuda_model(ids[:5].cuda(), len(ids)).cpu()
    assert rel_err(step_gpu, step_cpu) <= 1e-4


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
@pytest.mark.parametrize("width", [1, 4])
def test_cuda_strict_sirius_is_dense_greedy(small_cuda, sparsity, width):
    prompt = prompts(1)[0]
    dense = sirius_min.generate(small_cuda, prompt, 48).tokens
    res = sirius_min.sirius(small_cuda, prompt, 48, sparsity=sparsity, width=width, period=8, strict=True)
    assert res.tokens == dense and res.corrections > 0


# --- bf16 trees: strict Sirius is dense greedy up to near-ties ---------------------------------------------

def one_token_vs_one_pass(model, prompt, tokens):
    """Logits (n, V) fp32 of `tokens` after `prompt`, decoded one token at a time (as generate does), and
    the largest difference from the same logits computed in one multi-token pass: the rounding noise of
    computing a position in a wide pass rather than a one-token step."""
    seq = torch.cat([prompt, torch.tensor(tokens, device=prompt.device)])
    step = [model(prompt, 0, last_only=True)]
    step += [model(seq[i:i + 1], i) for i in range(len(prompt), len(seq) - 1)]
    step = torch.cat(step).float()                                         # predictions of tokens[0..n-1]
    wide = model(seq[:-1], 0)[len(prompt) - 1:].float()
    return step, float((step - wide).abs().max())


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
def test_cuda_bf16_strict_tree_sirius_is_dense_greedy_up_to_near_ties(small_bf16, sparsity):
    """In bf16, strict Sirius (w = 4) takes each token as the argmax of logits computed in K-token tree
    passes, dense greedy as the argmax of one-token steps: the two round differently, so where the top two
    logits (nearly) tie they may pick different tokens, and the texts part there. (bf16 logits tie exactly
    at times: near 20 its steps are 0.125 apart.) Asserted: most prompts give the dense tokens exactly, and
    where one does not, the first differing token was a near-tie: the dense logits of the two tokens differ
    by at most twice the noise, the largest difference between logits computed in one-token steps and in
    one wide causal pass (a proxy for the tree passes' noise, which is not measured separately)."""
    same, corrections = 0, 0
    for prompt in prompts():
        dense = sirius_min.generate(small_bf16, prompt, 32).tokens
        res = sirius_min.sirius(small_bf16, prompt, 32, sparsity=sparsity, width=4, period=8, strict=True)
        corrections += res.corrections
        if res.tokens == dense:
            same += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(dense, res.tokens)) if a != b)
        logits, noise = one_token_vs_one_pass(small_bf16, prompt, dense)
        gap = float(logits[i, dense[i]] - logits[i, res.tokens[i]])
        print(f"\n{sparsity}: parts from dense at token {i}: logit gap {gap:.4f}, noise {noise:.4f}")
        assert gap <= 2 * noise
    print(f"\nbf16 strict Sirius w = 4 ({sparsity}): {same}/6 prompts give the dense tokens")
    assert same > 6 / 2 and corrections > 0


# --- graph capture: torch.compile(mode="reduce-overhead") -------------------------------------------------

def test_cuda_compiled_decoding_gives_the_eager_tokens(small_cuda):
    """generate(graphs.capture(model)) runs the one-token step as a captured graph. fp32 (TF32 off), so that
    "the same tokens" is a fair demand: the compiler fuses norms and RoPE into kernels that round differently
    from eager's, which in bf16 could flip a near-tie."""
    prompt = prompts(1)[0]
    runs = {}
    for compiled in (False, True):
        model = graphs.capture(small_cuda) if compiled else small_cuda
        sirius_min.generate(model, prompt, 48)                              # warm-up: compiles, captures
        runs[compiled] = sirius_min.generate(model, prompt, 48)
    print(f"\n4 layers fp32, 48 tokens: eager {runs[False].ms_per_token:.2f} ms/token, "
          f"compiled {runs[True].ms_per_token:.2f} ms/token")
    assert runs[True].tokens == runs[False].tokens


@pytest.mark.parametrize("sparsity, width, strict", [("coarse", 1, False), ("fine", 4, True)])
def test_cuda_compiled_sirius_gives_the_eager_tokens(small_cuda, sparsity, width, strict):
    """sirius(graphs.capture(model)): every decode pass and the verification with its verdict replayed as
    CUDA graphs, fp32 with TF32 off (as above: exact equality is fair in fp32), under the paper's rule and
    strict, and at most one wait for the host per period (besides the first token's and the clock's)."""
    prompt = prompts(1)[0]
    kw = dict(sparsity=sparsity, width=width, period=8, strict=strict)
    eager = sirius_min.sirius(small_cuda, prompt, 48, **kw)
    model = graphs.capture(small_cuda)
    sirius_min.sirius(model, prompt, 48, **kw)                              # warm-up: compiles, captures
    compiled, syncs = count_syncs(lambda: sirius_min.sirius(model, prompt, 48, **kw))
    print(f"\n4 layers fp32 Sirius {sparsity} w = {width} strict={strict}: eager "
          f"{eager.ms_per_token:.2f} ms/token, compiled {compiled.ms_per_token:.2f} ms/token, "
          f"{syncs} waits for {len(compiled.advances)} periods")
    assert (compiled.tokens, compiled.advances) == (eager.tokens, eager.advances)
    assert compiled.corrections > 0
    assert syncs <= 1 + len(compiled.advances) + 2        # the first token, a read-back a period, the clock


# --- SDPA's fused kernels take our passes and agree with its math kernel --------------------------------

def test_cuda_one_token_steps_on_the_flash_kernel_match_math(cuda_model, cuda_bf16):
    """One-token steps pass no mask, so flash attention can take them (forced here: it raises if it cannot).
    In bf16 any change of rounding order grows over 30 layers to the size of bf16's own error, so flash is
    not compared with math directly: it must be about as close to the fp32 model as math is (within 2x;
    a wrong mask or head layout would be off by far more)."""
    ids = prompts(2)[1]
    prompt, steps = ids[:-8], ids[-8:]

    def decode(model, backend):
        model(prompt, 0)
        with sdpa_kernel(backend):
            return torch.cat([model(steps[i:i + 1], len(prompt) + i) for i in range(len(steps))]).float()

    flash, math = decode(cuda_bf16, SDPBackend.FLASH_ATTENTION), decode(cuda_bf16, SDPBackend.MATH)
    fp32 = decode(cuda_model, SDPBackend.MATH)
    print(f"\none-token steps, bf16 vs fp32: flash {rel_err(flash, fp32):.2e}, "
          f"math {rel_err(math, fp32):.2e}")
    assert rel_err(flash, fp32) <= 2 * rel_err(math, fp32)


def tree_passes(model, prompt, tokens, backend, period=8, width=4):
    """The attention of a Sirius tree (K = 8, w = 4) after `prompt`: a draft pass per depth, then the verify
    pass over all 1 + (K-1)·w nodes, each with its tree positions and mask; their logits (fp32), in order."""
    from bench import side_by_side_chains
    depth, sees = side_by_side_chains(period, width, prompt.device)
    pos, n = len(prompt), len(depth)
    depths = [range(0, 1)] + [range(1 + (d - 1) * width, 1 + d * width) for d in range(1, period)]
    model(prompt, 0)
    out = []
    for nodes in depths + [range(0, n)]:
        args = sirius_min.tree_pass_args(sees, pos, nodes, depth, width)
        # Only masked passes are forced: the root's one-token pass has no mask and grouped heads, which
        # the memory-efficient kernel does not take; SDPA is expected to pick flash (math in fp32).
        with sdpa_kernel(backend) if "mask" in args else contextlib.nullcontext():
            out.append(model(tokens[nodes.start:nodes.stop], pos + nodes.start, **args))
    return torch.cat(out).float()


def test_cuda_tree_passes_on_the_efficient_kernel_match_math(cuda_model, cuda_bf16):
    """Masked multi-token passes with grouped heads must reach SDPA's memory-efficient kernel (forced on
    them: it raises if it cannot) and give math's numbers: within 1e-4 in fp32; in bf16 about as close to
    the fp32 model as math is (within 2x, as for flash above)."""
    prompt, tokens = prompts(4)[2], prompts(4)[3]                      # >= 29 nodes' tokens
    eff32 = tree_passes(cuda_model, prompt, tokens, SDPBackend.EFFICIENT_ATTENTION)
    math32 = tree_passes(cuda_model, prompt, tokens, SDPBackend.MATH)
    eff16 = tree_passes(cuda_bf16, prompt, tokens, SDPBackend.EFFICIENT_ATTENTION)
    math16 = tree_passes(cuda_bf16, prompt, tokens, SDPBackend.MATH)
    print(f"\ntree passes: fp32 efficient vs math {rel_err(eff32, math32):.2e}; bf16 vs fp32: efficient "
          f"{rel_err(eff16, math32):.2e}, math {rel_err(math16, math32):.2e}")
    assert rel_err(eff32, math32) <= 1e-4
    assert rel_err(eff16, math32) <= 2 * rel_err(math16, math32)


# --- the host waits for the GPU once per period, once per token -------------------------------------------

@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
@pytest.mark.parametrize("width", [1, 4])
def test_cuda_a_sirius_period_waits_once(cuda_bf16, sparsity, width):
    """Drafting, verifying and choosing stay on the device; the period reads back one packed tensor."""
    prompt = prompts(5)[4]
    logits, sparse_mlp = sirius_min.prefill_and_sparse_mlp(cuda_bf16, prompt, sparsity, 0.5)
    state = {"t0": logits[-1].argmax().view(1), "pos": len(prompt)}

    def periods(n):
        for _ in range(n):
            drafts, _, state["t0"] = sirius_min.sirius_period(
                cuda_bf16, sparse_mlp, state["t0"], state["pos"], period=8, width=width)
            state["pos"] += 1 + len(drafts)

    periods(1)                                       # first calls: library set-up, allocations
    _, syncs = count_syncs(lambda: periods(6))
    assert syncs == 6


@pytest.mark.parametrize("sparsity", ["dense", "fine", "coarse"])
def test_cuda_plain_decoding_waits_once_per_token(cuda_bf16, sparsity):
    """One wait per token (the slope over two lengths), and at most two besides: the clock's waits before
    and after decoding, where this torch counts torch.cuda.synchronize."""
    prompt = prompts(1)[0]
    sirius_min.generate(cuda_bf16, prompt, 4, sparsity=sparsity)                  # warm-up
    short, syncs_short = count_syncs(lambda: sirius_min.generate(cuda_bf16, prompt, 8, sparsity=sparsity))
    long, syncs_long = count_syncs(lambda: sirius_min.generate(cuda_bf16, prompt, 24, sparsity=sparsity))
    assert syncs_long - syncs_short == len(long.tokens) - len(short.tokens) == 16
    assert len(short.tokens) <= syncs_short <= len(short.tokens) + 2


# --- memory -----------------------------------------------------------------------------------------------

def test_cuda_peak_memory_of_a_demo_sized_run():
    """SmolLM2's shape in bf16, a 128-token dense run and a coarse Sirius tree run: the weights, coarse's copy
    of half the MLP, the cache and a prefill's activations: the peak is printed, bounded at 4x the weights."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = bench.random_llama(SHAPE, "cuda", torch.bfloat16, max_seq_len=1024)
    prompt = prompts(1)[0]
    sirius_min.generate(model, prompt, 128)
    sirius_min.sirius(model, prompt, 128, sparsity="coarse", width=4)
    peak = torch.cuda.max_memory_allocated() - before
    weights = kernels.param_count(model.cfg) * 2
    print(f"\npeak memory of a demo-sized run (SmolLM2's shape, bf16): {peak / 2**30:.3f} GiB, "
          f"weights {weights / 2**30:.3f} GiB")
    assert peak < 4 * weights
