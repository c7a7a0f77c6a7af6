"""qwenjax.tokenizer against transformers' Qwen2 tokenizer on the real model."""
import shutil
import unicodedata

import pytest

from qwenjax.model_fetch import DEFAULT_ASSET
from qwenjax.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

TEXTS = [
    "Hello, world!",
    "The capital of France is",
    "I'll say they're here, we've gone, she'd've LEFT.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "import numpy as np\r\nx = np.zeros((3, 4), dtype=np.float32)\r\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|><|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "我爱北京天安门。你好，世界！",
    "日本語のテキストと한국어 텍스트",
    "Emoji: 🙂👍🏽🇫🇷 👨‍👩‍👧",
    "    leading spaces",
    "trailing spaces    ",
    "a  b   c\t\td\n\n\ne",
    "\n\n\n",
    " ",
    "",
    "1234567890 3.14159 1e-6 0xDEADBEEF",
    "Cafe\u0301 and Caf\u00e9",
    "Ωμέγα, Привет, مرحبا, שלום",
    "https://example.com/path?q=1&r=two#frag",
    "<|im_start|> not at start <|im_end|>extra",
    "[PAD151665] is a vocab entry, not an added token",
    "\u00a0non-breaking\u2003em-space",
]


@pytest.fixture(scope="module")
def hf_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="module")
def gguf_hf_tokenizer(real_model_dir):
    """transformers' own reading of the GGUF's tokenizer metadata (~8 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        real_model_dir.parent.parent / "downloads", gguf_file=DEFAULT_ASSET.gguf_name
    )


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert tokenizer.encode("12345") == [16, 17, 18, 19, 20]  # Qwen2 splits digits one by one
    assert tokenizer.encode("") == []


def test_special_ids(tokenizer):
    assert tokenizer.eos_token_ids == (151645, 151643)
    assert tokenizer.pad_token_id == 151643
    assert tokenizer.vocab_size == 151936


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_reading_the_gguf(tokenizer, gguf_hf_tokenizer, text):
    # transformers' GGUF reader sets no normalizer while its Qwen2 tokenizer applies NFC, so
    # the two agree once the input is NFC; only "Cafe\u0301" here is not.
    assert tokenizer.encode(text) == gguf_hf_tokenizer.encode(unicodedata.normalize("NFC", text))


def test_nfc_changes_decomposed_input(tokenizer):
    assert tokenizer.encode("Cafe\u0301") == tokenizer.encode("Caf\u00e9") == [34, 2577, 963]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_and_matches_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )


def test_decode_skips_special_but_keeps_non_special_added_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\n<tool_call>x</tool_call><|im_end|>")
    assert tokenizer.decode(ids) == "user\n<tool_call>x</tool_call>"
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\n<tool_call>x</tool_call><|im_end|>"
    )


CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of Australia?"}],
    "system_and_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Write hello world in C."},
    ],
    "multi_turn": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Reverse a list."},
        {"role": "assistant", "content": "Use `xs[::-1]`."},
        {"role": "user", "content": "In place?"},
        {"role": "assistant", "content": "`xs.reverse()`"},
        {"role": "user", "content": "Thanks! 谢谢 🙂"},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, name):
    messages = CONVERSATIONS[name]
    rendered = tokenizer.apply_chat_template(messages)
    assert rendered == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    expected_ids = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True
    )["input_ids"]
    assert tokenizer.encode_chat(messages) == expected_ids


def test_chat_template_default_system_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATIONS["single_user"])
    assert rendered == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of Australia?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_without_generation_prompt(tokenizer, hf_tokenizer):
    messages = CONVERSATIONS["multi_turn"]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert rendered == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    assert rendered.endswith("Thanks! 谢谢 🙂<|im_end|>\n")


def test_continue_final_message_and_tools_match_transformers(tokenizer, hf_tokenizer):
    started = [{"role": "user", "content": "Alice is 30. As JSON?"},
               {"role": "assistant", "content": '{"name": "'}]
    rendered = tokenizer.apply_chat_template(started, add_generation_prompt=False,
                                             continue_final_message=True)
    assert rendered == hf_tokenizer.apply_chat_template(
        started, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith('<|im_start|>assistant\n{"name": "')
    with pytest.raises(ValueError, match="continue_final_message needs the last message"):
        tokenizer.apply_chat_template(started[:1], add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ValueError, match="exclude each other"):
        tokenizer.apply_chat_template(started, continue_final_message=True)

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}}}}]
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
               {"role": "tool", "content": "18C"}]
    ours = [*history[:1], {"role": "assistant", "content": None, "tool_calls": [  # OpenAI-style
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        history[2]]
    assert tokenizer.apply_chat_template(ours, tools=tools) == hf_tokenizer.apply_chat_template(
        history, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "messages is empty"),
        ("hello", "messages must be a list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"content": "a"}], r"messages\[0\]\.role is None"),
        ([{"role": "usr", "content": "a"}], r"messages\[0\]\.role is 'usr'"),
        ([{"role": "user"}], r"messages\[0\]\.content must be a str, got NoneType"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
         r"messages\[1\]\.content must be a str, got int"),
    ],
)
def test_malformed_messages_name_the_field(tokenizer, messages, error):
    with pytest.raises(ValueError, match=error):
        tokenizer.apply_chat_template(messages)


def test_eos_falls_back_to_tokenizer_config(real_model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_model_dir / name, tmp_path / name)
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_ids == (151645,)  # <|im_end|> only
    assert tokenizer.pad_token_id == 151643


def test_chat_template_override_from_a_string_or_a_file(tokenizer, tmp_path):
    """vLLM's --chat-template: a template string or a file; the original tokenizer keeps its own."""
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    chat = [{"role": "user", "content": "hi"}]
    custom = tokenizer.with_chat_template(template)
    assert custom.apply_chat_template(chat) == "<user>hi\n<assistant>"
    assert tokenizer.apply_chat_template(chat).startswith("<|im_start|>system")
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert tokenizer.with_chat_template(str(path)).encode_chat(chat) == custom.encode_chat(chat)
    # chat_template_kwargs: more template variables; the ones the request sets are refused.
    greeting = tokenizer.with_chat_template("{{ greeting | default('hello') }} {{ messages[0].content }}")
    assert greeting.apply_chat_template(chat, template_kwargs={"greeting": "salut"}) == "salut hi"
    assert greeting.apply_chat_template(chat) == "hello hi"
    with pytest.raises(ValueError, match="may not set add_generation_prompt"):
        greeting.apply_chat_template(chat, template_kwargs={"add_generation_prompt": False})
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        tokenizer.with_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match=r"does not compile: .* \(line 1\)"):
        tokenizer.with_chat_template("{% for m in messages %}")


