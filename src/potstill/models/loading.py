"""Load a causal LM or a tokenizer from a hub id, a local folder, or an object the user built.

Everything goes through the real Hugging Face loaders (``AutoModelForCausalLM``,
``AutoTokenizer``), so a hub id works for users with hub access and a local folder works
everywhere. Objects built in Python are accepted as they are.

A local model folder is checked first, cheaply (:func:`check_model_folder`: config.json parses,
weight files exist, every safetensors header is whole and its file as long as the header says),
so a damaged or truncated download is one line naming the file, not a library traceback.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, first_line, one_line

log = logging.getLogger("potstill")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def describe(ref: Any) -> str:
    """A short human name for a model/tokenizer reference (path or object)."""
    if isinstance(ref, str):
        return ref
    name = getattr(ref, "name_or_path", None) or getattr(getattr(ref, "config", None), "_name_or_path", None)
    return f"{type(ref).__name__}({name})" if name else f"<{type(ref).__name__} object>"


def load_tokenizer(ref: Any, *, revision: str | None = None, trust_remote_code: bool = False, role: str):
    """A tokenizer from a hub id / folder, or the object itself."""
    if not isinstance(ref, str):
        if not callable(getattr(ref, "convert_tokens_to_ids", None)):
            raise ModelError(f"{role}.tokenizer is a {type(ref).__name__}, not a transformers tokenizer")
        return ref
    from transformers import AutoTokenizer

    local = Path(ref).expanduser()
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else ref, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise ModelError(tokenizer_folder_problem(local, role, err)) from None
        raise ModelError(
            f"cannot load the {role} tokenizer from '{ref}': not a local folder with tokenizer files and not "
            f"reachable on the hub ({first_line(err)}); set {role}.tokenizer to a folder that has one") from None
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises bare Exceptions on damaged files
        if not local.is_dir():
            raise
        raise ModelError(tokenizer_folder_problem(local, role, err)) from None
    if tok.pad_token_id is None:
        # Padding is only used with masks, so the EOS id is a safe stand-in.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: Any, *, revision: str | None, dtype: torch.dtype | None, trust_remote_code: bool,
                   role: str, meta: bool = False) -> nn.Module:
    """A causal LM from a hub id / local folder, or an ``nn.Module`` passed in.

    ``meta``: build it from its config on the meta device, reading no weights (a process of a
    sharded run whose shards come from the main process: training/sharding.py). Packed BitNet
    exports and objects load as usual."""
    if not isinstance(ref, str):
        if not isinstance(ref, nn.Module):
            raise ModelError(f"{setting(role, 'name_or_path')} must be a hub id, a local folder or an nn.Module, "
                             f"not {type(ref).__name__}")
        return ref
    from transformers import AutoModelForCausalLM

    from .bitnet import is_packed_folder, load_packed, reapply_marker

    local = Path(ref).expanduser()
    if local.is_dir():
        check_model_folder(local, role=role, trust_remote_code=trust_remote_code)
        ref = str(local)
    elif looks_local(ref):
        raise ModelError(missing_folder(ref, role))
    if is_packed_folder(ref):  # `potstill export --bitnet` output
        return load_packed(ref, dtype=dtype)
    if meta:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return reapply_marker(model)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise ModelError(f"cannot load the {model_word(role)} from folder {local} ({one_line(err)}): check "
                             f"that {setting(role, 'name_or_path')} is a causal language model saved with "
                             "save_pretrained, complete and undamaged") from None
        raise ModelError(
            f"cannot load the {model_word(role)} '{ref}': not a local folder with config.json and weights, and not "
            f"reachable on the hub ({first_line(err)}); check {setting(role, 'name_or_path')}") from None
    except Exception as err:  # noqa: BLE001 - damaged weights: safetensors, torch.load and shape errors vary
        if not local.is_dir() or not _is_damage(err):
            raise
        raise ModelError(f"cannot load the {model_word(role)} from folder {local} ({type(err).__name__}: "
                         f"{one_line(err)}): its weight files are damaged or do not match config.json; re-save or "
                         "re-download the model") from None
    return reapply_marker(model)  # a student saved by a BitNet run gets its ternary layers back


def model_word(role: str) -> str:
    """'teacher model', 'student model'; plain 'model' where the role is already 'model' (evaluate)."""
    return "model" if role == "model" else f"{role} model"


def setting(role: str, key: str) -> str:
    """The config key that names a model's ``key``; evaluate's 'model' is an argument, not a key."""
    return "the model argument" if role == "model" else f"{role}.{key}"


def _is_damage(err: BaseException) -> bool:
    """Errors that a damaged or mismatched weight file raises while loading (not potstill bugs)."""
    import pickle

    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"SafetensorError", "HeaderTooLarge", "StrictDataclassError"}) or isinstance(
        err, (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError))


# ----------------------------------------------------------------------------------------
# Cheap checks of a local model folder: no weights are read


CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
_MAX_HEADER = 100 << 20  # safetensors refuses headers over 100 MB


def looks_local(ref: str) -> bool:
    """A reference the user meant as a path (a hub id is ``name`` or ``org/name``)."""
    return ref.startswith(("/", "./", "../", "~", ".\\")) or "\\" in ref or ref.count("/") > 1 or os.path.isabs(ref)


def missing_folder(ref: str, role: str) -> str:
    return (f"cannot load the {model_word(role)} '{ref}': no such folder (working directory {os.getcwd()}); "
            f"check {setting(role, 'name_or_path')}")


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file of a model folder, or one ModelError line naming it."""
    try:
        return json.loads(path.read_bytes())
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ModelError(f"{path} is not UTF-8 text ({err.reason}): the {what} is damaged; re-save or re-download "
                         "the model") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): the {what} "
                         "is damaged; re-save or re-download the model") from None


