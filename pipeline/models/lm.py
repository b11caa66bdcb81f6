"""Shared language-model helpers: a BPE tokenizer trained with ``tokenizers``, causal LMs
built from a ``transformers`` config or loaded by hub name / local path, and device choice.

Used by the perplexity stage (the reference LM), the classifier and embedding kernels, and by
the trainer. Loading errors become a ``ModelLoadError`` that names the model, never a stack
trace from inside ``transformers``.
Weights are read and written as safetensors; ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.core.errors import ModelLoadError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts``; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def check_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """A transformers config dict with a known ``model_type`` and only keys that config has.

    ``AutoConfig.for_model`` accepts any key silently, so a typo such as ``n_layers`` would build a
    default-sized model (GPT-2: 12 layers of 768) instead of failing; config validation calls this.
    """
    import difflib

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = model_config.get("model_type")
    if not model_type:
        raise ValueError("needs model_type (for example gpt2 or llama)")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ValueError(f"unknown model_type {model_type!r}" + (f"; close: {', '.join(close)}" if close else ""))
    reference = AutoConfig.for_model(model_type)
    known = set(reference.to_dict()) | set(getattr(reference, "attribute_map", {})) | {"num_labels"}
    unknown = sorted(set(model_config) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{unknown[0]!r} is not a key of the {model_type} config{hint}")
    return model_config


def build_causal_lm(model_config: dict[str, Any], tokenizer, seed: int = 0):
    """A freshly initialised causal LM from a config dict such as {model_type: gpt2, n_layer: 2}."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(model_config)
    model_type = params.pop("model_type", None)
    if not model_type:
        raise ModelLoadError("model config needs model_type (for example gpt2 or llama)")
    try:
        config = AutoConfig.for_model(model_type, **params)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot build a {model_type!r} model from {model_config}: {exc}") from None
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, dtype: Any = None):
    """(model, tokenizer) from a hub name or a local HF folder, with a clear error if unreachable."""
    from transformers import AutoModelForCausalLM

    return _load_pretrained(AutoModelForCausalLM, name_or_path, trust_remote_code, dtype)


def load_sequence_classifier(name_or_path: str, trust_remote_code: bool = False, dtype: Any = None):
    """(model, tokenizer) of a sequence-classification model (hub name or local HF folder)."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = _load_pretrained(AutoModelForSequenceClassification, name_or_path, trust_remote_code, dtype,
                                        kind=" as a sequence classifier")
    if getattr(model.config, "pad_token_id", None) is None:  # padded batches need it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_encoder(name_or_path: str, trust_remote_code: bool = False, dtype: Any = None):
    """(model, tokenizer) of a bare encoder (``AutoModel``: BERT, MiniLM, ...) for sentence embeddings."""
    from transformers import AutoModel

    return _load_pretrained(AutoModel, name_or_path, trust_remote_code, dtype, kind=" as an encoder")


def _load_pretrained(auto_class: Any, name_or_path: str, trust_remote_code: bool, dtype: Any, kind: str = ""):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        # use_safetensors=None: safetensors when the repo has them; a .bin goes through
        # transformers' torch.load(weights_only=True).
        model = auto_class.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype,
                                           use_safetensors=None)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, HTTP errors...
        raise _load_error(name_or_path, exc, kind) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_lm_config(name_or_path: str, trust_remote_code: bool = False):
    """The model config only (cheap): lets a driver fail fast, naming the model, before workers start."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - see load_causal_lm
        raise _load_error(name_or_path, exc) from None


def _load_error(name_or_path: str, exc: Exception, kind: str = "") -> ModelLoadError:
    where = "local folder" if Path(name_or_path).exists() else "hub model"
    return ModelLoadError(
        f"cannot load {where} {name_or_path!r}{kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
        "Without network access, give a local path in Hugging Face layout."
    )


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compute_dtype(device: str):
    """bf16 on CUDA (where supported), fp32 elsewhere."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
