"""Kept for YAML configs: ``checkpointer.hf_tokenizer.hf_chat_tokenizer`` is in :mod:`checkpointer.train.hf_tokenizer`."""

from checkpointer.train.hf_tokenizer import ChatTemplateError, HFChatTokenizer, hf_chat_tokenizer

__all__ = ["ChatTemplateError", "HFChatTokenizer", "hf_chat_tokenizer"]
