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

Never lose or mix output. The files beside ``generate.output`` (``gen.jsonl``):

* ``gen.jsonl.lock``: an exclusive ``flock`` (``pid N on HOST``) held for the whole command,
  so two processes never write one output; the OS releases it if the process dies.
* ``gen.jsonl.partial.json``: every setting that decides the rows (teacher, tokenizer, data
  and its content, generation settings, device), written before the partial rows exist. A
  resume with other settings is refused, naming them: rows of two configs never mix.
* ``gen.jsonl.partial.jsonl``: rows appended a batch at a time (fsynced); a stopped run
  drops a half-written tail and continues with the next prompt. Each batch samples from a
  seed derived from its first prompt, so a resumed file equals an uninterrupted one.
* ``gen.jsonl.summary.json``: written when the rows are complete, with the settings; then
  the final file is published atomically (temp name, rename). A finished output is returned
  as is for the same settings and refused for others.

With ``teacher.server`` (vLLM) no teacher loads: the server answers each prompt, requests
running concurrently, rows still written a batch at a time in prompt order; each prompt
samples from a seed derived from its row index. The settings name the server (its URL and
model) instead of a local teacher and device. The requests and their checks are in
:mod:`potstill.teachers.served_generation`.

What generate did not write is never replaced: an existing output without a summary, a
partial file without its settings file, or an output that is (or lies in, or is matched
by) ``data.source`` / ``data.validation_source`` is refused in one line. All of this is
checked before the teacher loads; a full disk or an unwritable folder is one line too, and
the next run continues from the partial file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text, disk_errors
from ..config import DistillConfig, as_config
from ..errors import ConfigError, DataError, RunDirError
from ..locking import FileLock
from ..stopping import StopRequest

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


# ----------------------------------------------------------------------------------------
# The files of one output


@dataclass(frozen=True)
class OutputFiles:
    """``generate.output`` and the files potstill keeps beside it."""

    out: Path

    def _beside(self, suffix: str) -> Path:
        return self.out.with_name(self.out.name + suffix)

    @property
    def lock(self) -> Path:
        return self._beside(".lock")

    @property
    def partial(self) -> Path:
        return self._beside(".partial.jsonl")

    @property
    def settings(self) -> Path:
        return self._beside(".partial.json")

    @property
    def summary(self) -> Path:
        return self._beside(".summary.json")

    @property
    def temp(self) -> Path:
        """Where the final file is written before it is renamed into place."""
        return self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")


def _advice(files: OutputFiles) -> str:
    return (f"fix that (free space, a writable folder), then run potstill generate again with the same settings: "
            f"it continues from {files.partial}")


@contextlib.contextmanager
def output_lock(files: OutputFiles):
    """Hold an exclusive lock on ``<output>.lock`` for the block (removed afterwards); refuse if
    another process holds it (:class:`~potstill.locking.FileLock`)."""
    lock = FileLock(files.lock, remove_on_release=True)
    with disk_errors(f"generate.output {files.out}: cannot create its lock file", advice=_advice(files)):
        files.lock.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(busy=lambda holder: RunDirError(
            f"generate.output {files.out} is being written by {holder} (lock {files.lock}): wait for that generate "
            "to finish, or choose another generate.output"))
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------
# Never write over the data


def _glob_parts_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Path components against glob components, as ``glob.glob(recursive=True)`` matches them."""
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        return any(_glob_parts_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    name = parts[0]
    if name.startswith(".") and not head.startswith(".") and head != name:
        return False  # glob's wildcards skip hidden names
    return fnmatch.fnmatchcase(name, head) and _glob_parts_match(pattern[1:], parts[1:])


def glob_matches(pattern: str, path: Path) -> bool:
    """Whether ``path`` (existing or not) is one of the files the glob ``pattern`` names."""
    pat = Path(os.path.abspath(os.path.expanduser(pattern))).parts
    candidates = {Path(os.path.abspath(path)).parts, path.resolve().parts}
    return any(_glob_parts_match(pat, c) for c in candidates)


def _same_file(a: Path, b: Path) -> bool:
    """Same file after symlinks, or the same inode (a hard link)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _path_items(source: Any) -> list[str]:
    """The strings of a source setting that may name local files, folders or globs (not text rows)."""
    items = source if isinstance(source, (list, tuple)) else [source]
    return [os.path.expanduser(os.fspath(x)) for x in items
            if isinstance(x, os.PathLike) or (isinstance(x, str) and "\n" not in x and 0 < len(x) <= 1024)]


