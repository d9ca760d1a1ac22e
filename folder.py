"""A model folder as the command line opens it: its config, its tokenizer, and the prompt it asks for.

A Hugging Face folder says how its model is prompted: tokenizer_config.json (or chat_template.jinja) holds the
chat template, a Jinja program that turns a list of messages into text, with the special token strings it
writes (BOS, EOS, and any other it names); config.json and generation_config.json say which tokens end an
answer. The template is rendered as transformers' `apply_chat_template` renders it, and the ids are shown
equal to that function's (tests/test_prompts.py) but for two differences: a control token the user types
(`<|im_end|>`) stays text, and is not obeyed; and each message's text is stripped of the whitespace around it
first (chat_ids), so that with a template that does not trim it itself, a message ending in "\n" gives other
ids than transformers'. The weights come later (load_weights), once the longest prompt fixes the size of the
KV cache.
"""
import datetime
import functools
import json
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer

import kernels
from checkpoint import CheckpointError, json_field, load_model, read_config
from model import LlamaConfig
from sirius_min import cache_slots


class UsageError(Exception):
    """A bad value given by the user: reported in one line, exit code 2."""


@dataclass(frozen=True)
class Prompting:
    """What the folder's tokenizer_config.json asks of a prompt."""
    template: str | None        # the chat template (Jinja); None: the folder has none, prompts are plain text
    source: Path                # the file the template came from, named when it fails
    bos_token: str | None       # the strings the template writes for {{ bos_token }} and {{ eos_token }}
    eos_token: str | None
    bos_id: int | None          # bos_token's id in tokenizer.json
    add_bos_token: bool | None  # plain text starts with BOS; None: tokenizer.json's post-processor decides
    # Every special token the template sees by name ({{ sep_token }}, ...), as transformers passes them.
    special_tokens: dict = field(default_factory=dict)


class Folder(NamedTuple):
    """What the command line reads from a model folder before its weights."""
    cfg: LlamaConfig
    tok: Tokenizer
    prompting: Prompting
    stop_ids: list              # token ids that end an answer


def open_model_folder(args) -> Folder:
    """Threads, and the model folder's config, tokenizer and prompt format (the weights come later)."""
    torch.set_num_threads(args.threads)
    if args.model is None:
        from convert_gguf import default_model_dir
        try:  # the first run converts the embedded model; what can go wrong there is the installation's
            args.model = default_model_dir()
        except (OSError, ValueError) as e:
            raise CheckpointError(str(e)) from None
    cfg = read_config(args.model)
    tok = load_tokenizer(args.model, cfg.vocab_size)
    return Folder(cfg, tok, read_prompting(args.model, tok), read_stop_ids(args.model, cfg))


