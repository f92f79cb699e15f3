"""The trainer's data, from files to micro-batches.

``load_samples``        JSONL (or a Hugging Face ``datasets`` directory or name) -> ``Sample`` list.
``render``              a sample as one tokenizer's text, with the completion's exact character span.
``tokenize``            that text as token ids and a loss mask over the completion's tokens.
``GlobalBatchSampler``  the deterministic, resumable stream of global batches (dataset indices);
                        ``rank_slice`` is one data-parallel rank's contiguous part of a batch.
``collate``             tokenized samples -> Megatron's ``tokens``/``labels``/``loss_mask``/``position_ids``.
``DataStats``           counters the trainer logs (truncated samples, samples left without completion).

Rendering. Every tokenizer renders the same sample the same way, so the student and each
cross-tokenizer teacher see the same completion text and can be aligned on it::

    text = PROMPT + COMPLETION + EOS

* ``PROMPT`` is the plain ``prompt`` string, or, for chat messages, the tokenizer's chat template of
  the messages before the final assistant turn with ``add_generation_prompt=True`` — the very text
  an on-policy rollout starts from.
* ``COMPLETION`` is the reference completion, verbatim (``completion_span`` covers exactly it).
* ``EOS`` is the tokenizer's ``eos_token`` text when it has one, else nothing. The student learns to
  stop the way a rollout stops: at ``eos_token_id``. Nothing else of the template follows (no
  end-of-turn newline): for instruct tokenizers ``eos_token`` is the end-of-turn marker.

Completion tokens (``loss_mask``) are the tokens that end after the completion's first character:
the completion's tokens, the EOS, and a token straddling the boundary (SentencePiece's ``▁Hello`` that
carries the template's space before ``Hello``), since it holds completion text. Tokens the tokenizer
adds by itself (a post-processor's BOS, offsets ``(0, 0)``) are prompt tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # Megatron's and PyTorch's cross-entropy ``ignore_index``
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

Message = Mapping[str, Any]


@dataclass(frozen=True)
class Sample:
    """One training example.

    Attributes:
        prompt: a plain string, or the chat messages (``{"role", "content"}`` mappings, as a tuple)
            before the final assistant turn; earlier assistant turns are prompt, never trained on.
        completion: the reference completion text, or ``None`` for prompt-only data (on-policy
            rollouts generate the completion).
        domain: an optional label (teacher routing, per-domain metrics).
        index: the sample's position in its dataset (0-based, blank lines not counted).
    """

    prompt: str | tuple[Message, ...]
    completion: str | None
    domain: str | None
    index: int

    @property
    def is_chat(self) -> bool:
        """Whether the prompt is chat messages (rendered with a chat template)."""
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class RenderedSample:
    """A sample as one tokenizer's text.

    Attributes:
        text: ``PROMPT + COMPLETION + EOS`` (see the module docstring); just ``PROMPT`` for a
            prompt-only sample or ``with_completion=False``.
        completion_span: ``(start, end)`` character offsets with ``text[start:end] == completion``
            exactly; ``None`` when there is no completion in ``text``.
        add_special_tokens: whether ``tokenize`` lets the tokenizer add its own special tokens
            (BOS): True for plain prompts, False for chat templates, which write their own.
    """

    text: str
    completion_span: tuple[int, int] | None
    add_special_tokens: bool


@dataclass(frozen=True)
class TokenizedSample:
    """A rendered sample as token ids, at most ``max_length`` of them.

    Attributes:
        input_ids: ``[n]`` token ids, ``n <= max_length``.
        loss_mask: ``[n]``, True on completion tokens (the completion, the EOS, a boundary token).
        offsets: ``[n]`` character spans of the tokens in ``RenderedSample.text``.
        truncated: the text had more than ``max_length`` tokens; its end was cut off.
        num_completion_tokens: ``sum(loss_mask)`` after truncation (0: nothing left to learn).
    """

    input_ids: list[int]
    loss_mask: list[bool]
    offsets: list[tuple[int, int]]
    truncated: bool
    num_completion_tokens: int


@dataclass(frozen=True)
class Example:
    """A dataset sample as the student sees it: the sample, its rendering and its tokens."""

    sample: Sample
    rendered: RenderedSample
    tokenized: TokenizedSample


# --------------------------------------------------------------------------------------- loading


def load_samples(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    completion_key: str = "completion",
    messages_key: str = "messages",
    domain_key: str = "domain",
    split: str = "train",
) -> list[Sample]:
    """Read a dataset into ``Sample``s, in file order.

    Each record (a JSONL line, or a ``datasets`` row) holds exactly one of:

    * ``messages``: a list of ``{"role", "content"}`` (roles ``system``/``user``/``assistant``/
      ``tool``, string content). A final ``assistant`` message is the completion; otherwise the
      sample is prompt-only.
    * ``prompt``: a string (or a message list), with an optional ``completion``: a string, ``null``
      (prompt-only), or a one-message list ``[{"role": "assistant", "content": ...}]``.

    and optionally ``domain`` (a string or ``null``). Blank lines are skipped.

    Args:
        path: a ``.jsonl`` file; a directory saved by ``datasets`` (``Dataset.save_to_disk``); or a
            ``datasets`` name (``datasets.load_dataset``). The last two need ``datasets`` installed.
        prompt_key, completion_key, messages_key, domain_key: the field names in the records.
        split: the split of a ``DatasetDict`` or a named dataset.
    Raises:
        ValueError: bad JSON, a missing or mistyped field, an unknown role, an empty dataset — the
            message names ``path:line`` (``path[row i]`` for ``datasets``), the field and the fix.
        FileNotFoundError: a ``.jsonl``/``.json`` path that does not exist.
        ImportError: a directory or name while ``datasets`` is not installed.
    """
    keys = _Keys(prompt_key, completion_key, messages_key, domain_key)
    path = Path(path)
    if path.is_file():
        records = _jsonl_records(path)
    elif path.suffix in _JSONL_SUFFIXES and not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a JSONL dataset)")
    else:
        records = _datasets_records(str(path), split)
    samples = [keys.parse(record, where, index) for index, (where, record) in enumerate(records)]
    if not samples:
        raise ValueError(f"{path}: the dataset is empty; add one JSON object per line")
    return samples


@dataclass(frozen=True)
class _Keys:
    prompt: str
    completion: str
    messages: str
    domain: str

    def parse(self, record: Any, where: str, index: int) -> Sample:
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        has_messages = record.get(self.messages) is not None
        has_prompt = record.get(self.prompt) is not None
        if has_messages == has_prompt:
            what = "both" if has_messages else "neither"
            raise ValueError(
                f"{where}: the record has {what} of {self.messages!r} and {self.prompt!r}; give exactly "
                f"one (found fields {sorted(record)}; rename them with messages_key=/prompt_key=)"
            )
        domain = record.get(self.domain)
        if domain is not None and not isinstance(domain, str):
            raise ValueError(f"{where}: field {self.domain!r} must be a string or null, got {domain!r}")
        if has_messages:
            messages = _messages(record[self.messages], where, self.messages)
            if len(messages) >= 2 and messages[-1]["role"] == "assistant":
                return Sample(messages[:-1], messages[-1]["content"], domain, index)
            if messages[-1]["role"] == "assistant":
                raise ValueError(
                    f"{where}: field {self.messages!r} holds only an assistant message; "
                    "put at least one user (or system) message before it"
                )
            return Sample(messages, None, domain, index)
        prompt = record[self.prompt]
        if not isinstance(prompt, str):
            prompt = _messages(prompt, where, self.prompt)
        completion = record.get(self.completion)
        if isinstance(completion, list):
            turn = _messages(completion, where, self.completion)
            if len(turn) != 1 or turn[0]["role"] != "assistant":
                raise ValueError(
                    f"{where}: field {self.completion!r} as a list must be exactly one assistant "
                    f'message [{{"role": "assistant", "content": ...}}], got {len(turn)} message(s)'
                )
            completion = turn[0]["content"]
        elif completion is not None and not isinstance(completion, str):
            raise ValueError(
                f"{where}: field {self.completion!r} must be a string, null or a one-message list, "
                f"got {type(completion).__name__}"
            )
        return Sample(prompt, completion, domain, index)


def _messages(value: Any, where: str, field: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{where}: field {field!r} must be a non-empty list of "
            f'{{"role": ..., "content": ...}} objects, got {type(value).__name__}'
        )
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: {field}[{i}] must be an object with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: {field}[{i}] has unknown role {message['role']!r}; use one of {list(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"{where}: {field}[{i}].content must be a string, got {type(message['content']).__name__}"
            )
    return tuple(dict(message) for message in value)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); "
                    "write one JSON object per line"
                ) from None
            yield f"{path}:{number}", record


def _datasets_records(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{name} is not a file: loading a saved dataset directory or a dataset name needs the "
            "Hugging Face datasets library (pip install datasets); or pass a .jsonl file"
        ) from None
    if Path(name).is_dir():
        dataset = datasets.load_from_disk(name)
    else:
        dataset = datasets.load_dataset(name, split=split)
    if isinstance(dataset, Mapping):  # a DatasetDict
        if split not in dataset:
            raise ValueError(f"{name}: no split {split!r}; choose split= from {sorted(dataset)}")
        dataset = dataset[split]
    for row, record in enumerate(dataset):
        yield f"{name}[row {row}]", record


# ------------------------------------------------------------------------------------- rendering


def render(sample: Sample, tokenizer: Any, *, with_completion: bool = True) -> RenderedSample:
    """``sample`` as ``tokenizer``'s text: ``PROMPT + COMPLETION + EOS`` (module docstring).

    Args:
        sample: the sample.
        tokenizer: a Hugging Face tokenizer; chat samples need its ``chat_template``.
        with_completion: False renders the prompt alone (the start of an on-policy rollout).
    Raises:
        ValueError: a chat sample and a tokenizer without a chat template.
    """
    if sample.is_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"sample {sample.index} is chat messages but the tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template; "
                "set tokenizer.chat_template (a Jinja template) or use prompt/completion data"
            )
        prompt = tokenizer.apply_chat_template(
            [dict(message) for message in sample.prompt], tokenize=False, add_generation_prompt=True
        )
    else:
        prompt = sample.prompt
    if not with_completion or sample.completion is None:
        return RenderedSample(prompt, None, add_special_tokens=not sample.is_chat)
    start = len(prompt)
    end = start + len(sample.completion)
    eos = tokenizer.eos_token or ""
    return RenderedSample(prompt + sample.completion + eos, (start, end), add_special_tokens=not sample.is_chat)


def tokenize(rendered: RenderedSample, tokenizer: Any, max_length: int) -> TokenizedSample:
    """Token ids of ``rendered.text``, the first ``max_length`` of them, and the completion mask.

    A token is a completion token when it ends after the completion's first character (module
    docstring). Over ``max_length`` tokens, the end is cut off and ``truncated`` is set; a prompt
    that fills ``max_length`` by itself leaves ``num_completion_tokens == 0`` — the sample is still
    returned, for ``DataStats`` to count.

    Raises:
        ValueError: ``max_length < 1``; a slow tokenizer (no offsets); a tokenizer that splits its
            EOS text into pieces (``split_special_tokens=True``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets need one "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    encoding = tokenizer(
        rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True
    )
    ids = list(encoding["input_ids"])
    offsets = [tuple(span) for span in encoding["offset_mapping"]]
    if rendered.completion_span is None:
        mask = [False] * len(ids)
    else:
        start, end = rendered.completion_span
        eos = tokenizer.eos_token
        if eos and rendered.text[end:] == eos and (not ids or ids[-1] != tokenizer.eos_token_id):
            raise ValueError(
                f"the tokenizer does not read its EOS text {eos!r} as eos_token_id {tokenizer.eos_token_id}: "
                "set tokenizer.split_special_tokens = False"
            )
        mask = [token_end > start for _, token_end in offsets]
    truncated = len(ids) > max_length
    ids, mask, offsets = ids[:max_length], mask[:max_length], offsets[:max_length]
    return TokenizedSample(ids, mask, offsets, truncated, sum(mask))


