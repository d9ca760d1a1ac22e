"""Prompts as the folder says: its chat template rendered as transformers renders it (checked against ids that
transformers' apply_chat_template wrote), typed control tokens kept as text, BOS exactly once with or without
a template, stop tokens from generation_config.json, and one error line for a broken prompt file."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import folder
import run
from bench import FEW_SHOT
from conftest import TINY_CONFIG, write_checkpoint
from checkpoint import CheckpointError
from test_run import error_of

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "checkpoints" / "chat" / "golden.json"  # by tests/reference/make_checkpoints.py
TEMPLATES = json.loads(GOLDEN.read_text())["templates"] if GOLDEN.is_file() else []


def prompting_for(tmp_path, tok, **tokenizer_config):
    """read_prompting on a folder holding only this tokenizer_config.json."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder.read_prompting(tmp_path, tok)


@pytest.fixture(scope="module")
def smollm_tok(smollm_dir):
    return folder.load_tokenizer(smollm_dir)


@pytest.fixture(scope="module")
def golden_tokenizers(smollm_dir):
    """The embedded model's tokenizer with each golden template's extra tokens added, as the golden's maker
    added them (as special tokens, in id order)."""
    made = {}
    for t in TEMPLATES:
        tok = folder.load_tokenizer(smollm_dir)
        tok.add_special_tokens([a["content"] for a in t["added_tokens"]])
        added = t["added_tokens"]
        assert [tok.token_to_id(a["content"]) for a in added] == [a["id"] for a in added]
        made[t["name"]] = tok
    return made


def golden_cases():
    cases = [pytest.param(t, c, id=f"{t['name']}-{c['conversation']}") for t in TEMPLATES for c in t["cases"]]
    return cases or [pytest.param(None, None, id="missing")]


@pytest.mark.parametrize("template, case", golden_cases())
def test_ids_equal_transformers(golden_tokenizers, tmp_path, template, case):
    if template is None:
        pytest.fail(f"{GOLDEN.relative_to(ROOT)} is missing (tests/reference/make_checkpoints.py writes it)")
    tok = golden_tokenizers[template["name"]]
    p = prompting_for(tmp_path, tok, chat_template=template["template"], bos_token=template["bos_token"],
                      eos_token=template["eos_token"])
    assert folder.render(p, case["messages"]) == case["text"]
    assert folder.chat_ids(tok, p, case["messages"]) == case["ids"]


SPECIALS = ROOT / "tests" / "checkpoints" / "chat_specials"  # a tokenizer folder, by make_checkpoints.py


def test_every_named_special_token_reaches_the_template():
    """tokenizer_config.json's special tokens as transformers 5 gives them to a template: the seven named ones
    (strings or AddedToken objects), any other `*_token` key and `extra_special_tokens` entry by name, and
    not the additional_special_tokens list. The text and ids are AutoTokenizer's apply_chat_template's."""
    golden = json.loads((SPECIALS / "golden.json").read_text())
    tok = folder.load_tokenizer(SPECIALS)
    p = folder.read_prompting(SPECIALS, tok)
    assert p.special_tokens == golden["special_tokens_map"]
    for case in golden["cases"]:
        assert folder.render(p, case["messages"]) == case["text"]
        assert folder.chat_ids(tok, p, case["messages"]) == case["ids"]


def test_the_embedded_folder_renders_its_own_template(smollm_tok, smollm_dir):
    """The converted folder carries the GGUF's template: the demo's prompt is SmolLM2's ChatML with its own
    system line, written out here by hand, and the few-shot examples are earlier turns."""
    tok = smollm_tok
    p = folder.read_prompting(smollm_dir, tok)
    system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
              "<|im_end|>\n")
    turn = "<|im_start|>{}\n{}<|im_end|>\n"
    shots = "".join(turn.format("user", q) + turn.format("assistant", a) for q, a in FEW_SHOT)
    want = system + shots + turn.format("user", run.DEMO_PROMPT) + "<|im_start|>assistant\n"
    assert folder.chat_ids(tok, p, folder.few_shot(run.DEMO_PROMPT, FEW_SHOT)) == tok.encode(want).ids
    assert folder.read_stop_ids(smollm_dir, SimpleNamespace(eos_token_id=[], vocab_size=49152)) == \
        [tok.token_to_id("<|im_end|>")]  # from the converted generation_config.json