def read_text(path, error=CheckpointError) -> str:
    """A UTF-8 text file's content, or `error` in one line naming the file: missing (or a dangling link),
    not a regular file (a folder; a FIFO, which would block a plain open; a device), unreadable, or not UTF-8
    (naming the line). Opened without blocking, and its kind read from what was opened."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        why = "a dangling symbolic link" if path.is_symlink() else "no such file"
        raise error(f"{path}: {why}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
            raise error(f"{path}: not a regular file ({kind})")
        with open(fd, "rb", closefd=False) as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{path}: line {line} is not valid UTF-8") from None


def present(path: Path) -> bool:
    """Whether an optional file of the folder is there: anything by that name, a broken link included, is
    read (and refused by read_text if it is not a readable UTF-8 file), not silently skipped."""
    return path.exists() or path.is_symlink()


def load_tokenizer(model_dir, vocab_size=None) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not present(path):
        raise CheckpointError(f"no tokenizer.json in {model_dir}")
    text = read_text(path)
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
        raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=0)
    if vocab_size is not None and top >= vocab_size:
        raise CheckpointError(f"{path}: token id {top} is beyond the model's vocabulary ({vocab_size})")
    return tok


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:  # its message gives the line and column
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_prompting(model_dir, tok: Tokenizer) -> Prompting:
    """The chat template and special tokens of tokenizer_config.json; a folder without one prompts in plain
    text, with the BOS (or none) that its tokenizer.json adds."""
    path = Path(model_dir) / "tokenizer_config.json"
    conf = read_json_object(path) if present(path) else {}
    template = json_field(conf, "chat_template", "string", "list of object", "null", source=path)
    source = path
    if isinstance(template, list):  # several named templates (e.g. "default", "tool_use"): the default one
        named = {json_field(t, "name", "string", name="chat_template's name", source=path):
                 json_field(t, "template", "string", name="chat_template's template", source=path)
                 for t in template}
        if "default" not in named:
            raise CheckpointError(f"{path}: chat_template lists no template named 'default'")
        template = named["default"]
    if present(Path(model_dir) / "chat_template.jinja"):  # where newer transformers save it; it wins
        source = Path(model_dir) / "chat_template.jinja"
        template = read_text(source)
    specials = special_tokens(conf, path)
    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    add_bos = json_field(conf, "add_bos_token", "boolean", "null", source=path)
    bos_id = tok.token_to_id(bos) if bos is not None else None
    if add_bos and bos_id is None:
        raise CheckpointError(f"{path}: add_bos_token is true but bos_token {bos!r} is not in tokenizer.json")
    return Prompting(template or None, source, bos, eos, bos_id, add_bos, specials)


NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def special_tokens(conf, path) -> dict:
    """The special tokens a template sees, as transformers 5 builds its special_tokens_map from
    tokenizer_config.json: the seven named ones; any other `*_token` key holding a token (Gemma's
    image_token, ...), and the entries of an `extra_special_tokens` object, under their names. A list of
    additional_special_tokens (or extra_special_tokens) is not passed: transformers 5 passes no list."""
    extra = json_field(conf, "extra_special_tokens", "object", "list of string", "null", source=path)
    named = [k for k, v in conf.items() if k.endswith("_token") and k not in NAMED_TOKENS
             and (isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str))]
    tokens = {k: token_text(conf, k, path) for k in NAMED_TOKENS + tuple(named)}
    if isinstance(extra, dict):
        tokens.update({k: token_text(extra, k, path, "extra_special_tokens.") for k in extra})
    return {k: v for k, v in tokens.items() if v is not None}


def token_text(tokens: dict, key, path, within=""):
    """A special token as tokenizer_config.json writes it: a string, or (older files) {"content": ...}."""
    value = json_field(tokens, key, "string", "object", "null", name=within + key, source=path)
    if isinstance(value, dict):
        value = json_field(value, "content", "string", name=f"{within}{key}.content", source=path)
        if value is None:
            raise CheckpointError(f"{path}: {within}{key} has no 'content'")
    return value


def read_stop_ids(model_dir, cfg) -> list:
    """Token ids that end an answer: config.json's eos_token_id and generation_config.json's (where e.g.
    Llama-3-Instruct lists its end of turn, <|eot_id|>). Nothing is guessed from token spellings."""
    stops, path = set(cfg.eos_token_id), Path(model_dir) / "generation_config.json"
    if present(path):
        eos = json_field(read_json_object(path), "eos_token_id", "integer", "list of integer", "null",
                         source=path)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not all(0 <= e < cfg.vocab_size for e in eos):
            raise CheckpointError(f"{path}: eos_token_id {eos} is not a token id of the model's vocabulary "
                                  f"({cfg.vocab_size})")
        stops |= set(eos)
    return sorted(stops)


# --- building a prompt ---------------------------------------------------------------------------------

@functools.lru_cache
def compile_template(template: str):
    """The Jinja environment transformers renders chat templates in: sandboxed, trim_blocks and lstrip_blocks,
    a `raise_exception` the template can call, a `tojson` that does not escape HTML, `strftime_now`, and the
    `{% generation %}` block."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's text, for transformers to return a
        mask of the tokens to train on. A prompt needs no mask: the block is its body, as transformers
        renders it when no mask is asked for."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("body"), [], [], body).set_lineno(lineno)

        def body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render(prompting: Prompting, messages) -> str:
    """The template's text for these messages, ending in the start of the assistant's turn."""
    try:  # an absent special token is not passed (it renders as "", not "None")
        return compile_template(prompting.template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True,
            **prompting.special_tokens)
    except Exception as e:  # the template is the folder's program: whatever it raises is the folder's fault
        why = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{prompting.source}: the chat template fails ({type(e).__name__}: {why})") \
            from None


