"""Tiny, randomly initialised models and tokenizers trained on the fly, for tests.

Nothing can be downloaded from a model hub here, so tests build their base models from configs:

* ``"gpt2"`` — a decoder (``AutoModelForCausalLM``) with a byte-level BPE tokenizer (any text
  encodes, nothing maps to unknown) and a ChatML-style chat template whose assistant turns are
  wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask=True`` works;
* ``"bert"`` — an encoder (``AutoModelForSequenceClassification`` with ``num_labels`` labels; the
  same directory also loads as the bare ``AutoModel``) with an uncased WordPiece tokenizer,
  token type ids, and the ``[CLS] A [SEP] B [SEP]`` post-processor;
* ``"t5"`` — an encoder-decoder (``AutoModelForSeq2SeqLM``) with a SentencePiece-style tokenizer
  (Metaspace ``▁`` word boundaries) that appends ``</s>``; ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2.

Each model has 2 layers and a hidden size of 32, and is saved with ``save_pretrained`` together
with its tokenizer, so the directory loads back through the same ``from_pretrained`` calls users
make, offline. Tokenizers are trained with the ``tokenizers`` library on :data:`CORPUS` once per
process (well under a second) and are identical in every process; weights are a function of
``seed`` only, and the global torch RNG state is left untouched.
"""

from __future__ import annotations

import functools
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tests.harness.s3 import upload_directory

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# torch and transformers are imported inside the functions that need them: importing them costs
# seconds, and the tokenizer half of this module (and its cross-process determinism test) does not.

Family = Literal["gpt2", "bert", "t5"]
FAMILIES: tuple[Family, ...] = get_args(Family)

#: Longest sequence the tiny models accept (position embeddings) and the tokenizers' model_max_length.
MAX_POSITIONS = 256
#: Hidden size shared by all families: small enough that a forward/backward pass takes milliseconds.
HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 2

# Special tokens, per family.
GPT2_BOS = "<|startoftext|>"
GPT2_EOS = "<|endoftext|>"
GPT2_PAD = "<|pad|>"
GPT2_UNK = "<|unk|>"
GPT2_IM_START = "<|im_start|>"
GPT2_IM_END = "<|im_end|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"

#: ChatML-like template. Assistant content (and its end marker, which the model must learn to emit)
#: is inside ``{% generation %}`` so transformers can return an assistant-tokens mask.
GPT2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Target vocabulary sizes; the trainers stop earlier when the corpus runs out of merges/pieces.
_VOCAB_SIZE: dict[Family, int] = {"gpt2": 900, "bert": 700, "t5": 700}