def typed_cases():
    cases = [pytest.param(None, id="embedded")]
    return cases + [pytest.param(t, id=t["name"]) for t in TEMPLATES]


@pytest.mark.parametrize("template", typed_cases())
def test_typed_control_tokens_stay_text(smollm_tok, smollm_dir, golden_tokenizers, tmp_path, template):
    """A user who types the template's control tokens gets them as text: the prompt has exactly the control
    tokens of the same chat with plain words typed instead, and still decodes to the whole rendered text."""
    if template is None:
        tok, p = smollm_tok, folder.read_prompting(smollm_dir, smollm_tok)
    else:
        tok = golden_tokenizers[template["name"]]
        p = prompting_for(tmp_path, tok, chat_template=template["template"], bos_token=template["bos_token"],
                          eos_token=template["eos_token"])
    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    typed = [t for t in specials if t in folder.render(p, folder.few_shot("x"))] + ["<|im_end|>"]
    sneaky = f"Hi {' and '.join(typed)} there"
    plain = f"Hi {' and '.join('word' for _ in typed)} there"
    control = {tok.token_to_id(t) for t in specials}
    ids, reference = (folder.chat_ids(tok, p, folder.few_shot(q, FEW_SHOT[:1])) for q in (sneaky, plain))
    assert [i for i in ids if i in control] == [i for i in reference if i in control]
    rendered = folder.render(p, folder.few_shot(sneaky, FEW_SHOT[:1]))
    assert tok.decode(ids, skip_special_tokens=False) == rendered


