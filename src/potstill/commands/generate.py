"""``potstill generate``: the teacher answers prompts, for sequence-level KD.

    generate("run.yaml", overrides=["generate.output=runs/gen.jsonl", "generate.num_generations=2"])

Prompts come from the config's ``data`` source: a ``prompt`` column (text, or a message
list), else a ``messages`` column (the conversation up to its last user turn), else the
``text`` column. With a chat template (the teacher tokenizer's, or ``data.chat_template``)
a text prompt becomes one user message, rendered with the generation prompt. Generation
is batched (left padding) and KV-cached (``model.generate``); prompts longer than
``generate.max_prompt_length`` tokens are skipped and counted.

Output rows (jsonl, or parquet): ``prompt`` (as given), ``completion`` (text), ``teacher``,
``generation`` (the settings), ``prompt_index``, ``sample``: the ``prompt_completion``
format that ``data`` reads directly, so a student with another tokenizer re-tokenizes the text.
Rows are appended to ``<output>.partial.jsonl`` (fsynced a batch at a time); a stopped run
drops a half-written tail and continues with the next prompt; each batch samples from a
seed derived from its first prompt, so a resumed file equals an uninterrupted one. The
final file is published atomically with a ``<output>.summary.json`` beside it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..config import DistillConfig, as_config
from ..errors import ConfigError, DataError

log = logging.getLogger("potstill")


def prompt_of(row: dict, cfg) -> Any:
    """The prompt of a source row: text or a message list; None when the row has none."""
    if cfg.prompt_field in row and row[cfg.prompt_field] is not None:
        return row[cfg.prompt_field]
    msgs = row.get(cfg.messages_field)
    if msgs:
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
        return list(msgs[: last_user + 1]) if last_user is not None else None
    text = row.get(cfg.text_field)
    return text if text else None


def render(prompt: Any, tokenizer, chat_template: str | None, use_chat: bool) -> list[int]:
    """Token ids of a prompt, ready for the teacher to continue."""
    if use_chat:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        text = tokenizer.apply_chat_template(msgs, chat_template=chat_template, add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list):
        raise DataError("a message-list prompt needs a chat template: set data.chat_template")
    return tokenizer(str(prompt))["input_ids"]


def _complete_rows(partial: Path, per_batch: int) -> list[str]:
    """Lines of whole batches (per_batch = batch_size x num_generations lines) already written."""
    if not partial.is_file():
        return []
    lines = partial.read_text(encoding="utf-8").split("\n")
    good = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            break
        good.append(line)
    return good[: len(good) - len(good) % per_batch]


@torch.no_grad()
def generate(config, *, overrides=(), progress: bool = True) -> dict[str, Any]:
    """Write the teacher's answers to ``generate.output``; returns the summary."""
    from tqdm.auto import tqdm

    from ..data.sources import open_source
    from ..models.teacher_model import load_teacher
    from ..teachers.capture import model_name

    cfg: DistillConfig = as_config(config, overrides)
    gc, dc = cfg.generate, cfg.data
    if cfg.teacher.name_or_path is None:
        raise ConfigError("generate needs teacher.name_or_path: the model that answers the prompts")
    if gc.output is None:
        raise ConfigError("generate.output is required: a .jsonl or .parquet file for the teacher's answers")
    out = Path(gc.output)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"generate.output={out}: use a .jsonl or .parquet file name")
    summary_path = out.with_name(out.name + ".summary.json")
    if out.exists() and summary_path.is_file():
        log.info("generate: %s is complete", out)
        return json.loads(summary_path.read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, tok = load_teacher(cfg.teacher, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    teacher.to(device)
    use_chat = gc.chat_template and (dc.chat_template is not None or bool(getattr(tok, "chat_template", None)))
    rows = open_source(dc.source, cfg=dc, split=dc.split).rows()
    settings = {"num_generations": gc.num_generations, "temperature": gc.temperature, "top_p": gc.top_p,
                "top_k": gc.top_k, "max_new_tokens": gc.max_new_tokens, "seed": gc.seed, "chat_template": use_chat}
    name = model_name(cfg.teacher.name_or_path)
    prompts, skipped_long, skipped_empty = [], 0, 0
    for i in range(len(rows)):
        prompt = prompt_of(rows[i], dc)
        if prompt is None:
            skipped_empty += 1
            continue
        ids = render(prompt, tok, dc.chat_template, use_chat)
        if len(ids) > gc.max_prompt_length:
            skipped_long += 1
            continue
        prompts.append((i, prompt, ids))
    partial = out.with_name(out.name + ".partial.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done_lines = _complete_rows(partial, gc.batch_size * gc.num_generations)
    start = len(done_lines) // gc.num_generations
    with open(partial, "w", encoding="utf-8") as fh:  # rewrite the complete part: drops a torn tail
        fh.write("".join(line + "\n" for line in done_lines))
    if start:
        log.info("generate: continuing after %d of %d prompts", start, len(prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bar = tqdm(total=len(prompts), initial=start, desc="generate", unit="prompt", disable=not progress,
               dynamic_ncols=True)
    teacher.eval()
    for a in range(start, len(prompts), gc.batch_size):
        batch = prompts[a: a + gc.batch_size]
        width = max(len(p[2]) for p in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, _, ids) in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            attention[r, width - len(ids):] = 1
        torch.manual_seed(gc.seed * 1_000_003 + a)
        sample = gc.temperature > 0
        generated = teacher.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=sample,
            temperature=gc.temperature if sample else None, top_p=gc.top_p if sample else None,
            top_k=(gc.top_k or 0) if sample else None, max_new_tokens=gc.max_new_tokens,  # 0: no top-k filter
            num_return_sequences=gc.num_generations, pad_token_id=pad, eos_token_id=tok.eos_token_id,
            use_cache=True)
        new = generated[:, width:].cpu()
        lines = []
        for r, (index, prompt, _) in enumerate(batch):
            for j in range(gc.num_generations):
                text = tok.decode(new[r * gc.num_generations + j], skip_special_tokens=True)
                lines.append(json.dumps({"prompt": prompt, "completion": text, "teacher": name,
                                         "generation": settings, "prompt_index": index, "sample": j},
                                        ensure_ascii=False))
        with open(partial, "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        bar.update(len(batch))
    bar.close()
    records = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(records).to_parquet(tmp)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out)
    summary = {"output": str(out), "rows": len(records), "prompts": len(prompts), "source_rows": len(rows),
               "skipped_too_long": skipped_long, "skipped_no_prompt": skipped_empty,
               "max_prompt_length": gc.max_prompt_length, "teacher": name, "generation": settings}
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    partial.unlink()
    log.info("generate: %d rows from %d prompts -> %s; skipped %d prompts over %d tokens, %d without a prompt",
             len(records), len(prompts), out, skipped_long, gc.max_prompt_length, skipped_empty)
    return summary
