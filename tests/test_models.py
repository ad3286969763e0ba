"""Model loading: TransformerLens (unprocessed) reproduces Hugging Face's logits and residual stream.

Protocol §2: SAEs read ``blocks.{L}.hook_resid_post``; the SAE's reconstruction is spliced back in
for CE-loss recovered, and steering adds a vector there (§4). All of that is only meaningful if the
hooked model computes what the original model computes, so we compare with transformers directly.

The fast tests use a tiny random Llama saved to a local folder (the ``_tl_from_hf_config`` path the
packaged SmolLM2 also takes); the slow ones load the real packaged models.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_tokenizer

from saelib.models import (PACKAGED, PLAIN_FORMAT, ModelNotAvailableError, format_prompt,
                           is_known_model, load_hf, load_model, model_slug, prepare_packaged,
                           resolve_hf_source)

SENTENCE = "The committee met on Tuesday to discuss the new bridge, which opened in 1998."
#: Max |TL − HF| logit tolerance; measured on SENTENCE (CPU, fp32, 2026-11-30): gemma 4.1e-5, smollm2 5.1e-5.
LOGIT_TOL = 1e-3


def compare(lm, ids_BL: torch.Tensor, layers: list[int]) -> tuple[float, dict[int, float]]:
    """Max |TL − HF| on the logits, and on the residual stream after each block in ``layers``
    (``hidden_states[L + 1]`` in transformers is the output of block ``L``)."""
    with torch.no_grad():
        tl_logits, cache = lm.tl.run_with_cache(ids_BL)
        hf_out = lm.hf(ids_BL, output_hidden_states=True)
    logit_diff = (tl_logits - hf_out.logits).abs().max().item()
    resid = {L: (cache[f"blocks.{L}.hook_resid_post"] - hf_out.hidden_states[L + 1]).abs().max().item()
             / hf_out.hidden_states[L + 1].abs().max().item() for L in layers}
    return logit_diff, resid


# ---------------------------------------------------------------------------------------------
# Fast: a tiny random Llama in a local folder


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory):
    """A random 3-layer Llama and a WordLevel tokenizer saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_random_model")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_local_folder_resolves_and_loads_with_matching_logits(local_folder):
    assert is_known_model(str(local_folder))
    assert resolve_hf_source(str(local_folder)) == str(local_folder)
    lm = load_model(str(local_folder), keep_hf=True)
    assert (lm.family, lm.n_layers, lm.d_model) == ("llama", 3, 32)
    assert lm.hook_name(1) == "blocks.1.hook_resid_post"
    ids = torch.tensor([[1, 5, 9, 22, 7, 100, 3, 250, 17]])
    logit_diff, resid = compare(lm, ids, layers=[0, 1])
    with torch.no_grad():
        scale = lm.hf(ids).logits.abs().max().item()
    print(f"tiny local Llama: max |TL-HF| logits {logit_diff:.2e} (logit scale {scale:.2f}); "
          f"relative residual diffs {resid}")
    assert scale > 0.1  # the comparison is not between two near-zero tensors
    assert logit_diff < 1e-4 and all(v < 1e-5 for v in resid.values())
    assert lm.load_seconds > 0


def test_folder_named_like_a_known_family_still_uses_its_own_config(local_folder, tmp_path_factory):
    """TransformerLens sniffs 'llama'/'gemma' in a path and then ignores its config.json;
    ``_tl_config_dict`` reads the config from a neutral name, so the folder's name cannot matter."""
    import shutil

    named = tmp_path_factory.mktemp("copies") / "my-llama-3-gemma-finetune"
    shutil.copytree(local_folder, named)
    lm = load_model(str(named), keep_hf=True)
    assert (lm.n_layers, lm.d_model) == (3, 32)
    assert lm.tl.cfg.tokenizer_name == str(named)
    logit_diff, _ = compare(lm, torch.tensor([[1, 40, 41, 42, 5]]), layers=[])
    assert logit_diff < 1e-4


def test_load_model_without_keep_hf_drops_the_hf_copy(local_folder):
    lm = load_model(str(local_folder))
    assert lm.hf is None and not lm.tl.training