def few_shot(user: str, examples=()) -> list:
    """The chat messages of a question after worked examples given as earlier (question, answer) turns."""
    messages = []
    for question, answer in examples:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": user}]


def chat_ids(tok: Tokenizer, prompting: Prompting, messages) -> list:
    """The messages ({"role", "content"} dicts) in the folder's chat template, ready for the assistant's turn.
    The ids are transformers' (the rendered text with its special tokens, nothing added) for the messages with
    their text stripped, except where a message holds a control token: typed by the user, it is spelled out
    as text. The texts are stripped first because many templates trim them, and a text the template changes
    cannot be found in the rendering; with a template that does not trim, a text with whitespace around it
    gives other ids than transformers'."""
    texts = [m["content"].strip() for m in messages]
    # Render once with a mark in place of each message's text, then put the texts in, noting where they go.
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]  # in no template
    parts = re.split("\ue000(\\d+)\ue001", render(prompting, marked))  # template text, message number, ...
    text, spans = parts[0], []
    for n, after in zip(parts[1::2], parts[2::2]):
        spans.append((len(text), len(text) + len(texts[int(n)])))
        text += texts[int(n)] + after
    if text != render(prompting, [{**m, "content": t} for m, t in zip(messages, texts)]):
        raise CheckpointError(f"{prompting.source}: the chat template rewrites the messages' text, which "
                              "sirius-min must find in the rendering to keep typed control tokens as text; "
                              "use --no-chat")
    encoding = tok.encode(text, add_special_tokens=False)  # as transformers tokenizes a rendered chat
    control = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    ids = []
    for i, (start, end) in zip(encoding.ids, encoding.offsets):
        typed = i in control and any(start < b and a < end for a, b in spans)
        ids += as_text(tok, text[start:end]) if typed else [i]
    return ids


def plain_ids(tok: Tokenizer, prompting: Prompting, user: str, examples=()) -> list:
    """The prompt as plain text (no template, or --no-chat), worked examples first, starting with the BOS the
    folder asks for: tokenizer_config.json's add_bos_token, else what tokenizer.json's post-processor adds."""
    text = "".join(f"{q}\n{a}\n\n" for q, a in examples) + user
    if prompting.add_bos_token is None:
        return as_text(tok, text, add_special_tokens=True)
    bos = [prompting.bos_id] if prompting.add_bos_token else []
    return bos + as_text(tok, text)


def as_text(tok: Tokenizer, text: str, add_special_tokens=False) -> list:
    """Ids of text in which a control token's spelling is text, not the token (the BOS a post-processor adds
    is still added)."""
    tok.encode_special_tokens = True
    try:
        return tok.encode(text, add_special_tokens=add_special_tokens).ids
    finally:
        tok.encode_special_tokens = False


STDIN_LIMIT = 1 << 24  # a prompt beyond 16 MiB fits no context; and /dev/zero would never end


