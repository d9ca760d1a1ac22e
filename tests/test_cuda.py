"""The GPU path: run where CUDA exists, skipped elsewhere (the project's CI machines have no GPU)."""
import pytest
import torch

import run
from model import load_model
from sirius_min import generate, sirius

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model(smollm_dir):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here: compare with the CPU
    return load_model(smollm_dir, 512, torch.float32, "cuda")


def test_cuda_logits_match_cpu_fp32(smollm, cuda_model):
    model, tok = smollm
    ids = torch.tensor(run.chat_ids(tok, "Explain why the sky is blue, in two sentences."))
    cpu, gpu = model(ids, 0), cuda_model(ids.cuda(), 0).cpu()
    assert (cpu - gpu).abs().max() <= 1e-4 * cpu.abs().max()
    # and decoding through the cache (T = 1 passes, a multi-token pass in the middle) agrees too
    step_cpu = model(ids[:5], len(ids))
    step_gpu = cuda_model(ids[:5].cuda(), len(ids)).cpu()
    assert (step_cpu - step_gpu).abs().max() <= 1e-4 * step_cpu.abs().max()


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
@pytest.mark.parametrize("width", [1, 4])
def test_cuda_strict_sirius_is_dense_greedy(smollm, cuda_model, sparsity, width):
    _, tok = smollm
    question = "Sara has 3 boxes with 4 pencils in each. How many pencils?"
    prompt = torch.tensor(run.chat_ids(tok, question)).cuda()
    dense = generate(cuda_model, prompt, 48).tokens
    res = sirius(cuda_model, prompt, 48, sparsity=sparsity, width=width, period=8, strict=True)
    assert res.tokens == dense and res.corrections > 0


def test_cuda_demo_and_bench_smoke(smollm_dir, capsys):
    run.main(["--device", "cuda", "--max-new-tokens", "16"])                       # bf16 by default on CUDA
    run.main(["bench", "--quick", "--device", "cuda", "--max-new-tokens", "16"])
    out = capsys.readouterr().out
    assert "Sirius (coarse)" in out and "torch.bfloat16" in out and "dense decode reaches" in out