def test_store_transposed_keeps_outputs_bit_identical_and_skips_the_copies(local_folder):
    from saelib.models import store_transposed

    lm = load_model(str(local_folder))
    ids = torch.tensor([[1, 5, 9, 22, 7]])
    # load_model already re-laid the weights: their transposes are contiguous, and again is a no-op.
    leaf = lambda n: n.rsplit(".", 1)[-1]  # noqa: E731
    params = dict(lm.tl.named_parameters())
    assert all(p.T.is_contiguous() for n, p in params.items()
               if leaf(n) in ("W_in", "W_gate", "W_out", "W_U"))
    # attention: the re-arrangements "h m d -> (h d) m" and "h d m -> m (h d)" are views
    assert all(p.permute(0, 2, 1).is_contiguous() for n, p in params.items()
               if leaf(n) in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"))
    assert all(p.permute(2, 0, 1).is_contiguous() for n, p in params.items() if leaf(n) == "W_O")
    assert store_transposed(lm.tl) == 0
    with torch.no_grad():
        relaid = lm.tl(ids)
        for _, p in lm.tl.named_parameters():  # back to TransformerLens's own layout
            p.data = p.data.contiguous()
        n_attn = sum(leaf(n) in ("W_Q", "W_K", "W_V", "_W_K", "_W_V", "W_O") for n in params)
        assert n_attn >= 3 * 4  # Q, K, V and O per block (GQA: its unrepeated K and V)
        # gate/in/out and the attention weights per block, and W_U
        assert store_transposed(lm.tl) == 3 * 3 + n_attn + 1
        assert torch.equal(lm.tl(ids), relaid)


def test_format_prompt_without_chat_template_uses_the_plain_format():
    tok = make_tokenizer()
    assert format_prompt(tok, "t1 t2") == PLAIN_FORMAT.format(instruction="t1 t2")
    assert PLAIN_FORMAT.format(instruction="x") == "Instruction: x\n\nResponse:"


def test_format_prompt_with_chat_template_applies_it():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    assert format_prompt(tok, "hello") == "<user>hello<assistant>"


@pytest.mark.parametrize("name", ["gpt-17", "", "a/b/c", "~nosuchuser_saelib", "x" * 300])
def test_unknown_model_names_the_packaged_models(name):
    with pytest.raises(ModelNotAvailableError, match=r"unknown model .*gemma-3-270m, "
                                                     r"qwen2\.5-coder-0\.5b-instruct, smollm2-135m-instruct"):
        resolve_hf_source(name)
    assert not is_known_model(name)


def test_prepare_packaged_rejects_unknown_keys(tmp_cache):
    with pytest.raises(ModelNotAvailableError, match=r"unknown packaged model 'gpt2'; choose one of "
                                                     r"\['gemma-3-270m', "):
        prepare_packaged("gpt2")


def test_uncached_hub_id_offline_is_model_not_available(monkeypatch):
    """With ``HF_HUB_OFFLINE=1`` the hub is never consulted; an uncached id fails clearly."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    assert is_known_model("nobody-saelib/no-such-model")
    with pytest.raises(ModelNotAvailableError, match=r"cannot load model 'nobody-saelib/no-such-model'.*"
                                                     r"HF_HUB_OFFLINE is set"):
        load_hf("nobody-saelib/no-such-model")


def test_model_slug_is_file_system_safe():
    assert model_slug("google/gemma-2-2b") == "google--gemma-2-2b"
    assert model_slug("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert model_slug("/") == "model"


def test_packaged_table_matches_the_profiles_layers():
    from saelib.profiles import load_profile

    for entry in load_profile("default").models:
        assert 0 <= entry.layer < PACKAGED[entry.name].n_layers


# ---------------------------------------------------------------------------------------------
# Slow: the real packaged models (HF_HUB_OFFLINE=1; dequantised once into the saelib cache)


@pytest.fixture(scope="module", params=["gemma-3-270m", "smollm2-135m-instruct"])
def packaged(request):
    return load_model(request.param, keep_hf=True)


@pytest.mark.slow
def test_packaged_model_tl_matches_hf(packaged):
    spec = PACKAGED[packaged.name]
    assert (packaged.n_layers, packaged.d_model, packaged.family) == (spec.n_layers, spec.d_model,
                                                                     spec.family)
    tok = packaged.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[bos] + tok(SENTENCE, add_special_tokens=False)["input_ids"]])
    layer = {"gemma-3-270m": 8, "smollm2-135m-instruct": 14}[packaged.name]
    logit_diff, resid = compare(packaged, ids, layers=[layer])
    print(f"{packaged.name}: max |TL-HF| logits {logit_diff:.2e}; relative residual diff at "
          f"L{layer} {resid[layer]:.2e}; loaded in {packaged.load_seconds:.1f} s")
    assert logit_diff < LOGIT_TOL
    assert resid[layer] < 1e-4
    with torch.no_grad():
        assert torch.equal(packaged.tl(ids).argmax(-1), packaged.hf(ids).logits.argmax(-1))


@pytest.mark.slow
def test_packaged_format_prompt(packaged):
    prompt = packaged.format_prompt("Name three primes.")
    if packaged.name == "smollm2-135m-instruct":
        assert packaged.has_chat_template
        assert "<|im_start|>user\nName three primes.<|im_end|>" in prompt
        assert prompt.rstrip().endswith("<|im_start|>assistant")
    else:
        assert prompt == PLAIN_FORMAT.format(instruction="Name three primes.")


@pytest.mark.slow
@pytest.mark.parametrize("key", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_prepare_packaged_reuses_the_dequantised_folder(key):
    first = prepare_packaged(key)  # may dequantise on a fresh machine
    t0 = time.perf_counter()
    again = prepare_packaged(key)
    elapsed = time.perf_counter() - t0
    assert again == first and (again / "config.json").exists()
    assert any(again.glob("*.safetensors"))
    assert elapsed < 5.0, f"second prepare_packaged took {elapsed:.1f} s"