# The Hugging Face tokenizer interface (vLLM's llm.get_tokenizer() is used as one).


def test_encode_add_special_tokens_matches_transformers(tokenizer, hf_tokenizer):
    for text in TEXTS:
        for add in (False, True):
            assert tokenizer.encode(text, add_special_tokens=add) == hf_tokenizer.encode(
                text, add_special_tokens=add), (text, add)
        # Qwen2's post-processor adds no BOS/EOS: the flag changes nothing.
        assert tokenizer.encode(text, add_special_tokens=True) == tokenizer.encode(text)
    assert tokenizer.encode("Hello world", True) == [9707, 1879]


def test_call_matches_transformers(tokenizer, hf_tokenizer):
    one = tokenizer("Hello world")
    assert one.input_ids == [9707, 1879] and one.attention_mask == [1, 1]
    for add in (False, True):
        assert dict(tokenizer(TEXTS[0], add_special_tokens=add)) == dict(
            hf_tokenizer(TEXTS[0], add_special_tokens=add))
        batch = tokenizer(TEXTS, add_special_tokens=add)
        assert dict(batch) == dict(hf_tokenizer(TEXTS, add_special_tokens=add))
    assert [len(m) for m in batch.attention_mask] == [len(i) for i in batch.input_ids]
    assert batch["input_ids"][1] == tokenizer.encode(TEXTS[1])
    assert dict(tokenizer("hi", padding=False, truncation=None)) == {"input_ids": [6023], "attention_mask": [1]}
    with pytest.raises(ValueError, match="padding=True is not supported"):
        tokenizer(["a", "b c"], padding=True)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        tokenizer("a", add_bos=True)
    with pytest.raises(AttributeError, match="no 'token_type_ids'"):
        tokenizer("a").token_type_ids


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_apply_chat_template_tokenize_matches_transformers(tokenizer, hf_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                           add_generation_prompt=add_generation_prompt)
    assert isinstance(ids, list) and isinstance(ids[0], int)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=False) == text
    assert tokenizer.apply_chat_template(conversation=messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=True) == ids
    assert dict(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=True, return_dict=True)) == dict(
        hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))
    # Without tokenize, the text as before (transformers would give ids).
    assert tokenizer.apply_chat_template(messages, add_generation_prompt) == text


def test_apply_chat_template_batch_matches_transformers(tokenizer, hf_tokenizer):
    chats = [CONVERSATIONS[name] for name in sorted(CONVERSATIONS)]
    texts = tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    assert texts == hf_tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    assert len(texts) == 3
    assert tokenizer.apply_chat_template(chats, tokenize=True) == hf_tokenizer.apply_chat_template(
        chats, tokenize=True, return_dict=False, add_generation_prompt=True)