#: Original sentences written for these tests: everyday prose, short reviews, support chat.
CORPUS: tuple[str, ...] = (
    "The kettle clicked off just as the rain started to drum on the kitchen window.",
    "She folded the map twice and decided to trust the river instead.",
    "Our train left the station four minutes late, which nobody seemed to mind.",
    "A small orange cat sleeps on the warm stones beside the garden wall.",
    "He wrote the numbers 12, 48 and 305 on the back of an old receipt.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Bring a coat, because the wind on the hill is colder than it looks.",
    "The children counted the boats in the harbour and found seventeen.",
    "Fresh bread, sharp cheese and a few green apples made a fine lunch.",
    "The old bridge was painted blue last summer and already needs another coat.",
    "Please close the gate behind you so the goats stay in the field.",
    "We planted tomatoes, beans and a row of tall yellow sunflowers.",
    "The meeting moved to Thursday afternoon because the projector was broken.",
    "Her bicycle has a basket, a bell and one very squeaky pedal.",
    "At night the city lights reflect on the water like scattered coins.",
    "The recipe asks for two eggs, a cup of flour and a pinch of salt.",
    "This movie was a delight from the first scene to the last.",
    "The acting felt wooden and the story dragged on for far too long.",
    "I laughed out loud more than once, and the music was wonderful.",
    "A clever plot, but the ending was rushed and left me confused.",
    "The photography is beautiful, yet the characters never come alive.",
    "It is a warm, funny and honest film about growing up in a small town.",
    "Dull, predictable and loud; I checked my watch every ten minutes.",
    "The lead gives a brave performance in a script that does not deserve her.",
    "One of the best films I have seen this year, and I will watch it again.",
    "The jokes are stale and the pacing is painfully slow.",
    "A gentle story with a big heart and a great cast.",
    "The sequel is worse than the original in almost every way.",
    "Surprisingly moving, with a quiet ending that stays with you.",
    "The special effects cannot hide how thin and boring the plot is.",
    "A fresh, sharp comedy that never talks down to its audience.",
    "I wanted to like it, but it is simply not very good.",
    "Hello, my order has not arrived yet and the tracking page shows no update.",
    "Sorry to hear that. Could you share the order number so I can check?",
    "Sure, the order number is 58213 and it was placed last Monday.",
    "Thanks. The parcel is at the local depot and should arrive tomorrow.",
    "How do I reset my password if I no longer have access to my email?",
    "You can verify your identity with your phone number and choose a new password.",
    "Can I return a jacket that I bought online if it does not fit?",
    "Yes, returns are free within thirty days, as long as the tags are attached.",
    "My invoice shows a charge twice. Can you refund the second payment?",
    "I have refunded the duplicate charge; it will appear in three to five days.",
    "What are your opening hours on public holidays?",
    "We are open from ten until four on most public holidays.",
    "The assistant answered the question politely and then asked if anything else was needed.",
    "The user asked for a short summary of the report in plain English.",
    "Summarize: the team finished the project early and under budget.",
    "Translate to French: good morning, how are you today?",
    "Question: what colour is the sky on a clear day? Answer: blue.",
    "The model reads the text, predicts the next word, and learns from its mistakes.",
    "Training stops when the validation loss has not improved for two epochs.",
    "Every checkpoint is written to storage before the manifest is updated.",
    "The weather report promised sunshine, but fog covered the valley until noon.",
    "He practised the piano every evening and slowly the song became easier.",
    "They shared an umbrella and walked quickly toward the bus stop.",
    "The museum keeps its oldest maps in a cool, dark room downstairs.",
    "A good teacher listens carefully and explains things more than one way.",
    "The market sells honey, candles, wool socks and hand carved spoons.",
    "After the storm, the beach was covered with shells and tangled seaweed.",
    "My grandmother tells the same story every winter, and we still enjoy it.",
    "The engineer checked the logs, found the error and fixed it before lunch.",
    "Is it true that owls can turn their heads almost all the way around?",
    "Yes! It's true, and they're also able to fly almost silently.",
    "Don't forget: the deadline is Friday at 5 pm, so plan ahead.",
)

#: Characters every tokenizer can spell even though the corpus may not contain them, so ordinary
#: English text (e.g. SST-2 reviews) never maps to the unknown token. GPT-2 covers all bytes anyway.
_ASCII_ALPHABET: list[str] = list(string.ascii_letters + string.digits + string.punctuation)
_WORD_CHARS = string.ascii_letters + string.digits
#: Two-character "words" in which every letter and digit also appears word-internally: WordPiece
#: only learns a continuation piece (``##7``) for characters it has seen after another one, and
#: without it any word containing that character becomes ``[UNK]`` as a whole.
_ALPHABET_LINE = " ".join(a + b for a, b in zip(_WORD_CHARS, _WORD_CHARS[1:] + _WORD_CHARS[:1], strict=True))
_TOKENIZER_TEXTS: tuple[str, ...] = (*CORPUS, *(sentence.lower() for sentence in CORPUS), _ALPHABET_LINE)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def _train_gpt2_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE["gpt2"],
        min_frequency=2,
        show_progress=False,
        special_tokens=[GPT2_EOS, GPT2_BOS, GPT2_PAD, GPT2_UNK, GPT2_IM_START, GPT2_IM_END],
        # The whole byte alphabet: any UTF-8 text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_TOKENIZER_TEXTS, trainer=trainer)
    return tokenizer