def read_stdin_prompt() -> str:
    """`--prompt -`: the prompt from standard input, UTF-8, at most STDIN_LIMIT bytes."""
    if sys.stdin is None:
        raise UsageError("--prompt -: standard input is closed")
    data = sys.stdin.buffer.read(STDIN_LIMIT + 1)
    if len(data) > STDIN_LIMIT:
        raise UsageError(f"the prompt on stdin is longer than {STDIN_LIMIT >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"the prompt on stdin is not valid UTF-8 (line {line})") from None


def read_prompt(arg: str) -> str:
    """The prompt `--prompt` gives: the argument, or standard input for "-"; either way the UTF-8 text its
    bytes spell, without a leading byte-order mark (some editors put one first). argv's bytes are taken back
    from the text the locale decoded them to (os.fsencode), so that a C locale without UTF-8 mode accepts
    in argv the same bytes it accepts on stdin."""
    if arg == "-":
        return read_stdin_prompt().removeprefix("\ufeff")
    try:
        raw = os.fsencode(arg)
    except UnicodeEncodeError:  # not argv's bytes decoded (a caller's text the locale cannot spell): as given
        return arg.removeprefix("\ufeff")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UsageError("the prompt is not valid UTF-8") from None


def encode(args, folder: Folder, text: str, examples=()) -> torch.Tensor:
    """A user's prompt as the model's input ids, checked (not empty, valid UTF-8, fits the context)."""
    if not text.strip():
        raise UsageError("the prompt is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # argv that was not valid UTF-8 arrives with surrogate escapes
        raise UsageError("the prompt is not valid UTF-8") from None
    if args.chat and folder.prompting.template:
        ids = chat_ids(folder.tok, folder.prompting, few_shot(text, examples))
        if not ids:  # the template's output: a folder's fault, like any other way its template fails
            raise CheckpointError(f"{folder.prompting.source}: the chat template renders an empty prompt")
    else:
        ids = plain_ids(folder.tok, folder.prompting, text, examples)
    if len(ids) + args.max_new_tokens > folder.cfg.max_position_embeddings:
        raise UsageError(f"the prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds "
                         f"the model's context of {folder.cfg.max_position_embeddings} tokens")
    return torch.tensor(ids, device=args.device)


def load_weights(args, cfg, longest_prompt, sirius=True):
    """The weights, with a KV cache just long enough for the longest request and, if Sirius runs
    (`sirius`), its last window. Refused before a byte of weights is read: a request whose cache would not
    fit the model's context, or whose weights and cache would not fit the memory. With --compile, the model
    comes wrapped so that its decode passes replay as CUDA graphs (graphs.capture)."""
    dtype = torch.bfloat16 if args.dtype == "auto" and args.device == "cuda" else \
        torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    width = max(args.width) if isinstance(args.width, list) else args.width
    period, width = (args.period, width) if sirius else (1, 1)
    slots = cache_slots(longest_prompt, args.max_new_tokens, period, width)
    if slots > cfg.max_position_embeddings:  # plain decoding fits: encode checked prompt + max_new_tokens
        raise UsageError(f"Sirius needs {slots} cache slots (prompt {longest_prompt} + --max-new-tokens "
                         f"{args.max_new_tokens} - 1 + (--period {period} - 1) x --width {width}), more than "
                         f"the model's context of {cfg.max_position_embeddings}: lower one of them")
    if cfg.sliding_window is not None and slots > cfg.sliding_window:  # a Llama within it; past it, not
        raise UsageError(f"this request needs {slots} cache slots (prompt {longest_prompt} + "
                         f"--max-new-tokens {args.max_new_tokens} - 1 + (--period {period} - 1) x --width "
                         f"{width}), past the model's sliding_window of {cfg.sliding_window}, where "
                         "attention is not implemented: lower one of them")
    check_memory(cfg, slots, 1 + (period - 1) * width, dtype, args.device)
    model = load_model(args.model, slots, dtype, args.device)
    if not args.compile:
        return model
    import graphs  # here, not at the top: it imports torch._dynamo (seconds), which only --compile needs
    return graphs.capture(model)


def check_memory(cfg, slots, window, dtype, device):
    """Refuse a request that cannot fit: the weights, the KV cache and one verify pass's logits (window, V)
    in float32 are held at once, a lower bound on what a run needs."""
    size = torch.finfo(dtype).bits // 8
    cache = 2 * cfg.num_hidden_layers * slots * cfg.num_key_value_heads * cfg.head_dim * size
    need = kernels.param_count(cfg) * size + cache + window * cfg.vocab_size * 4
    free = available_memory(device)
    if free is not None and need > free:
        raise UsageError(f"this request needs at least {need / 2 ** 30:.1f} GiB on {device} (weights, a KV "
                         f"cache of {slots} slots, a verify pass), {free / 2 ** 30:.1f} GiB are available")


def available_memory(device):
    """Bytes free for new tensors on device: CUDA's count, or Linux's MemAvailable (None: not known)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