def test_message_text_is_stripped_unlike_transformers(smollm_tok, tmp_path):
    """The second difference from transformers (folder.py's docstring): each message's text is stripped before
    rendering, so with a template that does not trim it, "Hi\n" is prompted as "Hi", where transformers keeps
    the newline; with a template that trims, the ids are transformers'."""
    messages = folder.few_shot("Hi\n")
    ids = lambda text: smollm_tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    plain = prompting_for(tmp_path / "plain", smollm_tok,
                          chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert folder.render(plain, messages) == "[Hi\n]"          # transformers' text: the newline kept
    assert folder.chat_ids(smollm_tok, plain, messages) == ids("[Hi]") != ids("[Hi\n]")
    trims = prompting_for(tmp_path / "trims", smollm_tok,
                          chat_template="{% for m in messages %}[{{ m['content'] | trim }}]{% endfor %}")
    assert folder.chat_ids(smollm_tok, trims, messages) == ids(folder.render(trims, messages)) == ids("[Hi]")


# --- BOS exactly once ------------------------------------------------------------------------------

WORDS = ["[UNK]", "<s>", "</s>", "hello", "world", "<", "s", ">"]


def word_tokenizer(bos_by_post_processor):
    """A tokenizer of WORDS split at whitespace and punctuation; <s> and </s> are its control tokens; its
    post-processor adds <s> in front, as Llama-1/2 tokenizer.json files do, or nothing."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    if bos_by_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.mark.parametrize("post_processor, add_bos_token, bos_count", [
    (True, None, 1), (True, True, 1), (False, True, 1),  # asked for once or twice: once
    (False, None, 0), (True, False, 0), (False, False, 0),
])
def test_plain_text_bos(tmp_path, post_processor, add_bos_token, bos_count):
    tok = word_tokenizer(post_processor)
    conf = {"bos_token": "<s>"}
    if add_bos_token is not None:
        conf["add_bos_token"] = add_bos_token
    p = prompting_for(tmp_path, tok, **conf)
    ids = folder.plain_ids(tok, p, "hello <s> world", [("hello", "world")])
    words = [3, 4, 3, 5, 6, 7, 4]  # hello world; hello, then the typed <s> as the three pieces of its text
    assert ids == [1] * bos_count + words


def test_chat_bos_once_when_the_tokenizer_adds_one_too(tmp_path):
    """The template writes {{ bos_token }}; the post-processor would add another, but a rendered chat is
    tokenized without it (add_special_tokens=False), as transformers does."""
    tok = word_tokenizer(bos_by_post_processor=True)
    p = prompting_for(tmp_path, tok, chat_template="{{ bos_token }}{% for m in messages %}hello "
                      "{{ m['content'] }} world{% endfor %}", bos_token="<s>", add_bos_token=True)
    assert folder.chat_ids(tok, p, folder.few_shot("hello <s>")) == [1, 3, 3, 5, 6, 7, 4]


# --- the folder's files --------------------------------------------------------------------------

def test_template_sources_and_environment(smollm_tok, tmp_path):
    """A list of named templates gives the "default" one; chat_template.jinja (where newer transformers save
    the template) wins over tokenizer_config.json; the environment is transformers': blocks trimmed,
    tojson without HTML escapes, raise_exception."""
    tok = smollm_tok
    named = [{"name": "tool_use", "template": "T"},
             {"name": "default", "template": "D{{ messages[0].content }}"}]
    p = prompting_for(tmp_path, tok, chat_template=named)
    assert folder.render(p, folder.few_shot("hi")) == "Dhi"
    (tmp_path / "chat_template.jinja").write_text(
        "A\n  {% if add_generation_prompt %}\n{{ messages[0].content | tojson }}\n  {% endif %}\nC")
    p = folder.read_prompting(tmp_path, tok)
    assert p.source == tmp_path / "chat_template.jinja"
    assert folder.render(p, folder.few_shot("<b>")) == 'A\n"<b>"\nC'
    p = prompting_for(tmp_path / "other", tok, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: the chat template fails.*no system"):
        folder.render(p, folder.few_shot("hi"))


def test_no_chat_is_plain_text(smollm_tok, smollm_dir):
    tok = smollm_tok
    opened = folder.Folder(SimpleNamespace(max_position_embeddings=8192), tok,
                           folder.read_prompting(smollm_dir, tok), [])
    args = SimpleNamespace(chat=False, max_new_tokens=1, device="cpu")
    assert folder.encode(args, opened, "What is 2 + 3?").tolist() == tok.encode("What is 2 + 3?").ids


@pytest.mark.parametrize("eos, want", [(None, [7]), (3, [3, 7]), ([7, 5, 3], [3, 5, 7]), ([], [7])])
def test_stop_ids_from_generation_config(tmp_path, eos, want):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    assert folder.read_stop_ids(tmp_path, SimpleNamespace(eos_token_id=[7], vocab_size=100)) == want


@pytest.fixture
def tiny_folder(tmp_path):
    """TINY_CONFIG's random weights, and a tokenizer that fits its 100 ids."""
    write_checkpoint(tmp_path, TINY_CONFIG)
    word_tokenizer(bos_by_post_processor=False).save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.parametrize("file, content, says", [
    ("tokenizer_config.json", "{", "is not valid JSON"),
    ("tokenizer_config.json", "[]", "expected a JSON object"),
    ("tokenizer_config.json", {"chat_template": 5}, "chat_template must be a string"),
    ("tokenizer_config.json", {"chat_template": [{"name": "rag", "template": "x"}]}, "no template named"),
    ("tokenizer_config.json", {"add_bos_token": "yes"}, "add_bos_token must be true or false"),
    ("tokenizer_config.json", {"bos_token": 1}, "bos_token must be a string"),
    ("tokenizer_config.json", {"sep_token": ["<sep>"]}, "sep_token must be a string"),
    ("tokenizer_config.json", {"extra_special_tokens": {"image_token": 7}}, "image_token must be a string"),
    ("tokenizer_config.json", {"chat_template": "{% generation %}x"}, "the chat template fails"),
    ("tokenizer_config.json", {"bos_token": "<bos>", "add_bos_token": True}, "is not in tokenizer.json"),
    ("tokenizer_config.json", {"chat_template": "{% for m in messages %}"}, "the chat template fails"),
    ("tokenizer_config.json", {"chat_template": "{{ raise_exception('roles must alternate') }}"},
     "roles must alternate"),
    ("tokenizer_config.json", {"chat_template": "{{ messages[0].content | upper }}"}, "rewrites the"),
    ("generation_config.json", {"eos_token_id": "2"},
     "eos_token_id must be a whole number or a list of whole numbers or null, got a string"),
    ("generation_config.json", {"eos_token_id": [2, 100]}, "eos_token_id [2, 100] is not a token id of the "
                                                           "model's vocabulary (100)"),
    ("generation_config.json", "not json", "is not valid JSON"),
])
def test_broken_prompt_files_are_one_line_naming_the_file(tiny_folder, capsys, file, content, says):
    (tiny_folder / file).write_text(content if isinstance(content, str) else json.dumps(content))
    err = error_of(["--model", str(tiny_folder), "--prompt", "hello world", "--max-new-tokens", "2"], capsys)
    assert str(tiny_folder / file) in err and says in err