def read_model_config(folder: Path, *, role: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """``folder/config.json`` as a dict, checked: an object with a model_type transformers knows."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"the {model_word(role)} folder {folder} has no {CONFIG_FILE}: point "
                         f"{setting(role, 'name_or_path')} at the folder that save_pretrained wrote (or re-download "
                         "the model)")
    config = read_json_file(path, f"{model_word(role)}'s config")
    if not isinstance(config, dict):
        raise ModelError(f"{path} holds a JSON {type(config).__name__}, not an object of model settings: the "
                         f"{model_word(role)}'s config is damaged; re-save or re-download the model")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{path} has no model_type: re-save the model with save_pretrained (or add \"model_type\")")
    if not (trust_remote_code and "auto_map" in config) and not known_model_type(model_type):
        import transformers

        raise ModelError(f"{path}: model_type '{model_type}' is not known to transformers {transformers.__version__}: "
                         f"upgrade transformers, or set {role}.trust_remote_code=true if the model ships its own code")
    return config


def known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def check_model_folder(folder: str | os.PathLike, *, role: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Check a local model folder without loading weights; returns its config.json.

    config.json parses and names a known model_type; weight files exist (safetensors, sharded or
    not, else pytorch_model.bin); every safetensors header parses and its file is exactly as long
    as the header says (a cut-short download fails here); a .bin zip has its central directory."""
    folder = Path(folder)
    config = read_model_config(folder, role=role, trust_remote_code=trust_remote_code)
    for path in weight_files(folder, role):
        if path.suffix == ".safetensors":
            check_safetensors(path, role)
        else:
            check_torch_bin(path, role)
    return config


def weight_files(folder: Path, role: str) -> list[Path]:
    """The weight files from_pretrained will read, in the order it prefers them."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (TORCH_BIN_INDEX, TORCH_BIN)):
        index = folder / index_name
        if index.is_file():
            data = read_json_file(index, "weight index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{index} has no weight_map: the {model_word(role)}'s weight index is damaged; "
                                 "re-save or re-download the model")
            shards = [folder / name for name in sorted(set(map(str, weight_map.values())))]
            missing = [p.name for p in shards if not p.is_file()]
            if missing:
                raise ModelError(f"the {model_word(role)} folder {folder} lacks {len(missing)} weight shard(s) that "
                                 f"{index_name} lists ({', '.join(missing[:3])}): finish or repeat the download")
            return shards
        if (folder / single).is_file():
            return [folder / single]
    raise ModelError(f"the {model_word(role)} folder {folder} has no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or "
                     f"{TORCH_BIN}): finish the download, or save the model with save_pretrained")


def check_safetensors(path: Path, role: str) -> None:
    """The header parses and the tensors it lists end exactly where the file does."""
    def damaged(why: str) -> ModelError:
        return ModelError(f"{path} is damaged ({why}): re-save or re-download the {model_word(role)}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise damaged(f"{size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise damaged(f"its header claims {n} bytes of a {size}-byte file")
            header = json.loads(fh.read(n))
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError:  # JSON or UTF-8
        raise damaged("its header is not valid JSON") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise damaged("its header does not list tensors") from None
    if 8 + n + end != size:
        what = "cut short" if size < 8 + n + end else "longer than its header says"
        raise damaged(f"{size} bytes where its header describes {8 + n + end}: {what}")


def check_torch_bin(path: Path, role: str) -> None:
    """A zip-format torch checkpoint whose central directory (at its end) is readable."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic[:2] != b"PK":
            return  # the legacy (pre-zip) torch format: nothing cheap to check
        with zipfile.ZipFile(path):
            pass
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror or err}") from None
    except zipfile.BadZipFile as err:
        raise ModelError(f"{path} is damaged ({err}: cut short?): re-save or re-download the "
                         f"{model_word(role)}") from None


def tokenizer_folder_problem(folder: Path, role: str, err: BaseException) -> str:
    """The one line for a local folder whose tokenizer does not load."""
    if (folder / CONFIG_FILE).is_file():  # AutoTokenizer reads the model's config.json too: name it if it is broken
        read_json_file(folder / CONFIG_FILE, f"{model_word(role)}'s config")
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    present = [n for n in names if (folder / n).is_file()]
    if not present:
        return (f"the {role} tokenizer folder {folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                f"...): set {role}.tokenizer to a folder or hub id that has them")
    return (f"cannot load the {role} tokenizer from folder {folder} ({type(err).__name__}: {one_line(err, 200)}): "
            f"its files ({', '.join(present)}) are damaged or incomplete; re-save or re-download it, or set "
            f"{role}.tokenizer")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never trains and never builds an autograd graph."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_attention(model: nn.Module, implementation: str | None, role: str) -> nn.Module:
    """``{role}.attn_implementation``: the model's attention kernel (sdpa, eager, flash_attention_2,
    ...), set on the built model (``set_attn_implementation``) so that it applies to every way a
    model is made here: loaded, built from a config, cut or pruned from the teacher, or passed in.
    A kernel whose package or device is missing is one line."""
    if implementation is None:
        return model
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ModelError(f"{role}.attn_implementation: {type(model).__name__} is not a transformers model, whose "
                         "attention kernel can be chosen; remove the setting")
    try:
        setter(implementation)
    except (ImportError, ValueError) as err:
        raise ModelError(f"{role}.attn_implementation={implementation} is not usable here ({one_line(err)}): "
                         "use sdpa or eager, or install the kernel's package on a machine that supports it") from None
    return model