def test_apply_chat_template_takes_transformers_keywords(tokenizer):
    chat = [{"role": "user", "content": "hi"}]
    template = "{{ greeting | default('hello') }} {{ messages[0].content }}{{ eos_token }}"
    # chat_template=: this template for this call; the tokenizer keeps its own.
    assert tokenizer.apply_chat_template(chat, chat_template=template) == "hello hi<|im_end|>"
    assert tokenizer.apply_chat_template(chat).startswith("<|im_start|>system")
    # Template variables as transformers passes them (**kwargs) or as template_kwargs.
    assert tokenizer.apply_chat_template(chat, chat_template=template, greeting="salut") == "salut hi<|im_end|>"
    assert tokenizer.apply_chat_template(chat, chat_template=template, tokenize=True,
                                         template_kwargs={"greeting": "salut"}) == tokenizer.encode("salut hi<|im_end|>")
    assert tokenizer.apply_chat_template(chat, chat_template=template, tokenize=True)[-1] == 151645
    with pytest.raises(ValueError, match="may not set eos_token"):
        tokenizer.apply_chat_template(chat, eos_token="</s>")
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        tokenizer.apply_chat_template(chat, chat_template="no-such-template")
    with pytest.raises(TypeError, match="add_generation_prompt must be a bool, got list"):
        tokenizer.apply_chat_template(chat, [{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(TypeError, match="messages or conversation, not both"):
        tokenizer.apply_chat_template(chat, conversation=chat)
    with pytest.raises(ValueError, match="return_tensors='np' is not supported"):
        tokenizer.apply_chat_template(chat, tokenize=True, return_tensors="np")


def test_special_tokens_match_transformers(tokenizer, hf_tokenizer):
    assert (tokenizer.eos_token_id, tokenizer.eos_token) == (hf_tokenizer.eos_token_id, hf_tokenizer.eos_token) \
        == (151645, "<|im_end|>")
    assert (tokenizer.pad_token_id, tokenizer.pad_token) == (hf_tokenizer.pad_token_id, hf_tokenizer.pad_token) \
        == (151643, "<|endoftext|>")
    # generation_config.json has a bos_token_id, but the tokenizer has no BOS.
    assert (tokenizer.bos_token_id, tokenizer.bos_token) == (hf_tokenizer.bos_token_id, hf_tokenizer.bos_token) \
        == (None, None)
    assert (tokenizer.unk_token_id, tokenizer.unk_token) == (hf_tokenizer.unk_token_id, hf_tokenizer.unk_token)
    assert tokenizer.all_special_tokens == hf_tokenizer.all_special_tokens == ["<|im_end|>", "<|endoftext|>"]
    assert tokenizer.all_special_ids == hf_tokenizer.all_special_ids
    assert len(tokenizer) == len(hf_tokenizer) == 151936
    vocab = tokenizer.get_vocab()
    assert vocab == hf_tokenizer.get_vocab()
    assert vocab["<|im_start|>"] == 151644 and vocab["Ġworld"] == 1879


def test_extra_special_tokens_match_transformers(real_model_dir, tmp_path):
    """Qwen2.5's original tokenizer_config.json lists additional_special_tokens; they count in
    all_special_ids after the named ones."""
    import json

    from transformers import AutoTokenizer

    shutil.copy(real_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((real_model_dir / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>", "<|fim_prefix|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids == [151645, 151643, 151644, 151659]


def test_convert_ids_and_tokens_match_transformers(tokenizer, hf_tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nHello world 你好<|im_end|><|endoftext|>")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == hf_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["<|im_start|>", "user", "Ċ", "Hello"]
    for skip in (False, True):
        assert tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip) == \
            hf_tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip)
    assert len(tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=True)) == len(ids) - 2
    assert tokenizer.convert_ids_to_tokens(1879) == hf_tokenizer.convert_ids_to_tokens(1879) == "Ġworld"
    assert tokenizer.convert_ids_to_tokens([151935, 10**6]) == hf_tokenizer.convert_ids_to_tokens([151935, 10**6]) \
        == ["[PAD151935]", None]
    assert tokenizer.convert_tokens_to_ids(tokens) == hf_tokenizer.convert_tokens_to_ids(tokens) == ids
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.convert_tokens_to_ids(["no such token", "Ġworld"]) == \
        hf_tokenizer.convert_tokens_to_ids(["no such token", "Ġworld"]) == [None, 1879]


def test_batch_decode_matches_transformers(tokenizer, hf_tokenizer):
    batch = [tokenizer.encode(text) for text in TEXTS]
    for skip in (False, True):
        assert tokenizer.batch_decode(batch, skip_special_tokens=skip) == hf_tokenizer.batch_decode(
            batch, skip_special_tokens=skip)
    # transformers' default keeps special tokens; decode's default here skips them.
    assert tokenizer.batch_decode([[151644, 6023]]) == ["<|im_start|>hi"]
    assert tokenizer.decode([151644, 6023]) == "hi"
    assert tokenizer.decode(6023) == hf_tokenizer.decode(6023) == "hi"
