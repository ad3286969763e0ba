"""The local-LM judge with a tiny randomly initialised Llama: prompts go through the chat template,
generation runs, and the shared parsers turn its garbage into 0 ratings / no detections."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from saelib.judges import JudgeConfig, MarkedWindow, RatingItem, Ratings  # noqa: E402
from saelib.judges.local import LocalLMJudge  # noqa: E402

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}" + CHAT)


def tiny_model_and_tokenizer(template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                                pad_token="<pad>", chat_template=template)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=4096,
                                   eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                                   bos_token_id=vocab["</s>"])
    return transformers.LlamaForCausalLM(cfg), fast


CFG = JudgeConfig(backend="local", local_model="tiny-random-llama", max_tokens_explanation=6,
                  max_tokens_detection=6, max_tokens_rating=6, local_batch_size=4)


def test_local_judge_runs_prompts_and_parses_garbage_to_zero():
    model, tok = tiny_model_and_tokenizer(CHAT)
    judge = LocalLMJudge(CFG, model=model, tokenizer=tok)
    items = [RatingItem("cats", "Write about pets.", "Cats are great."),
             RatingItem("rain", "Describe a city.", "The city is wet.")]
    assert judge.rate(items) == [Ratings(0, 0, 0)] * 2
    u = judge.usage
    assert u.requests == 6 and u.extra["unparsable_ratings"] == 6
    assert u.prompt_tokens > 6 * 200          # the AxBench-style templates went through in full
    assert 0 < u.completion_tokens <= 6 * 6
    assert u.cost_usd == 0.0
    windows = [MarkedWindow((" a", " cat"), (0.0, 1.0), (False, True))] * 3
    explanation = judge.explain(windows)
    assert explanation == judge.explain(windows)  # greedy: the same garbage each time
    # garbage names no window: an empty detection, counted as unparsable
    assert judge.detect("cats", windows) == []
    assert u.extra["unparsable_detections"] == 1


def test_local_judge_is_deterministic_and_merges_system_role():
    model, tok = tiny_model_and_tokenizer(NO_SYSTEM)
    judge = LocalLMJudge(CFG, model=model, tokenizer=tok)
    windows = [MarkedWindow((" a", " cat"), (0.0, 1.0), (False, True))]
    first = judge.explain(windows)
    assert judge.explain(windows) == first
    assert judge.usage.requests == 2


def test_local_judge_needs_both_objects_or_a_model_name():
    model, tok = tiny_model_and_tokenizer(CHAT)
    with pytest.raises(ValueError, match="both model and tokenizer"):
        LocalLMJudge(CFG, model=model)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        LocalLMJudge(CFG, model=model, tokenizer=tok)