def _train_bert_tokenizer() -> Tokenizer:
    # tokenizers' WordPieceTrainer is not deterministic across processes: the ids of "##" pieces
    # follow hash-map order and decide ties between equally frequent merges, so the vocabulary
    # changes from run to run. The BPE trainer without a continuation prefix is deterministic, so
    # it learns the pieces and each piece gets both forms: word-initial "play" and inner "##play".
    pieces = Tokenizer(models.BPE())
    pieces.normalizer = _bert_normalizer()
    pieces.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = [BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK]
    trainer = trainers.BpeTrainer(
        vocab_size=(_VOCAB_SIZE["bert"] - len(special)) // 2,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=_ASCII_ALPHABET,
    )
    pieces.train_from_iterator(_TOKENIZER_TEXTS, trainer=trainer)
    learned = sorted(pieces.get_vocab().items(), key=lambda item: item[1])
    vocab: dict[str, int] = {}
    for token in [*special, *(piece for piece, _ in learned), *(f"##{piece}" for piece, _ in learned)]:
        vocab.setdefault(token, len(vocab))

    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=BERT_UNK, max_input_chars_per_word=100))
    tokenizer.normalizer = _bert_normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(special)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BERT_CLS}:0 $A:0 {BERT_SEP}:0",
        pair=f"{BERT_CLS}:0 $A:0 {BERT_SEP}:0 $B:1 {BERT_SEP}:1",
        special_tokens=[(BERT_CLS, vocab[BERT_CLS]), (BERT_SEP, vocab[BERT_SEP])],
    )
    return tokenizer