def _reads(item: str, target: Path) -> bool:
    """Whether the data source ``item`` (a file, folder or glob) reads ``target``."""
    p = Path(item)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError:
        return False
    if is_dir:  # a folder source reads the files directly in it
        return _same_file(target.parent, p)
    if exists:
        return _same_file(target, p)
    return any(c in item for c in "*?[") and glob_matches(item, target)


def refuse_data_paths(files: OutputFiles, dc) -> None:
    """Refuse an output (or a file potstill keeps beside it) that the run's own data would read."""
    for what, source in (("data.source", dc.source), ("data.validation_source", dc.validation_source)):
        for item in _path_items(source):
            for target in (files.out, files.partial, files.settings, files.summary):
                if not _reads(item, target):
                    continue
                whose = "" if target == files.out else f" (its side file {target.name})"
                raise RunDirError(
                    f"generate.output {files.out}{whose} would overwrite or join the data that {what} '{item}' "
                    f"reads: choose a generate.output outside the data")


# ----------------------------------------------------------------------------------------
# What decides the rows


def _ident(ref: Any) -> Any:
    """A model / tokenizer / data reference as JSON: local paths resolved, objects by type."""
    if isinstance(ref, (list, tuple)):
        return [_ident(r) for r in ref]
    if isinstance(ref, (str, os.PathLike)):
        s = os.path.expanduser(os.fspath(ref))
        with contextlib.suppress(OSError):
            if len(s) <= 1024 and "\n" not in s and Path(s).exists():
                return str(Path(s).resolve())
        return os.fspath(ref)
    return None if ref is None else f"<object {type(ref).__qualname__}>"


def row_settings(cfg: DistillConfig, data_fingerprint: str, device: torch.device,
                 served: tuple[str, str] | None = None) -> dict[str, Any]:
    """Every setting that decides the rows, by its config key: equal settings, equal rows.

    ``served``: (base URL, model name) of a served teacher, recorded in place of the device
    (the server's hardware answers, not this process's)."""
    tc, dc, gc = cfg.teacher, cfg.data, cfg.generate
    settings = {
        "teacher.name_or_path": _ident(tc.name_or_path), "teacher.revision": tc.revision,
        "teacher.tokenizer": _ident(tc.tokenizer), "teacher.quantization": tc.quantization,
        "teacher.quantization_backend": tc.quantization_backend,
        "device": f"{device.type} ({str(_dtype(device)).removeprefix('torch.')})",
        "data.source": _ident(dc.source), "data.source content": data_fingerprint,
        "data.config_name": dc.config_name, "data.split": dc.split, "data.revision": dc.revision,
        "data.max_examples": dc.max_examples, "data.prompt_field": dc.prompt_field,
        "data.messages_field": dc.messages_field, "data.text_field": dc.text_field,
        "data.chat_template": dc.chat_template,
    }
    if served is not None:
        del settings["device"]
        settings["teacher.server.url"], settings["teacher.server.model"] = served
    settings.update({f"generate.{k}": v for k, v in gc.model_dump().items() if k != "output"})
    return json.loads(json.dumps(settings))  # as it reads back from disk


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def settings_differences(then: dict, now: dict) -> str:
    """'generate.temperature (1.0 then, 0.5 now), ...' for the keys whose values differ."""
    out = []
    for key in [*then, *(k for k in now if k not in then)]:
        old, new = then.get(key, "<unset>"), now.get(key, "<unset>")
        if old == new:
            continue
        if key == "data.source content":
            out.append("data.source content (the data changed)")
        else:
            out.append(f"{key} ({_show(old)} then, {_show(new)} now)")
    return ", ".join(out)


