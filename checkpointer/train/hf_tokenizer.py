"""A torchtune ``ModelTokenizer`` over a Hugging Face tokenizer folder and its chat template.

torchtune ships one tokenizer class per model family. ``HFChatTokenizer`` instead reads what every
Hub chat model has: ``tokenizer.json`` (run with the ``tokenizers`` library), ``tokenizer_config.json``
(special tokens, and the chat template unless a ``chat_template.jinja`` file holds it) and
renders the chat template with jinja2 the way transformers does. transformers is not needed.

Token ids equal ``AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True)``.
The loss mask follows each torchtune ``Message``'s ``masked`` flag: the tokens of message ``k`` are
those the conversation's first ``k + 1`` messages add to the first ``k``, so a message's span
includes the template's text around it (role headers, end-of-turn tokens). That needs a
*prefix-stable* template: rendering the first ``k`` messages must give a token prefix of the
whole conversation. Templates that rewrite earlier turns depending on later ones are refused
with ``ChatTemplateError``.

In a torchtune YAML config::

    tokenizer:
      _component_: checkpointer.train.hf_tokenizer.hf_chat_tokenizer
      path: /models/SmolLM2-135M-Instruct
      max_seq_len: 512
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from torchtune.data import Message
from torchtune.data._utils import truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from checkpointer.errors import ChatTemplateError, CheckpointArgumentError, CheckpointNotFoundError
from checkpointer.format.json_files import parse_json

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# transformers' named special tokens, passed to every chat template (``special_tokens_map``)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker), rendered as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    """jinja's own ``tojson`` escapes HTML characters; transformers' does not."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in an environment configured like transformers' for chat templates.

    Sandboxed, ``trim_blocks`` and ``lstrip_blocks``, loop controls, the ``{% generation %}`` tag,
    and the ``raise_exception``, ``strftime_now`` and ``tojson`` helpers templates rely on.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    return parse_json(path.read_bytes(), str(path)) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens (``bos_token``...) of ``config``, filled in from a legacy ``special_tokens_map.json``."""
    legacy = _read_json(folder / LEGACY_SPECIAL_TOKENS_FILE)
    found = {name: _token_text(config.get(name)) or _token_text(legacy.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: text for name, text in found.items() if text is not None}


def read_chat_template(folder: Path, config: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(template, where it came from)``, found where transformers looks, or None.

    ``chat_template.jinja`` takes priority over ``tokenizer_config.json``'s ``chat_template``,
    which is a string or a list of ``{"name", "template"}`` (then the one named ``default``).
    """
    file = folder / TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8"), str(file)
    template = config.get("chat_template")
    where = f"{folder / CONFIG_FILE} (chat_template)"
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        template, where = named.get("default"), f"{folder / CONFIG_FILE} (chat_template 'default')"
    return (template, where) if isinstance(template, str) else None