def _bert_normalizer() -> normalizers.Normalizer:
    # Uncased BERT: clean control characters, space out CJK, lowercase and strip accents.
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def _train_t5_tokenizer() -> Tokenizer:
    # SentencePiece style (Metaspace "▁" word boundaries). Real T5 uses a Unigram model, but
    # tokenizers' UnigramTrainer gives slightly different scores in every process; BPE over the
    # same pre-tokenization is deterministic, and nothing in the tests depends on the model type.
    tokenizer = Tokenizer(models.BPE(unk_token=T5_UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE["t5"],
        min_frequency=1,
        show_progress=False,
        special_tokens=[T5_PAD, T5_EOS, T5_UNK],  # ids 0, 1, 2 as in T5
        initial_alphabet=[*_ASCII_ALPHABET, "▁"],
    )
    tokenizer.train_from_iterator(_TOKENIZER_TEXTS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {T5_EOS}:0",
        pair=f"$A:0 {T5_EOS}:0 $B:0 {T5_EOS}:0",
        special_tokens=[(T5_EOS, tokenizer.token_to_id(T5_EOS))],
    )
    return tokenizer


_TRAINERS = {"gpt2": _train_gpt2_tokenizer, "bert": _train_bert_tokenizer, "t5": _train_t5_tokenizer}


@functools.cache
def trained_tokenizer_json(family: Family) -> str:
    """The trained tokenizer, serialised; trained once per process and family."""
    return _TRAINERS[family]().to_str()


def build_tiny_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """A fresh transformers tokenizer for ``family`` (training is cached; the object is not shared)."""
    from transformers import PreTrainedTokenizerFast

    _check_family(family)
    backend = Tokenizer.from_str(trained_tokenizer_json(family))
    common = {"tokenizer_object": backend, "model_max_length": MAX_POSITIONS}
    # (The ignores: transformers leaves the tokenizer constructor and ``Module.eval`` unannotated.)
    if family == "gpt2":
        return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            **common,
            bos_token=GPT2_BOS,
            eos_token=GPT2_EOS,
            pad_token=GPT2_PAD,
            unk_token=GPT2_UNK,
            extra_special_tokens=[GPT2_IM_START, GPT2_IM_END],
            chat_template=GPT2_CHAT_TEMPLATE,
        )
    if family == "bert":
        return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            **common,
            pad_token=BERT_PAD,
            unk_token=BERT_UNK,
            cls_token=BERT_CLS,
            sep_token=BERT_SEP,
            mask_token=BERT_MASK,
            # The generic fast tokenizer returns only ids and mask; BERT needs the segment ids too.
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        **common, pad_token=T5_PAD, eos_token=T5_EOS, unk_token=T5_UNK
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _build_model(
    family: Family, tokenizer: PreTrainedTokenizerFast, *, num_labels: int, base_only: bool
) -> PreTrainedModel:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        GPT2Model,
        T5Config,
        T5ForConditionalGeneration,
        T5Model,
    )

    vocab_size = len(tokenizer)
    if family == "gpt2":
        gpt2_config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=HIDDEN_SIZE,
            n_layer=NUM_LAYERS,
            n_head=NUM_HEADS,
            n_inner=2 * HIDDEN_SIZE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return GPT2Model(gpt2_config) if base_only else GPT2LMHeadModel(gpt2_config)
    if family == "bert":
        bert_config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            intermediate_size=2 * HIDDEN_SIZE,
            max_position_embeddings=MAX_POSITIONS,
            type_vocab_size=2,
            pad_token_id=tokenizer.pad_token_id,
        )
        bert_config.num_labels = num_labels  # a property: also writes id2label/label2id
        return BertModel(bert_config) if base_only else BertForSequenceClassification(bert_config)
    t5_config = T5Config(
        vocab_size=vocab_size,
        d_model=HIDDEN_SIZE,
        d_kv=HIDDEN_SIZE // NUM_HEADS,
        d_ff=2 * HIDDEN_SIZE,
        num_layers=NUM_LAYERS,
        num_decoder_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    t5_config.decoder_start_token_id = tokenizer.pad_token_id  # T5 starts decoding from <pad>
    return T5Model(t5_config) if base_only else T5ForConditionalGeneration(t5_config)


def build_tiny_model(
    family: Family,
    directory: Path,
    *,
    num_labels: int = 2,
    seed: int = 0,
    base_only: bool = False,
) -> Path:
    """Build a tiny randomly initialised model of ``family`` and save it with its tokenizer.

    ``directory`` is created if needed and returned. ``num_labels`` only matters for ``"bert"``.
    ``base_only=True`` saves the bare backbone without a task head (``GPT2Model``, ``BertModel``,
    ``T5Model``), like many hub checkpoints: loading it with an ``AutoModelFor…`` class then
    initialises the head fresh. The same ``family``/``num_labels``/``seed``/``base_only`` always give
    the same weights, and the global torch RNG is left as it was.
    """
    _check_family(family)
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    import torch

    tokenizer = build_tiny_tokenizer(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(family, tokenizer, num_labels=num_labels, base_only=base_only)
    model.eval()  # type: ignore[no-untyped-call]
    if family == "gpt2" and not base_only and model.generation_config is not None:
        # Chat replies end with <|im_end|>; plain text with <|endoftext|>. Generation stops at either.
        model.generation_config.eos_token_id = [
            tokenizer.convert_tokens_to_ids(GPT2_EOS),
            tokenizer.convert_tokens_to_ids(GPT2_IM_END),
        ]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def upload_tiny_model(
    family: Family,
    client: S3Client,
    bucket: str,
    prefix: str,
    *,
    num_labels: int = 2,
    seed: int = 0,
    base_only: bool = False,
    source_dir: Path | None = None,
) -> str:
    """Put a tiny model under ``s3://bucket/prefix/`` and return that URI (ending in ``/``).

    ``source_dir`` is an already built model directory to upload (e.g. from the
    ``tiny_model_dir`` fixture); without it the model is built in a temporary directory.
    """
    if source_dir is not None:
        keys = upload_directory(client, bucket, source_dir, prefix)
    else:
        with tempfile.TemporaryDirectory(prefix=f"tiny-{family}-") as tmp:
            built = build_tiny_model(family, Path(tmp), num_labels=num_labels, seed=seed, base_only=base_only)
            keys = upload_directory(client, bucket, built, prefix)
    if not keys:
        raise RuntimeError(f"nothing was uploaded for the tiny {family} model")
    normalized = prefix.strip("/")
    return f"s3://{bucket}/{normalized}/" if normalized else f"s3://{bucket}/"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