def _read_json(path: Path, what: str, advice: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunDirError(f"{what} {path} cannot be read ({type(err).__name__}): {advice}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{what} {path} is not a JSON object: {advice}")
    return data


def finished_summary(files: OutputFiles, settings: dict) -> dict | None:
    """The summary of a finished output with these settings; None when the output does not exist.

    Refuses an output potstill did not finish (no summary) and one finished with other settings."""
    if not files.out.exists():
        return None
    away = f"move {files.out} away yourself, or choose another generate.output"
    if not files.summary.is_file():
        raise RunDirError(f"generate.output {files.out} exists and was not written by potstill generate (no "
                          f"{files.summary.name} beside it): potstill does not overwrite it; {away}")
    summary = _read_json(files.summary, "the summary", f"potstill cannot tell how {files.out} was made; {away}")
    then = summary.get("settings")
    if not isinstance(then, dict):
        raise RunDirError(f"generate.output {files.out} was finished by an older potstill that did not record its "
                          f"settings, so it cannot be checked against this config: {away}")
    diff = settings_differences(then, settings)
    if diff:
        raise RunDirError(f"generate.output {files.out} is finished, with other settings: {diff}: restore them to "
                          "use it, or choose another generate.output")
    return summary


def check_partial(files: OutputFiles, settings: dict) -> None:
    """Refuse a partial file that is not ours (no settings file) or was made with other settings."""
    if not files.partial.exists():
        return
    if not files.settings.is_file():
        raise RunDirError(f"{files.partial} exists without {files.settings.name} beside it, so it is not a partial "
                          "output of this potstill generate: potstill does not overwrite it; move it away yourself, "
                          "or choose another generate.output")
    then = _read_json(files.settings, "the partial output's settings file",
                      f"move {files.partial.name} and {files.settings.name} away to start over, or choose "
                      "another generate.output")
    diff = settings_differences(then, settings)
    if diff:
        raise RunDirError(f"{files.partial} was made with other settings: {diff}: restore them to continue it, "
                          f"or choose another generate.output (or move {files.partial.name} away to start over)")


# ----------------------------------------------------------------------------------------
# Partial rows


def complete_rows(partial: Path, per_batch: int) -> tuple[list[str], int]:
    """Lines of whole batches (per_batch = batch_size x num_generations lines) already written,
    and their size in bytes: where a torn tail (a stopped write) starts."""
    if not partial.is_file():
        return [], 0
    good: list[tuple[str, int]] = []
    for raw in partial.read_bytes().split(b"\n")[:-1]:  # the last piece is empty or an unterminated tail
        try:
            line = raw.decode("utf-8")
            json.loads(line)
        except ValueError:  # also a multi-byte character cut in half
            break
        good.append((line, len(raw) + 1))
    good = good[: len(good) - len(good) % per_batch]
    return [line for line, _ in good], sum(size for _, size in good)


def open_partial(files: OutputFiles, settings: dict, keep_bytes: int) -> None:
    """Start the partial file (settings first), or cut a stopped one back to its whole batches.

    Cutting (truncate) never loses a whole batch: the file is never rewritten."""
    with disk_errors(f"generate: starting {files.partial}", advice=_advice(files)):
        if not files.partial.exists():
            atomic_write_text(files.settings, json.dumps(settings, indent=2))
            files.partial.touch()
        elif files.partial.stat().st_size > keep_bytes:
            os.truncate(files.partial, keep_bytes)


def append_rows(files: OutputFiles, lines: list[str]) -> None:
    with (disk_errors(f"generate: appending to {files.partial}", advice=_advice(files)),
          open(files.partial, "a", encoding="utf-8") as fh):
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


def publish(files: OutputFiles, records: list[dict], summary: dict) -> None:
    """Summary first, then the final file by rename, then the partial files go.

    A stop between the steps leaves a state the next run finishes from the partial file."""
    with disk_errors(f"generate: writing {files.out}", advice=_advice(files), cleanup=files.temp):
        if files.out.suffix == ".parquet":
            import pandas as pd

            pd.DataFrame(records).to_parquet(files.temp)
        else:
            files.temp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                  encoding="utf-8")
        with open(files.temp, "rb") as fh:
            os.fsync(fh.fileno())
    summary_temp = files.summary.with_name(f".{files.summary.name}.tmp-{os.getpid()}")  # atomic_write_text's
    try:
        with disk_errors(f"generate: writing {files.summary}", advice=_advice(files), cleanup=summary_temp):
            atomic_write_text(files.summary, json.dumps(summary, indent=2))
    except RunDirError:
        files.temp.unlink(missing_ok=True)
        raise
    os.replace(files.temp, files.out)
    files.partial.unlink()
    files.settings.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# The command