def _read_stop_ids(folder: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (an int or a list), if any."""
    ids = _read_json(folder / GENERATION_CONFIG_FILE).get("eos_token_id")
    return [ids] if isinstance(ids, int) else list(ids or [])


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the spaces WordPiece decoding puts before punctuation."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(spaced, joined)
    return text


def _cleans_up_spaces(config: Mapping[str, Any], tokenizer: Tokenizer) -> bool:
    """Whether transformers 5 applies ``clean_up_tokenization`` when decoding: asked for, and not a BPE model
    (for BPE it refuses unless forced, as the clean-up corrupts byte-level text)."""
    forced = config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    is_bpe = type(tokenizer.model).__name__ == "BPE"
    return bool(config.get("clean_up_tokenization_spaces")) and (not is_bpe or bool(forced))


def _message_dict(message: Message | Mapping[str, Any]) -> dict[str, Any]:
    """A message as chat templates see it: ``{"role", "content": str}``; keys holding None are dropped."""
    if isinstance(message, Message):
        if any(item["type"] != "text" for item in message.content):
            raise CheckpointArgumentError(f"only text messages can be rendered with a chat template, got {message!r}", key="messages")
        return {"role": message.role, "content": message.text_content}
    return {key: value for key, value in message.items() if value is not None}


class HFChatTokenizer(ModelTokenizer, Transform):
    """A torchtune ``ModelTokenizer`` and ``Transform`` from a Hugging Face ``tokenizers.Tokenizer`` and chat template.

    Build it with ``from_folder`` (or ``hf_chat_tokenizer`` in YAML). ``tokenize_messages`` gives the
    token ids transformers' ``apply_chat_template`` gives, and a mask that is True on the tokens
    of masked messages; ``__call__`` does that for a sample's ``"messages"``, as ``SFTDataset``
    expects. ``max_seq_len`` truncates like torchtune's tokenizers: the last kept token becomes
    ``eos_id`` and is masked.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        special_tokens_map: Mapping[str, str],
        chat_template: str | None,
        template_name: str = "chat template",
        max_seq_len: int | None = None,
        stop_ids: Sequence[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.special_tokens_map = dict(special_tokens_map)
        self.template_name = template_name
        self._template = compile_chat_template(chat_template) if chat_template is not None else None
        self._clean_up = clean_up_tokenization_spaces
        self.special_tokens = {
            token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special
        }
        self.bos_id = self._named_id("bos_token")
        self.eos_id = self._named_id("eos_token")
        # torchtune pads with pad_id, so it must be an id: without a pad token, pad with EOS (labels are ignored there)
        self.pad_id = next((i for i in (self._named_id("pad_token"), self.eos_id) if i is not None), 0)
        self.stop_tokens = list(dict.fromkeys([i for i in (self.eos_id, *stop_ids) if i is not None]))
        with_specials = tokenizer.encode("", add_special_tokens=True).ids
        self._adds_bos = self.bos_id is not None and with_specials[:1] == [self.bos_id]

    @classmethod
    def from_folder(cls, path: str | Path, max_seq_len: int | None = None) -> HFChatTokenizer:
        """Read ``tokenizer.json``, ``tokenizer_config.json`` and the chat template from the local folder ``path``."""
        folder = Path(path)
        if not (folder / TOKENIZER_FILE).is_file():
            raise CheckpointNotFoundError(f"{folder} has no {TOKENIZER_FILE}: expected a local Hugging Face tokenizer folder", file=str(folder / TOKENIZER_FILE))
        config = _read_json(folder / CONFIG_FILE)
        template = read_chat_template(folder, config)
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        return cls(
            tokenizer,
            special_tokens_map=read_special_tokens(folder, config),
            chat_template=template[0] if template else None,
            template_name=template[1] if template else f"{folder} (no chat template)",
            max_seq_len=max_seq_len,
            stop_ids=_read_stop_ids(folder),
            clean_up_tokenization_spaces=_cleans_up_spaces(config, tokenizer),
        )

    def _named_id(self, name: str) -> int | None:
        text = self.special_tokens_map.get(name)
        return None if text is None else self.tokenizer.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it are recognised.

        ``add_bos`` prepends ``bos_id`` only where the Hugging Face tokenizer itself adds a BOS
        (its post-processor does), so ``encode(text, add_eos=False)`` equals transformers'
        ``tokenizer.encode(text)``. ``add_eos`` appends ``eos_id``.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self._adds_bos:
            ids.insert(0, self.bos_id)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``, as transformers' ``tokenizer.decode`` gives it."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def apply_chat_template(
        self, messages: Sequence[Message | Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered by the chat template, as transformers' ``apply_chat_template(tokenize=False)``.

        ``messages`` are dicts (``{"role": ..., "content": ...}``, passed to the template as they are)
        or torchtune ``Message``s. By default the assistant header is appended, for generation.
        """
        if self._template is None:
            raise ChatTemplateError(f"{self.template_name}: the tokenizer folder has no chat template")
        if not messages:
            raise CheckpointArgumentError("cannot apply a chat template to an empty conversation", key="messages")
        try:
            return self._template.render(
                **self.special_tokens_map,
                messages=[_message_dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(
                f"chat template {self.template_name} failed on a conversation of {len(messages)} messages: {e}"
            ) from e

    def tokenize_messages(
        self, messages: Sequence[Message], *, add_end_tokens: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation, and a mask that is True on the tokens of masked messages.

        Message ``k`` owns the tokens that rendering ``messages[:k + 1]`` adds to ``messages[:k]``.
        With ``max_seq_len``, the result is truncated; with ``add_end_tokens`` (training) the last
        kept token is replaced by ``eos_id`` and masked, as torchtune's tokenizers do.
        """
        tokens, bounds = self._tokens_and_bounds(messages, add_generation_prompt)
        mask = [m.masked for m, start, end in zip(messages, bounds, bounds[1:]) for _ in range(end - start)]
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def _tokens_and_bounds(
        self, messages: Sequence[Message], add_generation_prompt: bool
    ) -> tuple[list[int], list[int]]:
        """Ids of the whole conversation and where each message's tokens end (``bounds[k + 1]``), from 0."""
        texts = [self.apply_chat_template(messages[:k], add_generation_prompt=False) for k in range(1, len(messages))]
        texts.append(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))
        encoded = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        tokens, bounds = encoded[-1], [0]
        for k, prefix in enumerate(encoded[:-1], start=1):
            if len(prefix) < bounds[-1] or tokens[: len(prefix)] != prefix:
                raise self._not_prefix_stable(k, len(messages), prefix, tokens)
            bounds.append(len(prefix))
        bounds.append(len(tokens))
        return tokens, bounds

    def _not_prefix_stable(self, k: int, n: int, prefix: list[int], tokens: list[int]) -> ChatTemplateError:
        at = next((i for i, (a, b) in enumerate(zip(prefix, tokens)) if a != b), min(len(prefix), len(tokens)))
        return ChatTemplateError(
            f"chat template {self.template_name} is not prefix-stable: the tokens of the first {k} of "
            f"{n} messages are not a prefix of the whole conversation's tokens "
            f"(they differ at token {at}: {self.decode(prefix[at : at + 8], False)!r} vs "
            f"{self.decode(tokens[at : at + 8], False)!r}), so each message's tokens, and the loss mask, "
            "cannot be found. Templates that rewrite earlier turns (e.g. drop past reasoning) are not supported."
        )

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` by ``"tokens"`` and ``"mask"``; ``inference`` adds the generation prompt."""
        sample = dict(sample)
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference, add_generation_prompt=inference)
        sample["tokens"], sample["mask"] = tokens, mask
        return sample


def hf_chat_tokenizer(path: str, max_seq_len: int | None = None) -> HFChatTokenizer:
    """An ``HFChatTokenizer`` for the local Hugging Face folder ``path``: a YAML ``_component_``."""
    return HFChatTokenizer.from_folder(path, max_seq_len=max_seq_len)
