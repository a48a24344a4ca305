"""Benchmark: packing (ours) vs padding (plain Hugging Face ``Trainer``) for causal LM training.

A small GPT-2-style model (4 layers, 256 wide) is built from a config with a BPE tokenizer
trained on the SST-2 sentences, then trained from the same initial weights on the SST-2
train sentences as plain text, by our trainer (examples packed into 128-token rows, no
cross-attention between examples) and by ``Trainer`` with
``DataCollatorForLanguageModeling(mlm=False)`` (random batches padded to their longest
member). Same data, hyperparameters, epochs and seed. Reported: non-padding tokens per
second, wall time, peak memory, and the dev-set loss of both models, computed by one
shared function.

    .venv/bin/python bench/causal_lm.py [--epochs 1] [--limit N]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    SPEED_ROWS,
    baseline_arguments,
    bench_manifest,
    compare,
    peak_rss_mb,
    read_sst2,
    save_gpt2,
    timed_train,
    train_ours,
    write_jsonl,
)

HP = {"lr": 1e-3, "batch_size": 32, "max_len": 128, "warmup_ratio": 0.06, "weight_decay": 0.01, "seed": 42}


def prepare(workdir: Path, limit: int | None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train = [t for t, _ in read_sst2("train")]
    train = train[:limit] if limit else train
    dev = [t for t, _ in read_sst2("dev")]
    write_jsonl([{"text": t} for t in train], workdir / "train.jsonl")
    write_jsonl([{"text": t} for t in dev], workdir / "dev.jsonl")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>", "<|pad|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    save_gpt2(
        workdir / "base-model",
        fast,
        n_positions=512,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )


def dev_loss(model_dir: Path, workdir: Path) -> float:
    """Token-mean next-token loss on the dev sentences (each with its end-of-text token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [json.loads(x)["text"] for x in (workdir / "dev.jsonl").read_text().splitlines()]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [*tok(text)["input_ids"][: HP["max_len"] - 1], tok.eos_token_id]
            t = torch.tensor([ids])
            logits = model(input_ids=t).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum"))
            count += len(ids) - 1
    return total / count


def run_ours(workdir: Path, epochs: int) -> dict[str, Any]:
    manifest = bench_manifest(
        "bench-clm",
        "causal-lm",
        f"file://{workdir / 'base-model'}",
        workdir,
        epochs,
        hp=HP,
        hyperparameters={"packing": True},
        evaluation={"metrics": ["perplexity"]},
    )
    _result, steps = train_ours(manifest, workdir)
    return {
        **steps,
        "dev_loss": dev_loss(workdir / "ours-out" / "runs" / "1" / "model", workdir),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_baseline(workdir: Path, epochs: int) -> dict[str, Any]:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
    )

    torch.manual_seed(HP["seed"])
    base = workdir / "base-model"
    tok = AutoTokenizer.from_pretrained(base)
    texts = [json.loads(x)["text"] for x in (workdir / "train.jsonl").read_text().splitlines()]
    items = [{"input_ids": [*tok(t)["input_ids"][: HP["max_len"] - 1], tok.eos_token_id]} for t in texts]

    class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return items[i]

    model = AutoModelForCausalLM.from_pretrained(base)
    steps = epochs * math.ceil(len(items) / HP["batch_size"])
    args = baseline_arguments(workdir, epochs, steps, HP)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=Data(), data_collator=collator)
    seconds = timed_train(trainer)
    tokens = epochs * sum(len(x["input_ids"]) for x in items)
    saved = workdir / "baseline-model"
    trainer.save_model(str(saved))
    tok.save_pretrained(saved)
    return {
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "dev_loss": dev_loss(saved, workdir),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    done = compare(
        __doc__, Path(__file__), prepare, run_ours, run_baseline, rows=[*SPEED_ROWS, ("dev_loss", "dev loss", "{:.4f}")]
    )
    if done is None:
        return
    baseline, ours, args = done
    print(f"dev loss difference: {100 * (ours['dev_loss'] / baseline['dev_loss'] - 1):+.2f} %")
    print(
        f"(SST-2 sentences as text, GPT-2-style 4x256 from scratch, {args.epochs} epoch(s), batch "
        f"{HP['batch_size']}, lr {HP['lr']}, seed {HP['seed']}, CPU; ours packs into {HP['max_len']}-token rows)"
    )


if __name__ == "__main__":
    main()