def _output_files(cfg: DistillConfig) -> OutputFiles:
    """The output's files, once the settings generate cannot start without are there and agree."""
    if cfg.teacher.name_or_path is None and cfg.teacher.server is None:
        raise ConfigError("generate needs teacher.name_or_path (or teacher.server): the model that answers the "
                          "prompts")
    if cfg.generate.output is None:
        raise ConfigError("generate.output is required: a .jsonl or .parquet file for the teacher's answers")
    out = Path(os.path.expanduser(cfg.generate.output))
    if out.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"generate.output={out}: use a .jsonl or .parquet file name")
    gc = cfg.generate
    if gc.temperature == 0 and gc.num_generations > 1:  # model.generate and vLLM both refuse it, later
        raise ConfigError(f"generate.temperature=0 is greedy decoding, which gives one answer per prompt, not "
                          f"generate.num_generations={gc.num_generations}: set generate.num_generations=1, or a "
                          "temperature above 0 to sample")
    return OutputFiles(out)


def generate(config, *, overrides=(), progress: bool = True) -> dict[str, Any]:
    """Write the teacher's answers to ``generate.output``; returns the summary.

    Cheapest refusals first: the config, the data paths, the lock, the output's state (finished,
    partial), then preflight (model paths, tokenizer, data rows); the teacher loads last (or the
    server is checked). A served teacher without ``teacher.server.model`` is asked its model's
    name before the output's state is checked: the settings record it."""
    from ..data.sources import open_source
    from ..models.preflight import preflight

    cfg: DistillConfig = as_config(config, overrides)
    files = _output_files(cfg)
    refuse_data_paths(files, cfg.data)
    with output_lock(files):
        source = open_source(cfg.data.source, cfg=cfg.data, split=cfg.data.split)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        served = None
        if cfg.teacher.server is not None:
            from ..teachers.served_generation import served_model, server_url

            served = (server_url(cfg.teacher.server), served_model(cfg.teacher.server))
        settings = row_settings(cfg, source.fingerprint, device, served)
        summary = finished_summary(files, settings)
        if summary is not None:
            log.info("generate: %s is complete", files.out)
            if files.settings.is_file():  # ours, left by a stop just after the final rename
                with contextlib.suppress(OSError):
                    files.partial.unlink(missing_ok=True)
                    files.settings.unlink()
            return summary
        check_partial(files, settings)
        # The output is ours to write: now the model paths, the tokenizer and the data rows, still
        # before the teacher loads. The tokenizer renders and counts the prompts.
        tok = preflight(cfg, role="generate").teacher_tokenizer
        return _run(cfg, files, settings, source, device, tok, progress, served)


