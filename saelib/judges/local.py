"""The local-LM judge: the same prompts and parsing as the OpenAI judge, answered by a Hugging Face
chat model on this machine (for people with a GPU and no API; protocol §3–4).

Why greedy decoding: a local judge has no server-side cache, so determinism is what makes a rerun
give the same ratings. Requests are batched (left padding) ``local_batch_size`` at a time. Models
whose chat template rejects a system role (Gemma) get the system text prepended to the first user
message instead. Token counts are recorded; the cost is 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saelib.judges.config import JudgeConfig
from saelib.judges.prompts import Completion, Messages, PromptedJudge


class LocalLMJudge(PromptedJudge):
    """SAEBench/AxBench prompts answered by ``transformers`` ``generate`` on a local chat model.

    Pass ``model`` and ``tokenizer`` to reuse objects already in memory; otherwise both are loaded
    from ``config.local_model`` (a folder or a hub id; set ``HF_HUB_OFFLINE=1`` to forbid network).
    """

    name = "local"

    def __init__(self, config: JudgeConfig, model: Any = None, tokenizer: Any = None) -> None:
        super().__init__(config.max_tokens_explanation, config.max_tokens_detection,
                         config.max_tokens_rating)
        self.config = config
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (to load local_model)")
        if model is None:
            if not config.local_model:
                raise ValueError("judge.local_model must name a folder or hub id "
                                 "for the local judge")
            tokenizer = AutoTokenizer.from_pretrained(config.local_model)
            model = AutoModelForCausalLM.from_pretrained(config.local_model)
            model.to(config.local_device)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the local judge's tokenizer has no chat template; use a chat model")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.usage.extra.update(model=config.local_model or type(model).__name__)

    def _prompt(self, messages: Messages) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception:
            if messages and messages[0]["role"] == "system":
                merged = [{"role": "user",
                           "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                return self.tokenizer.apply_chat_template(merged + messages[2:], tokenize=False,
                                                          add_generation_prompt=True)
            raise

    def complete(self, requests: Sequence[tuple[Messages, int]]) -> list[Completion]:
        out: list[Completion] = []
        bs = self.config.local_batch_size
        for start in range(0, len(requests), bs):
            chunk = requests[start:start + bs]
            prompts = [self._prompt(m) for m, _ in chunk]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.model.device)
            max_new = max(n for _, n in chunk)
            with torch.no_grad():
                gen_BT = self.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                             pad_token_id=self.tokenizer.pad_token_id)
            new_BT = gen_BT[:, enc["input_ids"].shape[1]:]
            for row, (_, limit), mask in zip(new_BT, chunk, enc["attention_mask"]):
                row = row[:limit]
                keep = row != self.tokenizer.pad_token_id
                text = self.tokenizer.decode(row[keep], skip_special_tokens=True)
                pt, ct = int(mask.sum()), int(keep.sum())
                out.append(Completion(text, pt, ct))
                with self._usage_lock:
                    self.usage.requests += 1
                    self.usage.prompt_tokens += pt
                    self.usage.completion_tokens += ct
        return out
