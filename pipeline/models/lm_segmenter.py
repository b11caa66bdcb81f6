"""The ``lm`` segmenter: any Hugging Face causal or instruct LM, prompted few-shot to cut a sentence with ``[SEP]``.

As in SPT (Guo et al., 2024, who prompted Vicuna-13B): greedy decoding of at most
``max_new_tokens`` (128 in the paper); the first line of the answer is checked by
``check_segmentation`` and falls back to the whole sentence when it has no ``[SEP]`` or changes
the words. An instruct model (its tokenizer has a chat template) gets the prompt as chat turns.

Prompts are generated in batches of equal token length, so no row is padded and, on CPU, a
sentence's answer does not depend on which sentences share its batch.
"""

from __future__ import annotations

import os

from pipeline.models.lm import compute_dtype, load_causal_lm, resolve_device
from pipeline.models.segmenters import Segmented, chat_messages, check_segmentation, few_shot_prompt


class LMSegmenter:
    name = "lm"

    def __init__(self, model: str, max_new_tokens: int = 128, batch_size: int = 8, prompt: str = "auto",
                 device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 trust_remote_code: bool = False) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        self.torch = torch
        self.device = resolve_device(device)
        torch_dtype = compute_dtype(self.device) if dtype == "auto" else getattr(torch, dtype)
        loaded, self.tokenizer = load_causal_lm(model, trust_remote_code=trust_remote_code, dtype=torch_dtype)
        self.model = loaded.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if prompt == "chat" and not has_template:
            raise ValueError(f"prompt 'chat': the tokenizer of {model!r} has no chat template; use prompt: plain")
        self.chat = prompt == "chat" or (prompt == "auto" and has_template)

    def _prompt_ids(self, sentence: str) -> list[int]:
        if self.chat:
            return list(self.tokenizer.apply_chat_template(chat_messages(sentence), add_generation_prompt=True,
                                                           tokenize=True))
        return self.tokenizer(few_shot_prompt(sentence))["input_ids"]

    def answers(self, sentences: list[str]) -> list[str]:
        """The decoded continuation of each sentence's prompt (special tokens removed)."""
        torch = self.torch
        prompts = [self._prompt_ids(s) for s in sentences]
        out: list[str] = [""] * len(sentences)
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(i)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            for length in sorted(by_length):
                rows = by_length[length]
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start:start + self.batch_size]
                    input_ids = torch.tensor([prompts[i] for i in chunk], device=self.device)
                    generated = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                    max_new_tokens=self.max_new_tokens, do_sample=False,
                                                    pad_token_id=pad)
                    for i, row in zip(chunk, generated[:, length:].tolist()):
                        out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return out

    def segment(self, sentences: list[str]) -> list[Segmented]:
        return [check_segmentation(s, a) for s, a in zip(sentences, self.answers(sentences))]

