"""Write golden_smollm2.json: Hugging Face transformers' logits for SmolLM2-135M-Instruct on fixed prompts.

tests/test_golden.py checks model.py against this file, so the project's test suite never needs
`transformers` (it is not, and must not become, a dependency). This script is run BY HAND, in a scratch
virtual environment outside the repository, whenever the fixture has to be regenerated:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    HF_HUB_OFFLINE=1 /tmp/hfvenv/bin/python tests/reference/make_golden.py

(run from the repository root; --model-dir defaults to ~/.cache/sirius-min/SmolLM2-135M-Instruct, the
folder convert_gguf.py produces). The reference is transformers' `LlamaForCausalLM` in fp32 on the CPU,
eval mode, with attn_implementation="eager": the plain matmul-softmax-matmul path, so the golden values
do not depend on which fused SDPA kernel this torch build picks. Only the folder's own files are read;
nothing is fetched from a hub.

Per prompt the file keeps the token ids and, at every position, the top-10 token ids with their logits
(7 significant digits). Ten logits per position are enough to pin down the model to well below any
real bug, while the whole file stays a few tens of kB instead of T x 49152 floats.
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is all we have; never try the network

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

TOP_K = 10
DEFAULT_DIR = Path("~/.cache/sirius-min/SmolLM2-135M-Instruct").expanduser()
OUT = Path(__file__).resolve().parent / "golden_smollm2.json"

# Three kinds of input the model sees in practice: prose, code with digits and symbols, and the chat
# format with its special tokens (ChatML, as SmolLM2-Instruct was trained on).
PROMPTS = {
    "english": "The old lighthouse keeper climbed the winding stairs every evening to light the lamp.",
    "code": "def area(r):\n    return 3.14159 * r ** 2\n\nprint(area(12), 2 + 40 == 42, [7, 8, 9][-1])",
    "chat": "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n"
            "<|im_start|>assistant\n",
}


def sig7(x: float) -> float:
    return float(f"{x:.7g}")


@torch.no_grad()
def golden(model, ids: list) -> list:
    logits = model(torch.tensor([ids])).logits[0].float()              # (T, vocab)
    values, indices = logits.topk(TOP_K, dim=-1)
    return [{"ids": i.tolist(), "logits": [sig7(v) for v in vs.tolist()]} for i, vs in zip(indices, values)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = tokenizers.Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="eager",
                                             local_files_only=True).eval()
    data = {
        "model": args.model_dir.name,
        "reference": "transformers LlamaForCausalLM, fp32, CPU, eval, no_grad, attn_implementation=eager",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "top_k": TOP_K,
        "prompts": [],
    }
    for name, text in PROMPTS.items():
        ids = tok.encode(text).ids
        data["prompts"].append({"name": name, "text": text, "ids": ids, "positions": golden(model, ids)})
        print(f"{name}: {len(ids)} tokens")
    args.out.write_text(_compact(data) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


def _compact(data: dict) -> str:
    """JSON with one position per line: small, and a regenerated fixture gives a readable diff."""
    head = {k: v for k, v in data.items() if k != "prompts"}
    out = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + [' "prompts": [']
    for n, p in enumerate(data["prompts"]):
        out.append("  {")
        out += [f"   {json.dumps(k)}: {json.dumps(p[k])}," for k in ("name", "text", "ids")]
        out.append('   "positions": [')
        out += [f"    {json.dumps(pos)}{',' if j < len(p['positions']) - 1 else ''}"
                for j, pos in enumerate(p["positions"])]
        out.append("   ]")
        out.append("  }" + ("," if n < len(data["prompts"]) - 1 else ""))
    out += [" ]", "}"]
    return "\n".join(out)


if __name__ == "__main__":
    main()