@torch.no_grad()
def _run(cfg: DistillConfig, files: OutputFiles, settings: dict, source, device: torch.device, tok,
         progress: bool, served: tuple[str, str] | None) -> dict[str, Any]:
    """Render the prompts, continue the partial file, publish: the checks have passed.

    ``served``: (URL, model) of a served teacher, which answers instead of a loaded one."""
    from tqdm.auto import tqdm

    from ..teachers.capture import model_name

    gc, dc = cfg.generate, cfg.data
    use_chat = gc.chat_template and (dc.chat_template is not None or bool(getattr(tok, "chat_template", None)))
    rows = source.rows()
    generation = {"num_generations": gc.num_generations, "temperature": gc.temperature, "top_p": gc.top_p,
                  "top_k": gc.top_k, "max_new_tokens": gc.max_new_tokens, "seed": gc.seed, "chat_template": use_chat}
    name = served[1] if served is not None else model_name(cfg.teacher.name_or_path)
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
    done_lines, keep_bytes = complete_rows(files.partial, gc.batch_size * gc.num_generations)
    start = len(done_lines) // gc.num_generations
    with contextlib.ExitStack() as stack:
        answers = None  # a run stopped while publishing needs no teacher
        if start < len(prompts) and served is not None:  # the server's checks, before anything is written
            from ..teachers.served_generation import ServedGeneration

            server = stack.enter_context(ServedGeneration(cfg, tok, model=served[1], use_chat=use_chat))
            answers = server.batches(prompts[start:], gc.batch_size)
        open_partial(files, settings, keep_bytes)
        if start:
            log.info("generate: continuing after %d of %d prompts", start, len(prompts))
        if start < len(prompts):
            if answers is None:
                from ..models.teacher_model import load_teacher

                teacher, _ = load_teacher(cfg.teacher, dtype=_dtype(device), tokenizer=tok)
                teacher.to(device)
                teacher.eval()
                answers = _local_batches(cfg, teacher, prompts, start, tok, device)
            bar = stack.enter_context(contextlib.closing(tqdm(
                total=len(prompts), initial=start, desc="generate", unit="prompt", disable=not progress,
                dynamic_ncols=True)))
            with StopRequest() as stop:
                _write_batches(cfg, files, prompts, start, answers, generation, name, bar, stop)
    records = [json.loads(line) for line in files.partial.read_text(encoding="utf-8").splitlines()]
    summary = {"output": str(files.out), "rows": len(records), "prompts": len(prompts), "source_rows": len(rows),
               "skipped_too_long": skipped_long, "skipped_no_prompt": skipped_empty,
               "max_prompt_length": gc.max_prompt_length, "teacher": name, "generation": generation,
               "settings": settings}
    publish(files, records, summary)
    log.info("generate: %d rows from %d prompts -> %s; skipped %d prompts over %d tokens, %d without a prompt",
             len(records), len(prompts), files.out, skipped_long, gc.max_prompt_length, skipped_empty)
    return summary


def _local_batches(cfg: DistillConfig, teacher, prompts: list, start: int, tok, device: torch.device):
    """The loaded teacher's answers to prompts[start:], a batch at a time: ``texts[r][j]`` is
    answer j of the batch's prompt r (batched, left padded, KV-cached)."""
    gc = cfg.generate
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
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
        with torch.no_grad():
            generated = teacher.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=sample,
                temperature=gc.temperature if sample else None, top_p=gc.top_p if sample else None,
                top_k=(gc.top_k or 0) if sample else None, max_new_tokens=gc.max_new_tokens,  # 0: no top-k filter
                num_return_sequences=gc.num_generations, pad_token_id=pad, eos_token_id=tok.eos_token_id,
                use_cache=True)
        new = generated[:, width:].cpu()
        n = gc.num_generations
        yield [[tok.decode(new[r * n + j], skip_special_tokens=True) for j in range(n)] for r in range(len(batch))]


def _write_batches(cfg: DistillConfig, files: OutputFiles, prompts: list, start: int, answers, generation: dict,
                   name: str, bar, stop: StopRequest) -> None:
    """Append the rows of prompts[start:], a batch of ``answers`` at a time (each fsynced); stop
    cleanly after a batch when SIGTERM or Ctrl-C asked for it."""
    gc = cfg.generate
    for a, texts in zip(range(start, len(prompts), gc.batch_size), answers):
        batch = prompts[a: a + gc.batch_size]
        lines = []
        for (index, prompt, _), answers_of_prompt in zip(batch, texts):
            for j, text in enumerate(answers_of_prompt):
                lines.append(json.dumps({"prompt": prompt, "completion": text, "teacher": name,
                                         "generation": generation, "prompt_index": index, "sample": j},
                                        ensure_ascii=False))
        append_rows(files, lines)
        bar.update(len(batch))
        if stop.agreed() and a + gc.batch_size < len(prompts):
            done = min(a + gc.batch_size, len(prompts))
            raise stop.stopped(f"after {done} of {len(prompts)} prompts; their rows are kept in {files.partial}: "
                               "run the same command again to continue")
