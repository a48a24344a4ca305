"""Where a model's files are, and reading its config, tokenizer and weight files.

A model that cannot be used as it is (a truncated weights file, a config that does not
parse, a directory without weights) is a permanent :class:`UnsupportedModelError` naming
the file and what to do: retrying cannot help. Trouble reaching the Hugging Face Hub stays
retryable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from tuneloop.api.spec import ModelSource
from tuneloop.text import first_line as text_first_line
from tuneloop_trainer.errors import UnsupportedModelError
from tuneloop_trainer.models.families import Family

CONFIG_FILE = "config.json"


@dataclass
class ResolvedModel:
    """Where a model's files are, as ``from_pretrained`` wants them."""

    location: str
    """A local directory, or a hub repository id."""
    revision: str | None
    uri: str
    """The URI the user wrote, for messages."""


def resolve_model(source: ModelSource, download: Callable[[str, Path], Path], cache_dir: Path) -> ResolvedModel:
    """Map ``spec.model.uri`` to something ``from_pretrained`` loads.

    ``download(uri, dest)`` mirrors an ``s3://`` prefix into ``dest`` (done once per URI:
    the directory is keyed by the URI and reused by later runs on the same node).
    """
    uri = source.uri
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        path = Path(rest)
        if path.is_file():
            hint = f"use file://{path.parent}" if path.name == CONFIG_FILE else "save the model with save_pretrained"
            raise UnsupportedModelError(
                f"{uri} is a file: spec.model.uri must name the directory that holds {CONFIG_FILE}, not the file; "
                f"{hint}"
            )
        if not path.is_dir():
            raise UnsupportedModelError(f"model directory {path} does not exist (spec.model.uri {uri})")
        if not (path / CONFIG_FILE).is_file():
            raise UnsupportedModelError(
                f"model directory {path} holds no {CONFIG_FILE} (spec.model.uri {uri}); point spec.model.uri at a "
                "directory written by save_pretrained"
            )
        return ResolvedModel(str(path), None, uri)
    if scheme == "s3":
        import hashlib  # noqa: PLC0415

        dest = cache_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        download(uri, dest)  # a no-op when an earlier run downloaded it completely
        if not (dest / CONFIG_FILE).exists():
            raise UnsupportedModelError(
                f"{uri} holds no {CONFIG_FILE}; save the model there with save_pretrained (spec.model.uri names the "
                "prefix that holds config.json)"
            )
        return ResolvedModel(str(dest), None, uri)
    repo, _, at_revision = rest.partition("@")
    return ResolvedModel(repo, source.revision or at_revision or None, uri)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library's error message for ours: its first line, cut short."""
    return text_first_line(exc, limit)


def _is_hub(resolved: ResolvedModel) -> bool:
    return resolved.uri.startswith("hf://")


def load_config(resolved: ResolvedModel) -> PretrainedConfig:
    """The model's ``config.json``, parsed; a file that does not parse is a permanent error."""
    try:
        return AutoConfig.from_pretrained(resolved.location, revision=resolved.revision)
    except (OSError, ValueError) as exc:
        if not _is_hub(resolved):
            where = (
                "downloaded from it" if resolved.uri.startswith("s3://") else f"at {resolved.location}/{CONFIG_FILE}"
            )
            raise UnsupportedModelError(
                f"cannot read the model config of {resolved.uri} ({CONFIG_FILE} {where}): {first_line(exc)}; "
                "save the model again with save_pretrained"
            ) from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub or its cache"
        raise UnsupportedModelError(
            f"cannot load model {resolved.uri} from {where}: {first_line(exc)}. Check the name and "
            "revision, pre-populate the cache (HF_HOME), or point spec.model.uri at an s3:// or file:// copy"
        ) from None


def load_tokenizer(resolved: ResolvedModel, family: Family) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and right padding for training."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, revision=resolved.revision)
    except Exception as exc:  # tokenizers raises plain Exceptions for a broken tokenizer.json
        if _is_hub(resolved) and isinstance(exc, OSError):
            raise  # the Hub or the network: let the run be retried
        raise UnsupportedModelError(
            f"cannot load the tokenizer of {resolved.uri}: {first_line(exc)}; save the tokenizer next to the model "
            "(tokenizer.save_pretrained into the same directory) and upload it again"
        ) from None
    if tokenizer.pad_token is None:
        # Decoders often ship without one; the EOS token is a safe stand-in because padded
        # positions are excluded from attention and loss anyway.
        if tokenizer.eos_token is None:
            raise UnsupportedModelError(f"the tokenizer of {resolved.uri} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_weight_files(resolved: ResolvedModel) -> None:
    """Open the header of each ``*.safetensors`` file of a local model: a truncated or corrupt
    file (an upload cut short) fails here, named, instead of inside ``from_pretrained``."""
    directory = Path(resolved.location)
    if _is_hub(resolved) or not directory.is_dir():
        return
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise UnsupportedModelError(
            f"model directory {resolved.uri} holds no weights (no *.safetensors or pytorch_model.bin next to its "
            "config.json); save the model with save_pretrained and upload the whole directory (spec.model.uri)"
        )
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise corrupt_weights(f"weights file {path.name}", resolved, exc) from None


def corrupt_weights(what: str, resolved: ResolvedModel, exc: BaseException) -> UnsupportedModelError:
    """The error for a weights file that does not read (``what`` names it)."""
    return UnsupportedModelError(
        f"{what} of {resolved.uri} is truncated or corrupt ({first_line(exc)}); save the model again with "
        "save_pretrained and upload it again (spec.model.uri)"
    )