# -------------------------------------------------------------------------------------- sampling


class GlobalBatchSampler:
    """The deterministic stream of global batches: lists of ``global_batch_size`` dataset indices.

    Epoch ``e`` visits the dataset in the order ``torch.randperm(num_samples,
    generator=torch.Generator().manual_seed(seed + e))`` (``range(num_samples)`` without shuffling);
    the epochs follow each other as one stream, and batch ``k`` is its positions
    ``[k * global_batch_size, (k + 1) * global_batch_size)``. So:

    * ``drop_last=False``: the last partial batch of an epoch is completed from the start of the next
      epoch (a sample may then appear twice in that batch); every step has exactly
      ``global_batch_size`` samples and nothing is skipped.
    * ``drop_last=True``: each epoch's leftover ``num_samples % global_batch_size`` samples are
      skipped and every batch lies within one epoch.

    The stream does not depend on the data-parallel size: each rank takes ``rank_slice`` of the same
    global batch, so runs at any DP size train on the same samples per step. The cursor is
    ``consumed_samples``; ``next()`` advances it, ``state_dict``/``load_state_dict`` save and restore it.
    """

    def __init__(
        self, num_samples: int, global_batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = False
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
        if drop_last and global_batch_size > num_samples:
            raise ValueError(
                f"drop_last=True with global_batch_size {global_batch_size} > num_samples {num_samples} "
                "leaves no batch; lower the batch size or set drop_last=False"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.consumed_samples = 0
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def step(self) -> int:
        """The number of global batches taken so far."""
        return self.consumed_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        if self.drop_last:
            return self.step // (self.num_samples // self.global_batch_size)
        return self.consumed_samples // self.num_samples

    def batch(self, step: int) -> list[int]:
        """Global batch number ``step`` (0-based) of the stream; does not move the cursor."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        size, n = self.global_batch_size, self.num_samples
        if self.drop_last:
            per_epoch = n // size
            start = (step % per_epoch) * size
            return self._order(step // per_epoch)[start : start + size].tolist()
        indices: list[int] = []
        position = step * size
        while len(indices) < size:
            epoch, offset = divmod(position, n)
            take = min(size - len(indices), n - offset)
            indices += self._order(epoch)[offset : offset + take].tolist()
            position += take
        return indices

    def __iter__(self) -> GlobalBatchSampler:
        return self

    def __next__(self) -> list[int]:
        indices = self.batch(self.step)
        self.consumed_samples += self.global_batch_size
        return indices

    def state_dict(self) -> dict[str, Any]:
        """The cursor and what it is valid for: save it with the checkpoint."""
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved cursor; the next batches equal those the saved run would have taken.

        Raises:
            ValueError: the state is from a different dataset size, seed, batch size or order.
        """
        current = self.state_dict()
        missing = sorted(set(current) - set(state))
        if missing:
            raise ValueError(f"data sampler state lacks {missing}; was it saved by GlobalBatchSampler.state_dict()?")
        mismatched = [
            f"{key}: saved {state[key]!r}, now {current[key]!r}"
            for key in ("num_samples", "seed", "global_batch_size", "shuffle", "drop_last")
            if state[key] != current[key]
        ]
        if mismatched:
            raise ValueError(
                "the data sampler state belongs to another data order (" + "; ".join(mismatched) + "); "
                "resume with the same dataset, seed and global batch size, or start the data from scratch"
            )
        consumed = state["consumed_samples"]
        if not isinstance(consumed, int) or consumed < 0 or consumed % self.global_batch_size:
            raise ValueError(
                f"consumed_samples {consumed!r} is not a whole number of global batches of {self.global_batch_size}"
            )
        self.consumed_samples = consumed

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=generator)
            else:
                order = torch.arange(self.num_samples)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a batch spans two
            self._orders[epoch] = order
        return self._orders[epoch]


def rank_slice(batch: Sequence[Any], dp_rank: int, dp_size: int) -> list[Any]:
    """Data-parallel rank ``dp_rank``'s contiguous part of a global batch: ``len(batch) // dp_size`` items.

    Concatenating the parts of ranks ``0 .. dp_size - 1`` gives ``batch`` back.

    Raises:
        ValueError: ``len(batch)`` not divisible by ``dp_size``, or ``dp_rank`` outside ``[0, dp_size)``.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
    if len(batch) % dp_size:
        raise ValueError(
            f"the global batch of {len(batch)} samples does not divide among {dp_size} data-parallel ranks; "
            f"choose a global_batch_size divisible by {dp_size}"
        )
    per_rank = len(batch) // dp_size
    return list(batch[dp_rank * per_rank : (dp_rank + 1) * per_rank])


# ------------------------------------------------------------------------------------- batching


def collate(samples: Sequence[TokenizedSample], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch in Megatron's GPT layout, right-padded to ``seq_length``.

    Returns:
        ``tokens``        int64 ``[b, seq_length]``: the ids, then ``pad_id``.
        ``labels``        int64 ``[b, seq_length]``: ``labels[:, j] = tokens[:, j + 1]`` where token
                          ``j + 1`` is a completion token, else ``-100``; the last column is ``-100``.
        ``loss_mask``     float32 ``[b, seq_length]``: ``labels != -100``.
        ``position_ids``  int64 ``[b, seq_length]``: ``0 .. seq_length - 1`` in every row.
    Raises:
        ValueError: no samples, or a sample longer than ``seq_length``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    tokens = torch.full((len(samples), seq_length), pad_id, dtype=torch.int64)
    targets = torch.zeros((len(samples), seq_length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        if n > seq_length:
            raise ValueError(
                f"micro-batch row {row} has {n} tokens, more than seq_length {seq_length}; "
                "tokenize with max_length <= seq_length"
            )
        tokens[row, :n] = torch.tensor(sample.input_ids, dtype=torch.int64)
        targets[row, :n] = torch.tensor(sample.loss_mask, dtype=torch.bool)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = torch.where(targets[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": torch.arange(seq_length, dtype=torch.int64).expand(len(samples), -1).contiguous(),
    }


@dataclass(frozen=True)
class DataStats:
    """Counters over tokenized samples, summed with ``+`` across micro-batches and steps.

    Attributes:
        samples: samples seen.
        truncated: samples cut at ``max_length``.
        without_completion: samples left with no completion token (prompt-only data, or a prompt
            that filled ``max_length``): they contribute nothing to completion losses.
        completion_tokens: completion tokens kept.
    """

    samples: int = 0
    truncated: int = 0
    without_completion: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, samples: Iterable[TokenizedSample]) -> DataStats:
        """The counters of ``samples``."""
        samples = list(samples)
        return cls(
            samples=len(samples),
            truncated=sum(s.truncated for s in samples),
            without_completion=sum(s.num_completion_tokens == 0 for s in samples),
            completion_tokens=sum(s.num_completion_tokens for s in samples),
        )

    def __add__(self, other: DataStats) -> DataStats:
        return DataStats(
            self.samples + other.samples,
            self.truncated + other.truncated,
            self.without_completion + other.without_completion,
            self.completion_tokens + other.completion_tokens,
        )

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        """The counters under log names: ``{prefix}samples``, ``{prefix}truncated_samples``, ..."""
        return {
            f"{prefix}samples": self.samples,
            f"{prefix}truncated_samples": self.truncated,
            f"{prefix}samples_without_completion": self.without_completion,
            f"{prefix}completion_tokens": self.completion_tokens,
        }
