"""Stage 2 of the LLaVA pipeline: LLaVA jsonl -> H5 files (Cerebras layout), H5 shuffling, and the H5 reader.

Writer (tokenizes LLaVA records into `data` [n, 4, MSL] int32 rows + `img_path` [n, 1] bytes, and writes
`data_params.json` with `image_patch_info.image_patch_start_idx`):

    python create_hdf5_dataset.py LlavaPhaseOne --params configs/llava_phase_1_preproc.yaml
    python create_hdf5_dataset.py LlavaPhaseTwo --params configs/llava_phase_2_preproc.yaml \
        --input_dir data/mix665k_jsonl --output_dir data/llava_phase_2_h5 --processes 0

Command-line values override the yaml only when given. `--overwrite` replaces an existing output directory's
H5 files; `--resume_from_checkpoint True` continues an interrupted run (same settings) without duplicates.

Shuffle (multimodal: `img_path` rows move with their `data` rows; deterministic for a seed, independent of the
number of workers; waits for its workers):

    python create_hdf5_dataset.py shuffle INPUT_DIR OUTPUT_DIR --num_chunks 16 --num_workers 2 --seed 0

Reader (used by run.py): `LlavaH5Dataset`, `ResumableSampler`, `build_transforms`; sequence packing:
`pack_index` (cached row lengths), `plan_rows`, `PackedRowSampler`, `PackedDataset`, `pack_row`.

Token layouts (spec 2.6/2.7), with the fixes of spec 8 items 7-13:
  phase 1: [BOS] [pad x NP] caption EOS (caption EOS ...)           image slots start at 1
  phase 2: SYSTEM USER: "▁" [pad x NP] text ASSISTANT: answer EOS (USER: text ASSISTANT: answer EOS ...)
           image slots start at len(SYSTEM) + len(USER:) + 1 = 35 for vicuna_v1 with the Llama-2 tokenizer.
  rows: input_ids = ids[:-1], labels = ids[1:], loss_mask[t] = 1 when labels[t] is an answer token or an
  assistant EOS, key_padding_mask = 1 where a key must not be attended (padding; image slots of text-only rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import gzip
import itertools
import json
import os
import re
import sys
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

# Heavy imports (torch, transformers, h5py, PIL) happen inside the functions that need them. The reader classes
# subclass torch types, so they are created lazily through module __getattr__ (see the end of the file).

# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------

VICUNA_V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# dataset.system_prompt_style -> (system prompt, default user prefix, default assistant prefix).
# System texts are Cerebras' SYSTEM_PROMPT_REGISTRY (spec 2.4). Cerebras takes the prefixes from the yaml keys
# prompt_prefix / completion_prefix; here they default per style and those yaml keys still win when set.
# Adding a style is one row.
PROMPT_STYLES: dict[str, tuple[str, str, str]] = {
    "vicuna_v1": (VICUNA_V1_SYSTEM, "USER:", "ASSISTANT:"),
    "vicuna_v0": (VICUNA_V0_SYSTEM, "USER:", "ASSISTANT:"),
    "llava_v0": (VICUNA_V0_SYSTEM, "USER:", "ASSISTANT:"),
    "llava_v1": (VICUNA_V0_SYSTEM, "USER:", "ASSISTANT:"),
    "llava_plain": ("", "", ""),  # no system text and no role prefixes: BOS, image, text, answer
    "zephyr": ("<|system|>\n</s>", "USER:", "ASSISTANT:"),
    "mistral_instruct": ("", "USER:", "ASSISTANT:"),
}

# dataset.system_prompt_style values that lay phase 2 out with a Jinja chat template instead of a PROMPT_STYLES row.
# "chat_template" uses the tokenizer's own (tokenizer_config.json `chat_template`); the short names use the family's
# template below, for tokenizers that ship none. These are our own minimal renderings of each family's documented
# format (strings only, no tools): Llama-3 headers and <|eot_id|>; ChatML with Qwen2's default system prompt;
# Mistral [INST] ... [/INST] answer</s>.
CHAT_TEMPLATES: dict[str, str] = {
    "llama3": ("{{- bos_token -}}"
               "{%- for message in messages -%}"
               "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
               " + '<|eot_id|>' -}}"
               "{%- endfor -%}"
               "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
               "{%- endif -%}"),
    "qwen2": ("{%- if messages[0]['role'] != 'system' -%}"
              "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
              "{%- endif -%}"
              "{%- for message in messages -%}"
              "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
              "{%- endfor -%}"
              "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "mistral": ("{{- bos_token -}}"
                "{%- for message in messages -%}"
                "{%- if message['role'] == 'user' -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
                "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
                "{%- endif -%}"
                "{%- endfor -%}"),
}
CHAT_TEMPLATE_STYLES = ("chat_template", *CHAT_TEMPLATES)

# `from` value of a conversation turn -> role. A "system" turn is only accepted as the first turn.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Why a record was skipped (counted per reason in data_params.json `post-process` and on the console).
SKIP_REASONS = {
    "malformed_json": "the line is not valid JSON",
    "undecodable_text": "the line is not valid UTF-8 (e.g. a stray 0xFF byte)",
    "not_an_object": "the record is not a JSON object",
    "no_conversations": "the conversation key is missing, empty or not a list",
    "bad_turn": "a turn is not an object with `from` and the content key",
    "non_string_value": "a turn's `from`/content or the image path is not a string",
    "unknown_role": "a turn's `from` is not one of human/user, gpt/assistant, system (first turn only)",
    "not_alternating": "turns do not alternate user, assistant, ... ending with an assistant turn",
    "invalid_unicode": "a text holds a lone surrogate (e.g. a broken \\ud83d escape) and cannot be encoded",
    "image_outside_root": "the image path is absolute or escapes dataset.image_dir with ../",
    "missing_image": "the image file does not exist under dataset.image_dir",
    "unreadable_image": "the image file is not an image PIL can open (dataset.check_images: true)",
    "too_long": "even the first turn does not fit in max_seq_length",
    "template_error": "the chat template raised an error for the record (e.g. it refuses its roles)",
    "template_mismatch": "the chat template rendered the record's text differently from its turns (changed text, "
                         "or a different text before the image)",
    "tokenization_mismatch": "a turn boundary falls inside a token of the template's full tokenization, so the "
                             "per-turn pieces would not concatenate to it (never trained with shifted labels)",
}

PROCESSORS = {"LlavaPhaseOne": "LlavaPhaseOnePreprocessor", "LlavaPhaseTwo": "LlavaPhaseTwoPreprocessor"}

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")

RECORDS_PER_BLOCK = 256  # records are dealt to processes in blocks of this many (fixed, so output sets match)
# Phase-2 texts of at most MEMO_CHARS characters are tokenized once per MEMO_TEXTS distinct ones: questions and
# short answers repeat across mix665k records (the benchmark's 134k texts hold 61k distinct ones), long answers not.
MEMO_CHARS = 200
MEMO_TEXTS = 100_000
FLUSH_ROWS = 64  # rows written to h5 per call (measured fastest for gzip chunks of (1, 4, 2048))
H5_FEATURES = ("input_ids", "loss_mask", "labels", "key_padding_mask")

# --------------------------------------------------------------------------------------------------------------
# Configuration (spec 2.2): three yaml sections parsed into dataclasses
# --------------------------------------------------------------------------------------------------------------

# Alternative spellings users copy from the seed document: alternative -> canonical.
SECTION_SPELLINGS = {"processor": "processing"}
KEY_SPELLINGS = {"processing": {"max_sequence_length": "max_seq_length"}}


@dataclasses.dataclass
class SetupConfig:
    input_dir: str | None = None  # folder searched recursively for *.jsonl, *.jsonl.gz, *.json
    metadata_files: str | list | None = None  # instead of input_dir: text file(s) listing input files, one a line
    output_dir: str | None = None  # where examples_<k>_<proc>.h5 and data_params.json go
    processes: int = 1  # worker processes; 0 = all cores
    dataset_processor: str | None = None  # LlavaPhaseOnePreprocessor | LlavaPhaseTwoPreprocessor (set by the mode)
    module: str | None = None  # Cerebras key, no effect here


@dataclasses.dataclass
class ProcessingConfig:
    tokenizer_type: str = "HuggingFaceTokenizer"  # only HuggingFaceTokenizer is supported
    huggingface_tokenizer: str | None = None  # local folder of a Llama-family HF tokenizer (no downloads)
    eos_id: int | None = None  # overrides the tokenizer's EOS id (and then pad_id too)
    pad_id: int | None = None  # overrides the pad id (default: tokenizer pad, else EOS); fills the image slots
    max_seq_length: int = 2048  # MSL: row length
    output_name: str = "examples"  # file prefix: <output_name>_<k>_<proc>.h5
    files_per_record: int = 10000  # samples per H5 file
    write_remainder: bool = True  # write the last, partly filled file of each process
    resume_from_checkpoint: bool = False  # continue an interrupted run in output_dir
    display_pbar: bool = True  # progress bar (also --no_progress)
    seed: int = 0  # Cerebras key; preprocessing is deterministic and does not use it
    # Cerebras keys accepted for compatibility, no effect here:
    vocab_file: str | None = None
    encoder_file: str | None = None
    split_text_to_tokenize: bool = False
    chunk_len_to_split: int = 2000
    remove_bos_in_chunks: bool = False
    short_seq_prob: float = 0.0
    write_in_batch: bool = True
    auth_token: str | None = None


@dataclasses.dataclass
class DatasetConfig:
    use_ftfy: bool = True  # clean texts with ftfy.fix_text (falls back to unicodedata NFC when ftfy is absent)
    ftfy_normalizer: str = "NFC"  # unicode normalisation passed to ftfy
    multi_turn_key: str = "conversations"  # record key holding the turns
    multi_turn_content_key: str = "value"  # turn key holding the text
    image_key: str = "image"  # record key holding the image path relative to image_dir
    image_token: str = "<image>"  # removed from the text; the image goes to the fixed slots
    image_dir: str | None = None  # root of all images; every image path must exist below it
    check_images: bool = False  # open every image's header once; unreadable ones are skipped (not Cerebras')
    num_patches: int = 576  # NP: image slots per sample ((336/14)^2)
    system_prompt_style: str = "vicuna_v1"  # phase 2: key of PROMPT_STYLES, or of CHAT_TEMPLATE_STYLES
    prompt_prefix: str | None = None  # phase 2 user prefix (default from the style; PROMPT_STYLES only)
    completion_prefix: str | None = None  # phase 2 assistant prefix (default from the style; PROMPT_STYLES only)
    multi_modal_non_image_ex_key: str | None = None  # Cerebras' text-only marker key ("model"); not required here
    input_ids_dtype: str = "int32"  # only int32
    input_mask_dtype: str = "int32"  # only int32
    inverted_mask: bool = False  # only False
    # Cerebras keys accepted for compatibility, no effect here:
    wikitext_detokenize: bool = False
    jsonl_key: str | None = None
    min_sequence_len: int | None = None
    prompt_key: str | None = None
    completion_key: str | None = None
    sep_token: str | None = None
    eos_after_prompt: bool = False


SECTIONS = {"setup": SetupConfig, "processing": ProcessingConfig, "dataset": DatasetConfig}
IGNORED_KEYS = {
    "setup": ["module"],
    "processing": ["vocab_file", "encoder_file", "split_text_to_tokenize", "chunk_len_to_split",
                   "remove_bos_in_chunks", "short_seq_prob", "write_in_batch", "auth_token", "seed"],
    "dataset": ["wikitext_detokenize", "jsonl_key", "min_sequence_len", "prompt_key", "completion_key",
                "sep_token", "eos_after_prompt"],
}

# Command-line overrides: option -> (section, key). Each wins only when given.
CLI_OVERRIDES = {
    "input_dir": ("setup", "input_dir"), "metadata_files": ("setup", "metadata_files"),
    "output_dir": ("setup", "output_dir"), "processes": ("setup", "processes"),
    "huggingface_tokenizer": ("processing", "huggingface_tokenizer"), "eos_id": ("processing", "eos_id"),
    "pad_id": ("processing", "pad_id"), "max_seq_length": ("processing", "max_seq_length"),
    "output_name": ("processing", "output_name"), "files_per_record": ("processing", "files_per_record"),
    "write_remainder": ("processing", "write_remainder"),
    "resume_from_checkpoint": ("processing", "resume_from_checkpoint"),
    "use_ftfy": ("dataset", "use_ftfy"), "image_dir": ("dataset", "image_dir"),
    "num_patches": ("dataset", "num_patches"), "system_prompt_style": ("dataset", "system_prompt_style"),
    "prompt_prefix": ("dataset", "prompt_prefix"), "completion_prefix": ("dataset", "completion_prefix"),
}


@dataclasses.dataclass
class PreprocConfig:
    setup: SetupConfig
    processing: ProcessingConfig
    dataset: DatasetConfig
    source: str = "<dict>"  # where the params came from (for messages)
    spelled: dict = dataclasses.field(default_factory=dict)  # canonical "section.key" -> name as written

    def name(self, section: str, key: str) -> str:
        """The key as the user wrote it, for error messages."""
        canon = f"{section}.{key}"
        written = self.spelled.get(canon, canon)
        return canon if written == canon else f"{canon} (written as {written})"

    def to_dict(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


class ConfigError(ValueError):
    """A problem with the preprocessing yaml or command line; the message says what to change."""


class YamlFileError(ValueError):
    """A yaml file that does not parse (or is not a mapping): `file:line:column: what yaml says`. CLIs exit 2."""


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """safe_load a config file whose top level must be a mapping (empty file: {}); FileNotFoundError passes on.

    Syntax errors and refused tags (e.g. !!python/object/apply, which safe_load never constructs) become a
    YamlFileError naming the file, line and column."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise YamlFileError(f"{where}: {problem} ({what} is not valid yaml; fix it there)") from None
    except UnicodeDecodeError as e:
        raise YamlFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save {what} as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise YamlFileError(f"{path}:1:1: the top level of {what} must be a mapping of sections, found a "
                            f"{type(data).__name__}")
    return data


def _canonical_sections(raw: dict, source: str) -> tuple[dict, dict]:
    """Map alternative spellings to canonical names; return (sections, canonical name -> written name)."""
    sections: dict[str, dict] = {}
    spelled: dict[str, str] = {}
    for sec_name, body in raw.items():
        canon_sec = SECTION_SPELLINGS.get(sec_name, sec_name)
        if canon_sec not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {sec_name!r}; valid sections: {sorted(SECTIONS)}"
                              f" (or 'processor' for 'processing')")
        if canon_sec in sections:
            raise ConfigError(f"{source}: both 'processing' and 'processor' sections are present; keep one")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {sec_name!r} must be a mapping, found {type(body).__name__}")
        out: dict[str, Any] = {}
        for key, value in body.items():
            canon_key = KEY_SPELLINGS.get(canon_sec, {}).get(key, key)
            if canon_key in out:
                raise ConfigError(f"{source}: {sec_name}.{key} and {sec_name}.{canon_key} are both set "
                                  f"(two spellings of one key); keep one")
            out[canon_key] = value
            spelled[f"{canon_sec}.{canon_key}"] = f"{sec_name}.{key}"
        sections[canon_sec] = out
    return sections, spelled


def _unknown_key_error(source: str, section: str, key: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown key {section}.{key}.{hint} Valid keys of {section!r}: {', '.join(valid)}")


def parse_config(raw: dict, source: str = "<dict>", overrides: dict | None = None) -> PreprocConfig:
    """Parse a preprocessing params dict (yaml) plus command-line overrides {option: value} into dataclasses."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with setup/processing/dataset sections")
    sections, spelled = _canonical_sections(raw, source)
    for opt, value in (overrides or {}).items():
        if value is None:
            continue
        sec, key = CLI_OVERRIDES[opt]
        sections.setdefault(sec, {})[key] = value
        spelled[f"{sec}.{key}"] = f"--{opt}"
    built = {}
    for sec, cls in SECTIONS.items():
        body = sections.get(sec, {})
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in body:
            if key not in valid:
                raise _unknown_key_error(source, sec, key)
        built[sec] = cls(**body)
    cfg = PreprocConfig(built["setup"], built["processing"], built["dataset"], source, spelled)
    _check_config_values(cfg)
    return cfg


def _as_bool(cfg: PreprocConfig, sec: str, key: str) -> None:
    obj = getattr(cfg, sec)
    value = getattr(obj, key)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"{cfg.source}: {cfg.name(sec, key)} must be true or false, found {value!r}")
    setattr(obj, key, value)


def _as_int(cfg: PreprocConfig, sec: str, key: str, minimum: int | None, allow_none: bool = False) -> None:
    obj = getattr(cfg, sec)
    value = getattr(obj, key)
    if value is None and allow_none:
        return
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = f"an integer >= {minimum}" if minimum is not None else "an integer"
        raise ConfigError(f"{cfg.source}: {cfg.name(sec, key)} must be {need}, found {value!r}")
    setattr(obj, key, value)


def _check_config_values(cfg: PreprocConfig) -> None:
    for sec, key in [("processing", "write_remainder"), ("processing", "resume_from_checkpoint"),
                     ("processing", "display_pbar"), ("dataset", "use_ftfy"), ("dataset", "inverted_mask"),
                     ("dataset", "check_images")]:
        _as_bool(cfg, sec, key)
    _as_int(cfg, "setup", "processes", 0)
    _as_int(cfg, "processing", "max_seq_length", 2)
    _as_int(cfg, "processing", "files_per_record", 1)
    _as_int(cfg, "processing", "eos_id", 0, allow_none=True)
    _as_int(cfg, "processing", "pad_id", 0, allow_none=True)
    _as_int(cfg, "dataset", "num_patches", 1)
    if cfg.processing.tokenizer_type != "HuggingFaceTokenizer":
        raise ConfigError(f"{cfg.source}: {cfg.name('processing', 'tokenizer_type')} must be "
                          f"'HuggingFaceTokenizer', found {cfg.processing.tokenizer_type!r}")
    style = cfg.dataset.system_prompt_style
    if style not in PROMPT_STYLES and style not in CHAT_TEMPLATE_STYLES:
        raise ConfigError(f"{cfg.source}: {cfg.name('dataset', 'system_prompt_style')} is {style!r}; valid "
                          f"styles: {', '.join(PROMPT_STYLES)}, and with a chat template: "
                          f"{', '.join(CHAT_TEMPLATE_STYLES)}")
    for key in ("prompt_prefix", "completion_prefix"):
        if style in CHAT_TEMPLATE_STYLES and getattr(cfg.dataset, key) is not None:
            raise ConfigError(f"{cfg.source}: {cfg.name('dataset', key)} only applies to the PROMPT_STYLES "
                              f"layouts; with system_prompt_style {style!r} the chat template writes the role "
                              f"headers: remove {key}")
    for key in ("input_ids_dtype", "input_mask_dtype"):
        if getattr(cfg.dataset, key) != "int32":
            raise ConfigError(f"{cfg.source}: {cfg.name('dataset', key)} must be 'int32' (the Cerebras H5 "
                              f"layout), found {getattr(cfg.dataset, key)!r}")
    if cfg.dataset.inverted_mask:
        raise ConfigError(f"{cfg.source}: {cfg.name('dataset', 'inverted_mask')} = true is not supported; "
                          f"remove it or set it to false")
    for key in ("image_token", "multi_turn_key", "multi_turn_content_key", "image_key"):
        if not isinstance(getattr(cfg.dataset, key), str) or not getattr(cfg.dataset, key):
            raise ConfigError(f"{cfg.source}: {cfg.name('dataset', key)} must be a non-empty string")


def load_config(params: str | os.PathLike, mode: str, overrides: dict | None = None) -> PreprocConfig:
    """Read the preprocessing yaml, apply overrides, and check that it fits the mode (LlavaPhaseOne/Two)."""
    path = Path(params)
    if not path.is_file():
        raise ConfigError(f"--params {str(path)!r}: file not found")
    raw = read_yaml_mapping(path, "--params")
    cfg = parse_config(raw, str(path), overrides)
    wanted = PROCESSORS[mode]
    given = cfg.setup.dataset_processor
    if given is not None and given != wanted:
        raise ConfigError(f"{path}: setup.dataset_processor is {given!r} but the command asks for {mode} "
                          f"({wanted}); use the matching yaml or mode")
    cfg.setup.dataset_processor = wanted
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and token layout
# --------------------------------------------------------------------------------------------------------------



_TOKENIZERS: dict[tuple[int, str], Any] = {}  # (pid, folder) -> tokenizer: loading takes ~1 s (slow->fast)


def load_tokenizer(folder: str | os.PathLike | None, key_name: str = "processing.huggingface_tokenizer"):
    """Load a Llama-family HF tokenizer from a local folder (never downloads); cached per process."""
    key = (os.getpid(), str(Path(folder).resolve()) if folder is not None else "")
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_tokenizer(folder, key_name)
    return _TOKENIZERS[key]


def _load_tokenizer(folder: str | os.PathLike | None, key_name: str):
    path = _tokenizer_folder(folder, key_name)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the message is what matters
        raise ConfigError(f"{key_name}: cannot load a tokenizer from {str(path)!r}: {e}") from e
    if tok.eos_token_id is None:
        raise ConfigError(f"{key_name}: the tokenizer in {str(path)!r} has no EOS token")
    return tok


def _tokenizer_folder(folder: str | os.PathLike | None, key_name: str) -> Path:
    if folder is None:
        raise ConfigError(f"{key_name} is not set: give the local folder of a Hugging Face tokenizer "
                          f"(tokenizer.json and/or tokenizer.model, tokenizer_config.json)")
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{key_name}: tokenizer folder {str(path)!r} (absolute: {path.resolve()}) not found. "
                          f"Download the tokenizer files (e.g. from lmsys/vicuna-7b-v1.5) into a local folder "
                          f"and point {key_name} at it; nothing is downloaded at run time.")
    return path


# The writer's tokenizer comes from a cache. AutoTokenizer costs 2-4 s per start: transformers imports torch, and a
# Llama-2 folder whose tokenizer_config.json sets add_prefix_space rebuilds the fast tokenizer from tokenizer.model
# at every load. The writer only needs the Rust tokenizer and a few ids, so the first load saves them in one JSON
# file, <cache>/<folder hash>-<content hash>.json; later starts read it in ~0.2 s without transformers.
# The content hash covers every file of the folder but weights, and the transformers / tokenizers versions (they
# decide the rebuilt tokenizer), so an edited file means a new entry; the older entry of that folder is removed.
TOKENIZER_CACHE_ENV = "LLAVA_TOKENIZER_CACHE"  # cache folder; "off" loads with transformers every time
TOKENIZER_CACHE_FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")


def tokenizer_cache_dir() -> Path | None:
    """$LLAVA_TOKENIZER_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/llava-pipeline/tokenizers; None when "off"."""
    value = os.environ.get(TOKENIZER_CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llava-pipeline" / "tokenizers"


def tokenizer_cache_entry(cache: Path, folder: Path) -> Path:
    import hashlib
    from importlib import metadata

    versions = []
    for pkg in ("transformers", "tokenizers"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} none")
    content = hashlib.sha256(f"format {TOKENIZER_CACHE_FORMAT}; {'; '.join(versions)}".encode())
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES):
            content.update(p.name.encode("utf-8") + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    where = hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:16]
    return cache / f"{where}-{content.hexdigest()[:32]}.json"


class WriterTokenizer:
    """The part of a Hugging Face fast tokenizer the writer uses: the Rust tokenizer (`_tokenizer`, which
    make_encoder reads), special ids, vocabulary size and added tokens. Chat templates are rendered by the full
    tokenizer, loaded on first use."""

    def __init__(self, rust, meta: dict, folder: str):
        self._tokenizer, self.meta, self.folder = rust, meta, folder
        self.eos_token_id, self.bos_token_id = meta["eos_token_id"], meta["bos_token_id"]
        self.pad_token_id, self.unk_token_id = meta["pad_token_id"], meta["unk_token_id"]
        self.chat_template = meta["chat_template"]

    def __len__(self) -> int:
        return self.meta["len"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def convert_tokens_to_ids(self, token: str) -> int | None:
        i = self._tokenizer.token_to_id(token)
        return self.unk_token_id if i is None else i

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self.meta["added_vocab"])

    def apply_chat_template(self, *args, **kwargs):
        return load_tokenizer(self.folder).apply_chat_template(*args, **kwargs)


def writer_meta(tok) -> dict:
    """What WriterTokenizer keeps of a loaded Hugging Face tokenizer besides the Rust tokenizer."""
    return {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id, "len": len(tok), "added_vocab": tok.get_added_vocab(),
            "chat_template": tok.chat_template}


def load_writer_tokenizer(folder: str | os.PathLike | None, key_name: str = "processing.huggingface_tokenizer"):
    """The writer's tokenizer: a WriterTokenizer from the cache (written on the first load), or the Hugging Face
    tokenizer itself when it has no Rust tokenizer. Cached per process."""
    key = (os.getpid(), "writer", str(Path(folder).resolve()) if folder is not None else "")
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_writer_tokenizer(folder, key_name)
    return _TOKENIZERS[key]


def _load_writer_tokenizer(folder: str | os.PathLike | None, key_name: str):
    path = _tokenizer_folder(folder, key_name)
    cache, entry = tokenizer_cache_dir(), None
    if cache is not None:
        try:
            entry = tokenizer_cache_entry(cache, path)
        except OSError:
            entry = None  # an unreadable file: the plain load below names it
    if entry is not None and entry.is_file():
        tok = _read_cache_entry(entry, str(path))
        if tok is not None:
            return tok
    tok = load_tokenizer(path, key_name)
    rust = getattr(tok, "_tokenizer", None)
    if rust is None:
        return tok
    meta = writer_meta(tok)
    if entry is not None:
        _write_cache_entry(entry, rust.to_str(), meta)
    return WriterTokenizer(rust, meta, str(path))


def _read_cache_entry(entry: Path, folder: str) -> WriterTokenizer | None:
    """None when the entry cannot be used (e.g. written by another tokenizers version); it is then rewritten."""
    try:
        from tokenizers import Tokenizer

        data = json.loads(entry.read_bytes())
        if data.get("format") != TOKENIZER_CACHE_FORMAT:
            return None
        return WriterTokenizer(Tokenizer.from_str(data["tokenizer"]), data["meta"], folder)
    except Exception:  # noqa: BLE001 - any unreadable entry means: load the tokenizer the normal way
        return None


def _write_cache_entry(entry: Path, rust_json: str, meta: dict) -> None:
    """Written under a temporary name and renamed, so a reader never sees half an entry; an unwritable cache folder
    is skipped silently (the run just loads the tokenizer the normal way next time too)."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": TOKENIZER_CACHE_FORMAT, "meta": meta, "tokenizer": rust_json}),
                       encoding="utf-8")
        os.replace(tmp, entry)
        where = entry.name.split("-")[0]
        for old in entry.parent.glob(f"{where}-*.json"):
            if old != entry:
                old.unlink(missing_ok=True)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def make_encoder(tok) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoder without special tokens; uses the Rust tokenizer directly when available (2x faster)."""
    rust = getattr(tok, "_tokenizer", None)
    if rust is not None:
        fn = getattr(rust, "encode_batch_fast", None) or rust.encode_batch
        return lambda texts: [e.ids for e in fn(texts, add_special_tokens=False)] if texts else []
    return lambda texts: tok(texts, add_special_tokens=False)["input_ids"] if texts else []


class TokenLayout:
    """Constant parts of a phase's token layout, computed once from the tokenizer and config.

    A sample's token stream is `prefix + suffix`. The prefix (BOS / system / user prefix / "▁" / image slots) is
    the same for every sample with (v=1) or without (v=0) an image; the suffix holds the turns. `templates[v]` is
    a [4, MSL] row already holding the prefix and the padding, so a sample only writes its suffix.
    """

    def __init__(self, tok, cfg: PreprocConfig, phase: int):
        self.phase = phase
        encode = make_encoder(tok)
        self.encode = encode
        self.memo: dict[str, list[int]] = {}  # short text -> ids (encode_repeated)
        self.msl = cfg.processing.max_seq_length
        self.np_slots = cfg.dataset.num_patches
        self.eos_id = cfg.processing.eos_id if cfg.processing.eos_id is not None else tok.eos_token_id
        if cfg.processing.pad_id is not None:
            self.pad_id = cfg.processing.pad_id
        elif cfg.processing.eos_id is not None:  # Cerebras: setting eos_id also sets pad_id
            self.pad_id = cfg.processing.eos_id
        else:
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)
        with_special = tok.encode("a")
        self.bos = [with_special[0]] if tok.bos_token_id is not None and with_special[0] == tok.bos_token_id else []
        self.chat = None  # ChatTurns when phase 2 follows a chat template
        slots = [self.pad_id] * self.np_slots
        if phase == 1:
            pre_ids, pre_att = self.bos + slots, [[1] * len(self.bos) + [v] * self.np_slots for v in (0, 1)]
            self.image_start_idx = len(self.bos)
            self.text_only_mask_start = self.image_start_idx
        elif cfg.dataset.system_prompt_style in CHAT_TEMPLATE_STYLES:
            self.chat = ChatTurns(tok, cfg, encode)
            self.eos_id = self.chat.end_of_turn_id
            if cfg.processing.pad_id is None:
                self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
            slots = [self.pad_id] * self.np_slots
            head = self.chat.prefix_ids
            pre_ids = head + slots
            pre_att = [[1] * len(head) + [v] * self.np_slots for v in (0, 1)]
            self.image_start_idx = self.text_only_mask_start = len(head)
        else:
            system, user, assistant = PROMPT_STYLES[cfg.dataset.system_prompt_style]
            user = cfg.dataset.prompt_prefix if cfg.dataset.prompt_prefix is not None else user
            assistant = cfg.dataset.completion_prefix if cfg.dataset.completion_prefix is not None else assistant
            self.system_ids = self.bos + encode([system])[0]
            self.user_ids = encode([user])[0]
            self.assistant_ids = encode([assistant])[0]
            self.space_id = tok.convert_tokens_to_ids("▁")
            if self.space_id is None or self.space_id == tok.unk_token_id:
                raise ConfigError(f"the tokenizer has no '▁' piece, which the {cfg.dataset.system_prompt_style} "
                                  f"layout puts before the image slots (it is made for SentencePiece Llama-2 / "
                                  f"Vicuna / Mistral tokenizers); for Llama-3, Qwen and other byte-level BPE "
                                  f"tokenizers set dataset.system_prompt_style: chat_template (the tokenizer's "
                                  f"own template) or one of {', '.join(CHAT_TEMPLATES)}")
            head = self.system_ids + self.user_ids
            pre_ids = head + [self.space_id] + slots
            pre_att = [[1] * len(head) + [v] * (1 + self.np_slots) for v in (0, 1)]
            self.image_start_idx = len(head) + 1
            self.text_only_mask_start = len(head)
        self.prefix_len = len(pre_ids)
        # suffix tokens of a sample occupy ids[prefix_len : prefix_len + n]; input_ids drops the last id
        self.max_suffix = self.msl + 1 - self.prefix_len
        if self.max_suffix < 2:
            raise ConfigError(f"max_seq_length {self.msl} leaves no room for text after the {self.prefix_len} "
                              f"prefix tokens (system prompt, image slots); raise max_seq_length")
        self.templates = [self._template(pre_ids, pre_att[v]) for v in (0, 1)]

    def _template(self, ids: list[int], att: list[int]) -> np.ndarray:
        msl, p = self.msl, self.prefix_len
        row = np.empty((4, msl), dtype=np.int32)
        row[0] = self.pad_id
        row[1] = 0
        row[2] = self.pad_id
        row[3] = 1
        row[0, :p] = ids
        row[2, :p - 1] = ids[1:]
        row[3, :p] = 1 - np.asarray(att, dtype=np.int32)
        return row

    def build_turns(self, turns: list[tuple[list[int], list[int]]], has_image: bool
                    ) -> list[tuple[list[int], list[int]]]:
        """Per turn (prompt ids, answer ids) -> (suffix ids, target flags) segments (not yet length-checked)."""
        eos = self.eos_id
        segs = []
        for i, (p_ids, a_ids) in enumerate(turns):
            if self.phase == 1:  # the prompt is discarded (caption-only); every caption token is a target
                ids = a_ids + [eos]
                tgt = [1] * len(ids)
                if i == 0 and not has_image:
                    tgt[0] = 0  # it would be predicted from a masked image slot (and never from BOS: bug 8)
            else:
                head = (p_ids if i == 0 else self.user_ids + p_ids) + self.assistant_ids
                ids = head + a_ids + [eos]
                tgt = [0] * len(head) + [1] * (len(a_ids) + 1)
            segs.append((ids, tgt))
        return segs

    def block_segments(self, docs: list) -> list[tuple[str | None, list | None]]:
        """Per parsed record (image, [(user, answer)]) or None: (skip reason, None) or (None, turn segments).
        The texts of a whole block are tokenized in one batch."""
        if self.chat is not None:
            return self.chat.block_segments(docs)
        texts = [t for doc in docs if doc is not None for user, answer in doc[1]
                 for t in ((user, answer) if self.phase == 2 else (answer,))]
        tokens = iter(self.encode_repeated(texts) if self.phase == 2 else self.encode(texts))
        out = []
        for doc in docs:
            if doc is None:
                out.append((None, None))
                continue
            turns = [((next(tokens) if self.phase == 2 else []), next(tokens)) for _ in doc[1]]
            out.append((None, self.build_turns(turns, doc[0] is not None)))
        return out

    def encode_repeated(self, texts: list[str]) -> list[list[int]]:
        """self.encode for texts that repeat (phase-2 questions and short answers): each text is tokenized on its
        own, so its ids do not depend on the batch, and short ones are kept for the next blocks. The lists are
        shared: callers must not modify them."""
        memo = self.memo
        if len(memo) > MEMO_TEXTS:
            memo.clear()
        new = [t for t in dict.fromkeys(texts) if t not in memo]
        fresh = dict(zip(new, self.encode(new)))
        for t, ids in fresh.items():
            if len(t) <= MEMO_CHARS:
                memo[t] = ids
        return [fresh[t] if t in fresh else memo[t] for t in texts]

    def fit(self, segs: list[tuple[list[int], list[int]]]) -> int:
        """Number of whole turns that fit in MSL (0 = not even the first)."""
        total, n = 0, 0
        for ids, _ in segs:
            total += len(ids)
            if total > self.max_suffix:
                break
            n += 1
        return n

    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Phase-2 inference prompt: the tokens a training row holds before the answer to `question`, after the
        earlier (question, answer) turns of `history` (the image slots hold pad ids; the model writes the image
        features over them)."""
        if self.phase != 2:
            raise ValueError("prompts follow the phase-2 layout; give the phase-2 data's data_params.json")
        slots = self.templates[1][0, :self.prefix_len].tolist()
        questions = [q for q, _ in history] + [question]
        questions[0] = "\n" + questions[0].replace("<image>", "").strip()
        if self.chat is not None:
            return slots + self.chat.generation_prompt(questions, [a for _, a in history])
        answers = [a for _, a in history] + [""]
        segments = self.build_turns(list(zip(self.encode(questions), self.encode(answers))), True)
        return slots + [t for ids, _ in segments for t in ids][:-1]  # the empty last answer leaves only its EOS

    def write_row(self, row: np.ndarray, ids: list[int], tgt: list[int]) -> None:
        """Write a sample's suffix into `row`, which already holds templates[v]."""
        p, n = self.prefix_len, len(ids)
        ids = np.array(ids, dtype=np.int32)  # converted once for both rows it fills
        row[0, p:p + n - 1] = ids[:-1]
        row[2, p - 1:p + n - 1] = ids
        row[1, p - 1:p + n - 1] = tgt
        row[3, p:p + n - 1] = 0


IMAGE_MARK = "\ue000"  # the image's place in a rendered conversation (a private-use character no text holds)
TURN_MARK = "\ue001{}\ue002"  # turn i's text, when the template's own text between turns is read off
# Passed to every template render: Llama-3.1's official template otherwise prints today's date into the system
# header, and the data would change (and stop matching a resumed run) from one day to the next.
TEMPLATE_VARIABLES = {"date_string": "26 Jul 2024"}


class ChatTurns:
    """Phase-2 turns laid out by a Jinja chat template, with labels that cannot silently shift.

    The template renders a record's whole conversation once, with the image mark at the start of the first user
    turn's text. The text before the mark is the same for every record (checked): it becomes the constant prefix,
    followed by the image slots. The text after it, T, is cut at each answer's start and end and after the
    end-of-turn token the template writes there. Each cut must be a token boundary of T's full tokenization (the
    tokens of T[:cut] are a prefix of the tokens of T), so the per-turn pieces concatenate to exactly the
    template's tokenization; a record where they would not is skipped as `tokenization_mismatch`. Targets are the
    answer tokens and the end-of-turn token, nothing else. Reading the template's text between turns per number of
    turns handles templates that render earlier and later turns differently (Qwen3's empty thinking block).
    """

    def __init__(self, tok, cfg: PreprocConfig, encode):
        self.tok, self.encode = tok, encode
        self.template = chat_template_of(tok, cfg)
        self._glue_cache: dict[int, list[str]] = {}
        glue2, glue4 = self.glue(2), self.glue(4)
        if any(not g for g in glue4[1:-1]):
            raise ConfigError(f"the chat template writes nothing between two turns ({glue4!r}), so turns cannot be "
                              f"told apart; use a template with role headers or separators")
        self.prefix_text = glue2[0]
        self.end_of_turn = self._end_of_turn(glue2[2], glue4[2])
        self.end_of_turn_id = tok.convert_tokens_to_ids(self.end_of_turn)
        self.prefix_ids = encode([self.prefix_text])[0] if self.prefix_text else []

    def render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            **TEMPLATE_VARIABLES)

    def glue(self, n: int) -> list[str]:
        """The template's own text around the turns of an n-turn conversation: [before turn 0, ..., after n-1]."""
        glue = self._glue_cache.get(n)
        if glue is None:
            roles = ["user", "assistant"] * (n // 2)
            try:
                text = self.render([{"role": r, "content": TURN_MARK.format(i)} for i, r in enumerate(roles)])
            except Exception as e:  # noqa: BLE001 - Jinja raises many types; the message is what matters
                raise ConfigError(f"the chat template fails on a plain user/assistant conversation: {e}") from e
            glue, pos = [], 0
            for i in range(n):
                j = text.find(TURN_MARK.format(i), pos)
                if j < 0:
                    raise ConfigError(f"the chat template does not print turn {i}'s text as given ({text!r}); "
                                      f"only templates that print each turn's text are supported")
                glue.append(text[pos:j])
                pos = j + len(TURN_MARK.format(i))
            glue.append(text[pos:])
            self._glue_cache[n] = glue
        return glue

    def _end_of_turn(self, *after_answers: str) -> str:
        """The special token the template writes right after every answer (<|eot_id|>, <|im_end|>, </s>)."""
        found = {special_token_at(self.tok, text) for text in after_answers}
        if len(found) != 1 or None in found:
            raise ConfigError(f"the chat template writes no special token right after an answer (it writes "
                              f"{after_answers[0][:40]!r}); the model could not learn to end its turn. Use a "
                              f"template that closes each answer with the tokenizer's end-of-turn token")
        return found.pop()

    def _spans(self, text: str, messages: list[dict]) -> list[tuple[int, int]] | None:
        """(start, end) of each turn's text in the rendered conversation, or None where it does not match."""
        glue = self.glue(len(messages))
        if not text.startswith(glue[0]):
            return None
        spans, pos = [], len(glue[0])
        for i, message in enumerate(messages):
            after = glue[i + 1]
            if i == len(messages) - 1:
                end = len(text) - len(after) if text.endswith(after) else -1
            else:
                end = text.find(after, pos)
            if end < pos or text[pos:end].strip() != message["content"].strip():
                return None
            spans.append((pos, end))
            pos = end + len(after)
        return spans

    def cut(self, pairs: list[tuple[str, str]]) -> tuple[str | None, tuple | None]:
        """Render a record; (reason, None) or (None, (T, cuts)) with three cuts per turn in T's coordinates."""
        messages = []
        for i, (user, answer) in enumerate(pairs):
            messages += [{"role": "user", "content": IMAGE_MARK + user if i == 0 else user},
                         {"role": "assistant", "content": answer}]
        try:
            text = self.render(messages)
        except Exception:  # noqa: BLE001 - e.g. the template's raise_exception on roles it refuses
            return "template_error", None
        spans = self._spans(text, messages)
        head = self.prefix_text + IMAGE_MARK
        if spans is None or not text.startswith(head) or text.count(IMAGE_MARK) != 1:
            return "template_mismatch", None
        base, cuts = len(head), []
        for start, end in spans[1::2]:
            if not text.startswith(self.end_of_turn, end):
                return "template_mismatch", None
            cuts += [start - base, end - base, end - base + len(self.end_of_turn)]
        return None, (text[base:], cuts)

    def generation_prompt(self, questions: list[str], answers: list[str]) -> list[int]:
        """Tokens after the image of a conversation (questions[i], answers[i], ..., questions[-1]) rendered with
        the generation prompt."""
        messages = []
        for i, q in enumerate(questions):
            messages.append({"role": "user", "content": IMAGE_MARK + q if i == 0 else q})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        text = self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=True, **TEMPLATE_VARIABLES)
        head = self.prefix_text + IMAGE_MARK
        if not text.startswith(head):
            raise ValueError(f"the chat template renders a different text before the image for {questions[0][:40]!r}")
        return self.encode([text[len(head):]])[0]

    def segments(self, full: list[int], bounds: list[int]) -> list[tuple[list[int], list[int]]] | None:
        """Turn segments from T's tokens and the token index of every cut; None if an end of turn is not the
        single end-of-turn token."""
        segs, prev = [], 0
        for k in range(0, len(bounds), 3):
            start, end, stop = bounds[k:k + 3]
            if full[end:stop] != [self.end_of_turn_id]:
                return None
            prompt, answer = full[prev:start], full[start:end]
            segs.append((prompt + answer + [self.end_of_turn_id], [0] * len(prompt) + [1] * (len(answer) + 1)))
            prev = stop
        return segs

    def bounds_in_context(self, text: str, cuts: list[int], full: list[int]) -> list[int] | None:
        """The plain check: each cut's token index, where the tokens of T[:cut] are a prefix of T's tokens."""
        prefix_ids = self.encode([text[:j] for j in cuts])
        if any(full[:len(ids)] != ids for ids in prefix_ids):
            return None
        return [len(ids) for ids in prefix_ids]

    def block_segments(self, docs: list) -> list[tuple[str | None, list | None]]:
        """Fast path: the pieces between cuts tokenized on their own concatenate to T's tokens (byte-level BPE
        tokenizers, cuts next to special tokens); their lengths give the cuts' token indices. Otherwise (e.g.
        SentencePiece marks a word start differently mid-text) bounds_in_context checks each cut in context."""
        cut = [self.cut(doc[1]) if doc is not None else (None, None) for doc in docs]
        texts = []
        for _, c in cut:
            if c is not None:
                text, cuts = c
                texts += [text[i:j] for i, j in zip([0, *cuts], cuts)] + [text]
        tokens = iter(self.encode(texts))
        out = []
        for reason, c in cut:
            if c is None:
                out.append((reason, None))
                continue
            text, cuts = c
            parts = [next(tokens) for _ in cuts]
            full = next(tokens)
            joined = [t for p in parts for t in p]  # T's text after the last cut (e.g. "\n") is not kept
            if full[:len(joined)] == joined:
                bounds = list(itertools.accumulate(len(p) for p in parts))
            else:
                bounds = self.bounds_in_context(text, cuts, full)
            segs = None if bounds is None else self.segments(full, bounds)
            out.append(("tokenization_mismatch", None) if segs is None else (None, segs))
        return out


def special_token_at(tok, text: str) -> str | None:
    """The longest added / special token `text` starts with (what a template writes after an answer), or None."""
    return max((t for t in tok.get_added_vocab() if text.startswith(t)), key=len, default=None)


def chat_template_of(tok, cfg: PreprocConfig) -> str:
    """The Jinja template of dataset.system_prompt_style: the tokenizer's own, or a CHAT_TEMPLATES entry."""
    style = cfg.dataset.system_prompt_style
    if style != "chat_template":
        return CHAT_TEMPLATES[style]
    template = tok.chat_template
    if isinstance(template, dict):  # tokenizers with several named templates
        template = template.get("default")
    if not template:
        raise ConfigError(f"{cfg.name('dataset', 'system_prompt_style')} is chat_template, but the tokenizer in "
                          f"{cfg.processing.huggingface_tokenizer!r} has no chat_template; set it to the "
                          f"family's template instead: one of {', '.join(CHAT_TEMPLATES)}")
    return template


# --------------------------------------------------------------------------------------------------------------
# Reading and validating records
# --------------------------------------------------------------------------------------------------------------


def find_input_files(cfg: PreprocConfig) -> list[Path]:
    """Input files in a deterministic (sorted) order."""
    setup = cfg.setup
    if setup.metadata_files:
        lists = setup.metadata_files if isinstance(setup.metadata_files, list) else \
            [s for s in str(setup.metadata_files).split(",") if s.strip()]
        files = []
        for lst in lists:
            lst_path = Path(str(lst).strip())
            if not lst_path.is_file():
                raise ConfigError(f"{cfg.name('setup', 'metadata_files')}: list file {str(lst_path)!r} not found")
            for line in lst_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    f = Path(line.strip())
                    if not f.is_file():
                        raise ConfigError(f"{lst_path}: listed input file {str(f)!r} not found")
                    files.append(f)
        return files
    if not setup.input_dir:
        raise ConfigError(f"{cfg.source}: set setup.input_dir (or setup.metadata_files), or pass --input_dir")
    root = Path(setup.input_dir)
    if not root.is_dir():
        raise ConfigError(f"{cfg.name('setup', 'input_dir')}: folder {str(root)!r} not found "
                          f"(edit the yaml or pass --input_dir)")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ConfigError(f"{cfg.name('setup', 'input_dir')}: no {', '.join(INPUT_SUFFIXES)} files in {str(root)!r}")
    return files


def _iter_file_records(path: Path, truncated: list[str]) -> Iterator[tuple[int, Any]]:
    """(line number or array index, raw bytes line or already-parsed object) for every record of a file.

    A .gz file that ends early or is corrupt yields the records before the damage and is added to `truncated`."""
    if path.name.endswith(".json"):
        with open(path, "rb") as f:
            data = f.read()
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None  # not one JSON document: treat as JSON lines (e.g. Cerebras' synthdog .json output)
        if isinstance(obj, list):
            for i, rec in enumerate(obj):
                yield i + 1, rec
            return
        if obj is not None:
            yield 1, obj
            return
        for i, line in enumerate(data.splitlines()):
            if line.strip():
                yield i + 1, line
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            for i, line in enumerate(f):
                if line.strip():
                    yield i + 1, line
        except COMPRESSED_STREAM_ERRORS:
            truncated.append(str(path))


# What gzip raises on a cut (EOFError) or damaged (BadGzipFile, zlib.error) stream.
COMPRESSED_STREAM_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def iter_assigned_records(files: list[Path], proc: int, nproc: int, start: int, truncated: list[str]
                          ) -> Iterator[tuple[int, Path, int, Any]]:
    """(global index, file, line, raw) of the records dealt to process `proc`: blocks b with b % nproc == proc.

    Every record (including malformed ones) gets a global index in file order, so the set of samples written
    does not depend on the number of processes. Records before `start` (resume point) are skipped unparsed.
    Damaged .gz files are appended to `truncated`."""
    g = 0
    for path in files:
        for line_no, raw in _iter_file_records(path, truncated):
            if g >= start and (g // RECORDS_PER_BLOCK) % nproc == proc:
                yield g, path, line_no, raw
            g += 1


def count_records(files: list[Path]) -> int | None:
    """Fast record count for the progress bar (None when a JSON array file would need parsing)."""
    total = 0
    for path in files:
        if path.name.endswith(".json"):
            return None
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            last = b"\n"
            try:
                while chunk := f.read(1 << 22):
                    total += chunk.count(b"\n")
                    last = chunk[-1:]
            except COMPRESSED_STREAM_ERRORS:
                pass  # reported by the run itself
            total += last != b"\n"
    return total


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _make_cleaner(cfg: PreprocConfig) -> Callable[[str], str]:
    if not cfg.dataset.use_ftfy:
        return lambda s: s
    try:
        import ftfy
    except ImportError:
        form = cfg.dataset.ftfy_normalizer or "NFC"
        return lambda s: s if unicodedata.is_normalized(form, s) else unicodedata.normalize(form, s)
    norm = cfg.dataset.ftfy_normalizer

    def clean(s: str) -> str:
        return s if FTFY_UNCHANGED.fullmatch(s) else ftfy.fix_text(s, normalization=norm)

    return clean


# Text that ftfy.fix_text returns unchanged, checked in C instead of ftfy's ~40 us per text: printable ASCII, tab
# and newline, without "&". Every ftfy fix of ASCII text needs one of the excluded characters (HTML entities "&",
# CR line breaks, ANSI escapes ESC, removed control characters); mojibake, quotes, widths, ligatures and unicode
# normalisation only touch non-ASCII text.
FTFY_UNCHANGED = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def safe_relative_path(rel: str) -> bool:
    """True when `rel` stays inside the root it is joined to (no absolute path, no '..' escape)."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        return False
    norm = os.path.normpath(rel)
    return norm != ".." and not norm.startswith(".." + os.sep) and not norm.startswith("../")


class RecordParser:
    """Validates one LLaVA record and returns (skip reason, None) or (None, (image path|None, [(user, asst)]))."""

    def __init__(self, cfg: PreprocConfig, phase: int):
        d = cfg.dataset
        self.phase = phase
        self.turns_key, self.content_key, self.image_key = d.multi_turn_key, d.multi_turn_content_key, d.image_key
        self.image_token = d.image_token
        self.image_dir = d.image_dir
        self.clean = _make_cleaner(cfg)
        self.system_turns = 0  # leading system turns seen (dropped: the image position must stay fixed)
        self.check_images = d.check_images
        self.image_ok: dict[str, bool] = {}  # image path -> header readable (images repeat across records)

    def parse(self, raw: Any) -> tuple[str | None, Any]:
        if isinstance(raw, (bytes, str)):
            try:
                raw = json.loads(raw)
            except UnicodeDecodeError:
                return "undecodable_text", None
            except json.JSONDecodeError:
                return "malformed_json", None
        if not isinstance(raw, dict):
            return "not_an_object", None
        conv = raw.get(self.turns_key)
        if not isinstance(conv, list) or not conv:
            return "no_conversations", None
        image = raw.get(self.image_key)
        if image is not None:
            if not isinstance(image, str):
                return "non_string_value", None
            if not safe_relative_path(image):
                return "image_outside_root", None
            path = os.path.join(self.image_dir, image)
            if not os.path.isfile(path):
                return "missing_image", None
            if self.check_images and not self._image_readable(path):
                return "unreadable_image", None
        roles, texts = [], []
        for turn in conv:
            if not isinstance(turn, dict) or "from" not in turn or self.content_key not in turn:
                return "bad_turn", None
            role, text = turn["from"], turn[self.content_key]
            if not isinstance(role, str) or not isinstance(text, str):
                return "non_string_value", None
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return "invalid_unicode", None
            role = ROLE_NAMES.get(role.lower())
            if role is None:
                return "unknown_role", None
            roles.append(role)
            texts.append(text)
        if roles[0] == "system":
            roles, texts = roles[1:], texts[1:]
            self.system_turns += 1
        if not roles or len(roles) % 2 or any(r != ("user" if i % 2 == 0 else "assistant")
                                              for i, r in enumerate(roles)):
            return ("unknown_role" if "system" in roles else "not_alternating"), None
        pairs = []
        for i in range(0, len(texts), 2):
            user, answer = texts[i], texts[i + 1]
            if self.phase == 1:  # caption-only: the prompt is discarded (spec 2.5)
                pairs.append(("", self.clean(answer)))
                continue
            if image is not None:
                user = user.replace(self.image_token, "")
                if i == 0:  # the image always sits before the first user text: "<image>\n" + text (LLaVA)
                    user = "\n" + user.strip()
            pairs.append((self.clean(user), self.clean(answer)))
        return None, (image, pairs)

    def _image_readable(self, path: str) -> bool:
        ok = self.image_ok.get(path)
        if ok is None:
            ok = self.image_ok[path] = image_header_readable(path)
        return ok


def image_header_readable(path: str) -> bool:
    """True when PIL recognises the file and parses its header (size, mode); the pixels are not decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.width > 0 and im.height > 0
    except Exception:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ... on bad files
        return False


# --------------------------------------------------------------------------------------------------------------
# Writing H5 files
# --------------------------------------------------------------------------------------------------------------


class H5FileWriter:
    """Writes rows into <name>_<k>_<proc>.h5 files of `files_per_record` rows, under a temporary name first."""

    def __init__(self, out_dir: Path, name: str, proc: int, layout: TokenLayout, files_per_record: int,
                 first_file: int, on_file_done: Callable[[int, dict], None]):
        self.out_dir, self.name, self.proc, self.layout = out_dir, name, proc, layout
        self.per_file = files_per_record
        self.file_no = first_file
        self.on_file_done = on_file_done
        self.buf = np.empty((FLUSH_ROWS, 4, layout.msl), dtype=np.int32)
        self.buf_n = 0
        self.h5 = None
        self.dset = None
        self.rows_in_file = 0
        self.paths: list[bytes] = []
        self.file_stats = _zero_stats()

    def final_name(self, k: int) -> Path:
        return self.out_dir / f"{self.name}_{k}_{self.proc}.h5"

    def new_row(self, img_path: str | None) -> np.ndarray:
        """Next row to fill (pre-set to the template); the caller writes the suffix."""
        row = self.buf[self.buf_n]
        row[...] = self.layout.templates[img_path is not None]
        self.buf_n += 1
        self.paths.append(b"None" if img_path is None else img_path.encode("utf-8"))
        return row

    def row_done(self, record_index: int) -> None:
        """Call after filling the row from new_row(); flushes and closes files as they fill."""
        if self.rows_in_file + self.buf_n >= self.per_file or self.buf_n == FLUSH_ROWS:
            self._flush()
        if self.rows_in_file >= self.per_file:
            self._close_file(record_index + 1)

    def _open(self) -> None:
        import h5py

        tmp = self.final_name(self.file_no).with_suffix(".h5.tmp")
        self.h5 = h5py.File(tmp, "w")
        msl = self.layout.msl
        self.dset = self.h5.create_dataset("data", shape=(0, 4, msl), maxshape=(None, 4, msl), dtype="i4",
                                           chunks=(1, 4, msl), compression="gzip")

    def _flush(self) -> None:
        n = self.buf_n
        if n == 0:
            return
        if self.h5 is None:
            self._open()
        block = self.buf[:n]
        _accumulate_stats(self.file_stats, block, self.layout)
        start = self.rows_in_file
        self.dset.resize(start + n, axis=0)
        self.dset[start:start + n] = block
        self.rows_in_file += n
        self.buf_n = 0

    def _close_file(self, next_record: int) -> None:
        n = self.rows_in_file
        width = max(1, max(len(p) for p in self.paths))
        paths = np.array(self.paths, dtype=f"S{width}").reshape(n, 1)
        self.h5.create_dataset("img_path", data=paths, compression="gzip")
        self.h5.attrs["n_examples"] = n
        tmp = Path(self.h5.filename)
        self.h5.close()
        os.replace(tmp, self.final_name(self.file_no))
        stats, self.file_stats = self.file_stats, _zero_stats()
        self.file_no += 1
        self.h5, self.dset, self.rows_in_file, self.paths = None, None, 0, []
        self.on_file_done(next_record, stats)

    def finish(self, next_record: int, write_remainder: bool) -> None:
        self._flush()
        if self.rows_in_file and write_remainder:
            self._close_file(next_record)
        elif self.h5 is not None:
            tmp = Path(self.h5.filename)
            self.h5.close()
            tmp.unlink()


def _zero_stats() -> dict:
    return {"num_sequences": 0, "num_tokens": 0, "non_pad_tokens": 0, "loss_valid_tokens": 0}


def _accumulate_stats(stats: dict, block: np.ndarray, layout: TokenLayout) -> None:
    ids = block[:, 0]
    stats["num_sequences"] += len(block)
    stats["num_tokens"] += ids.size
    stats["non_pad_tokens"] += int(np.count_nonzero((ids != layout.pad_id) & (ids != layout.eos_id)))
    stats["loss_valid_tokens"] += int(block[:, 1].sum(dtype=np.int64))
    top = int(ids.max()) if ids.size else 0
    if top >= layout.vocab_size or int(block[:, 2].max()) >= layout.vocab_size:
        raise RuntimeError(f"token id {top} >= vocab size {layout.vocab_size}: check processing.pad_id/eos_id")


# --------------------------------------------------------------------------------------------------------------
# One preprocessing process
# --------------------------------------------------------------------------------------------------------------

COUNT_KEYS = ("processed_files", "successful_files", "discarded_files", "truncated_samples", "raw_chars_count",
              "raw_bytes_count", "system_turns_dropped")


def _checkpoint_path(out_dir: Path, proc: int) -> Path:
    return out_dir / f"checkpoint_{proc}.json"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4, sort_keys=True)
    os.replace(tmp, path)


def _new_state(proc: int, nproc: int) -> dict:
    return {"proc": proc, "processes": nproc, "next_record": 0, "files_written": 0, "done": False,
            "counts": {k: 0 for k in COUNT_KEYS}, "reasons": {}, "examples": {}, "stats": _zero_stats()}


def run_worker(proc: int, nproc: int, cfg_dict: dict, phase: int, files: list[str], progress=None) -> dict:
    """Process the records dealt to `proc`; returns the final state (also saved as checkpoint_<proc>.json).

    `progress` is a callable(records_delta, samples_delta), called after each block of records."""
    if nproc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process
    cfg = parse_config(cfg_dict, "data_params.json")
    out_dir = Path(cfg.setup.output_dir)
    key_name = cfg.name("processing", "huggingface_tokenizer")
    tok = load_writer_tokenizer(cfg.processing.huggingface_tokenizer, key_name)
    layout = TokenLayout(tok, cfg, phase)
    parser = RecordParser(cfg, phase)
    ckpt = _checkpoint_path(out_dir, proc)
    state = _new_state(proc, nproc)
    if cfg.processing.resume_from_checkpoint and ckpt.is_file():
        state = json.loads(ckpt.read_text(encoding="utf-8"))
        if state.get("processes") != nproc:
            raise ConfigError(f"{ckpt}: the interrupted run used {state.get('processes')} processes, this run "
                              f"{nproc}; resume with setup.processes = {state.get('processes')}")
    _remove_stale_files(out_dir, cfg.processing.output_name, proc, state["files_written"])
    if state["done"]:
        return state

    counts, reasons, examples = state["counts"], state["reasons"], state["examples"]
    base_system_turns = counts["system_turns_dropped"]

    def on_file_done(next_record: int, file_stats: dict) -> None:
        state["next_record"] = next_record
        state["files_written"] += 1
        for k, v in file_stats.items():
            state["stats"][k] += v
        counts["system_turns_dropped"] = parser.system_turns + base_system_turns
        _write_json_atomic(ckpt, state)

    writer = H5FileWriter(out_dir, cfg.processing.output_name, proc, layout, cfg.processing.files_per_record,
                          state["files_written"], on_file_done)
    # A completed file's checkpoint must hold the counts of exactly the records before it, so counts are
    # updated record by record in order, right before the record's row is handed to the writer.

    def skip(reason: str, rec_id: str) -> None:
        counts["discarded_files"] += 1
        reasons[reason] = reasons.get(reason, 0) + 1
        ex = examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(rec_id)

    last_index = state["next_record"] - 1
    written_before = counts["successful_files"]
    block: list[tuple[int, Path, int, Any]] = []
    truncated: list[str] = []
    source = iter_assigned_records([Path(f) for f in files], proc, nproc, state["next_record"], truncated)
    while True:
        block.clear()
        for item in source:
            block.append(item)
            if len(block) == RECORDS_PER_BLOCK:
                break
        if not block:
            break
        parsed = [parser.parse(raw) for _, _, _, raw in block]
        laid_out = layout.block_segments([doc if reason is None else None for reason, doc in parsed])
        for (g, path, line_no, raw), (reason, doc), (layout_reason, segs) in zip(block, parsed, laid_out):
            counts["processed_files"] += 1
            last_index = g
            reason = reason or layout_reason
            if reason is not None:
                skip(reason, _record_id(raw, path, line_no))
                continue
            image, pairs = doc
            for user, answer in pairs:  # phase 1 leaves user empty: its prompt is not used
                counts["raw_chars_count"] += len(user) + len(answer)
                counts["raw_bytes_count"] += len(user.encode("utf-8")) + len(answer.encode("utf-8"))
            keep = layout.fit(segs)
            if keep == 0:
                skip("too_long", _record_id(raw, path, line_no))
                continue
            if keep < len(segs):
                counts["truncated_samples"] += 1
            ids = list(itertools.chain.from_iterable(s[0] for s in segs[:keep]))
            tgt = list(itertools.chain.from_iterable(s[1] for s in segs[:keep]))
            row = writer.new_row(image)
            layout.write_row(row, ids, tgt)
            counts["successful_files"] += 1
            writer.row_done(g)
        if progress is not None:
            progress(len(block), counts["successful_files"] - written_before)
            written_before = counts["successful_files"]
    counts["system_turns_dropped"] = parser.system_turns + base_system_turns
    writer.finish(last_index + 1, cfg.processing.write_remainder)
    state["next_record"] = last_index + 1
    state["truncated_inputs"] = truncated
    state["done"] = True
    _write_json_atomic(ckpt, state)
    return state


def _record_id(raw: Any, path: Path, line_no: int) -> str:
    rec_id = None
    if isinstance(raw, dict):
        rec_id = raw.get("id")
    elif isinstance(raw, (bytes, str)):
        m = re.search(rb'"id"\s*:\s*"?([^",}]*)' if isinstance(raw, bytes) else r'"id"\s*:\s*"?([^",}]*)', raw)
        if m:
            rec_id = m.group(1).decode("utf-8", "replace") if isinstance(raw, bytes) else m.group(1)
    where = f"{path.name}:{line_no}"
    return f"{rec_id} ({where})" if rec_id not in (None, "") else where


def _remove_stale_files(out_dir: Path, name: str, proc: int, files_written: int) -> None:
    """Delete this process's temporary files and any file numbered at or after the resume point."""
    pat = re.compile(rf"^{re.escape(name)}_(\d+)_{proc}\.h5(\.tmp)?$")
    for p in out_dir.iterdir():
        m = pat.match(p.name)
        if m and (m.group(2) or int(m.group(1)) >= files_written):
            p.unlink()


# --------------------------------------------------------------------------------------------------------------
# The whole preprocessing run
# --------------------------------------------------------------------------------------------------------------


def unfinished_dataset_problem(params: dict | None, folder: str | os.PathLike) -> str | None:
    """Why the H5 folder with these data_params cannot be used yet (None when it can).

    Our runs write data_params.json with dataset_complete false at the start and true at the end; a file with a
    `setup` section but no `post-process` is an unfinished run of an older version. Cerebras' files (written at
    the end) and hand-made ones without `setup` are accepted."""
    if not params:
        return None
    if params.get("dataset_complete") is False or ("dataset_complete" not in params and "setup" in params
                                                   and "post-process" not in params):
        return (f"{folder}: this H5 dataset is unfinished (create_hdf5_dataset.py was interrupted; data_params.json "
                f"has no post-process summary). Finish it with the same command plus --resume_from_checkpoint True, "
                f"or rerun it with --overwrite")
    return None


def _prepare_output_dir(cfg: PreprocConfig, overwrite: bool) -> Path:
    if not cfg.setup.output_dir:
        raise ConfigError(f"{cfg.source}: set setup.output_dir or pass --output_dir")
    out = Path(cfg.setup.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{cfg.name('setup', 'output_dir')}: {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.h5"))
    if existing and not cfg.processing.resume_from_checkpoint:
        if not overwrite:
            raise ConfigError(f"{cfg.name('setup', 'output_dir')}: {str(out)!r} already holds {len(existing)} "
                              f"H5 file(s) (e.g. {existing[0].name}); pass --overwrite to replace them or "
                              f"--resume_from_checkpoint True to continue an interrupted run")
    if not cfg.processing.resume_from_checkpoint:
        for p in out.iterdir():  # only files this tool writes
            if p.is_file() and (p.suffix == ".h5" or p.name.endswith(".h5.tmp")
                                or re.fullmatch(r"checkpoint_\d+\.json(\.tmp)?", p.name)
                                or p.name == "data_params.json"):
                p.unlink()
    return out


def _check_resume(out: Path, params: dict) -> dict | None:
    """The previous run's data_params.json (None if absent), after checking it used the same settings."""
    prev_path = out / "data_params.json"
    if not prev_path.is_file():
        return None
    prev = json.loads(prev_path.read_text(encoding="utf-8"))
    ignore = {("processing", "resume_from_checkpoint"), ("processing", "display_pbar")}
    for sec in SECTIONS:
        for key, value in params[sec].items():
            if (sec, key) in ignore:
                continue
            if prev.get(sec, {}).get(key) != value:
                raise ConfigError(f"{prev_path}: the interrupted run used {sec}.{key} = "
                                  f"{prev.get(sec, {}).get(key)!r}, this run {value!r}; resume with the same "
                                  f"settings or start again with --overwrite")
    return prev


def preprocess(mode: str, cfg: PreprocConfig, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Run LlavaPhaseOne / LlavaPhaseTwo. Returns the final data_params dict (also written to output_dir)."""
    phase = 1 if mode == "LlavaPhaseOne" else 2
    if cfg.dataset.image_dir is None or not Path(cfg.dataset.image_dir).is_dir():
        raise ConfigError(f"{cfg.name('dataset', 'image_dir')}: image folder {cfg.dataset.image_dir!r} not found "
                          f"(every record's image path is checked against it)")
    files = find_input_files(cfg)
    key_name = cfg.name("processing", "huggingface_tokenizer")
    tok = load_writer_tokenizer(cfg.processing.huggingface_tokenizer, key_name)
    layout = TokenLayout(tok, cfg, phase)
    nproc = cfg.setup.processes or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                    else os.cpu_count() or 1)
    out = _prepare_output_dir(cfg, overwrite)
    params = cfg.to_dict()
    params["setup"]["processes"] = nproc
    if cfg.processing.resume_from_checkpoint:
        prev = _check_resume(out, params)
        if prev is not None and "post-process" in prev:
            print(f"{out}: the run is already complete ({prev['post-process']['n_examples']} samples); nothing "
                  f"to resume")
            return prev
    # Written first without `post-process` and marked unfinished, so a killed run is never taken for a dataset.
    _write_json_atomic(out / "data_params.json", {**params, "dataset_complete": False})
    if cfg.dataset.use_ftfy and not _has_module("ftfy"):
        print("note: ftfy is not installed, so dataset.use_ftfy only applies unicode normalisation "
              f"({cfg.dataset.ftfy_normalizer}); install ftfy for Cerebras-identical text cleaning", file=sys.stderr)
    show = cfg.processing.display_pbar if progress is None else progress
    file_strs = [str(f) for f in files]
    t0 = time.perf_counter()
    # the workers rebuild their config from the params just written (parse_config does not modify it)
    states = _run_workers(nproc, params, phase, file_strs, show, count_records(files) if show else None)
    elapsed = time.perf_counter() - t0
    result = _summarise(params, states, layout)
    _verify_outputs(out, layout.msl, result)
    _write_json_atomic(out / "data_params.json", result)
    for p in range(nproc):
        _checkpoint_path(out, p).unlink(missing_ok=True)
    _print_summary(result, elapsed, out)
    return result


class _ProgressBar:
    """tqdm bar over records with a samples/s postfix."""

    def __init__(self, total: int | None, show: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="rec", disable=not show, desc="records", smoothing=0.1,
                        dynamic_ncols=True)
        self.samples, self.t0 = 0, time.perf_counter()

    def update(self, records: int, samples: int) -> None:
        self.samples += samples
        self.bar.set_postfix_str(f"samples={self.samples} ({self.samples / (time.perf_counter() - self.t0):.0f}/s)",
                                 refresh=False)
        self.bar.update(records)

    def close(self) -> None:
        self.bar.close()


def _run_workers(nproc: int, cfg_dict: dict, phase: int, files: list[str], show: bool, total: int | None
                 ) -> list[dict]:
    bar = _ProgressBar(total, show)
    try:
        if nproc == 1:
            return [run_worker(0, 1, cfg_dict, phase, files, progress=bar.update)]
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        done = ctx.Array("q", 2 * nproc, lock=False)  # per process: records, samples
        procs = [ctx.Process(target=_worker_entry, args=(p, nproc, cfg_dict, phase, files, done), daemon=True)
                 for p in range(nproc)]
        for pr in procs:
            pr.start()
        try:
            shown = [0, 0]

            def refresh() -> None:
                now = [sum(done[0::2]), sum(done[1::2])]
                bar.update(now[0] - shown[0], now[1] - shown[1])
                shown[:] = now

            while any(pr.is_alive() for pr in procs):
                time.sleep(0.2)
                refresh()
                if any(pr.exitcode not in (None, 0) for pr in procs):
                    break
            refresh()
        finally:
            for pr in procs:
                if pr.is_alive() and any(q.exitcode not in (None, 0) for q in procs):
                    pr.terminate()
                pr.join()
        failed = [i for i, pr in enumerate(procs) if pr.exitcode != 0]
        if failed:
            raise RuntimeError(f"preprocessing process(es) {failed} failed (see the error above); fix it and "
                               f"rerun with --resume_from_checkpoint True to keep the finished files")
        out = Path(cfg_dict["setup"]["output_dir"])
        return [json.loads(_checkpoint_path(out, p).read_text(encoding="utf-8")) for p in range(nproc)]
    finally:
        bar.close()


def _worker_entry(proc: int, nproc: int, cfg_dict: dict, phase: int, files: list[str], done) -> None:
    def progress(records: int, samples: int) -> None:
        done[2 * proc] += records
        done[2 * proc + 1] += samples

    try:
        run_worker(proc, nproc, cfg_dict, phase, files, progress=progress)
    except ConfigError as e:
        print(f"error (process {proc}): {e}", file=sys.stderr)
        sys.exit(2)


def _summarise(params: dict, states: list[dict], layout: TokenLayout) -> dict:
    counts = {k: sum(s["counts"][k] for s in states) for k in COUNT_KEYS}
    reasons: dict[str, int] = {}
    examples: dict[str, list] = {}
    for s in states:
        for r, n in s["reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
            examples.setdefault(r, []).extend(s["examples"].get(r, []))
    stats = {k: sum(s["stats"][k] for s in states) for k in _zero_stats()}
    result = dict(params)
    result["dataset_complete"] = True
    result["post-process"] = {
        **counts, "n_examples": stats["num_sequences"], "eos_id": layout.eos_id, "pad_id": layout.pad_id,
        "vocab_size": layout.vocab_size,
        "discarded_by_reason": dict(sorted(reasons.items())),
        "truncated_input_files": sorted({f for s in states for f in s.get("truncated_inputs", [])}),
        "discarded_examples": {r: examples[r][:3] for r in sorted(examples)},
    }
    result["h5_dataset_stats"] = stats
    result["image_patch_info"] = {"image_patch_start_idx": layout.image_start_idx,
                                  "num_patches": layout.np_slots,
                                  "text_only_mask_start": layout.text_only_mask_start}
    return result


def _verify_outputs(out: Path, msl: int, result: dict) -> None:
    """Re-open every H5 file (metadata only) and check the layout; values were checked before writing."""
    import h5py

    total = 0
    for path in sorted(out.glob("*.h5")):
        with h5py.File(path, "r") as f:
            d, p = f["data"], f["img_path"]
            n = int(f.attrs["n_examples"])
            if d.dtype != np.int32 or d.shape[1:] != (4, msl) or d.shape[0] != n or p.shape != (n, 1):
                raise RuntimeError(f"{path}: unexpected layout data {d.shape} {d.dtype}, img_path {p.shape}, "
                                   f"n_examples {n}")
            total += n
    if total != result["post-process"]["n_examples"]:
        raise RuntimeError(f"{out}: H5 files hold {total} samples but {result['post-process']['n_examples']} "
                           f"were written; is another run writing to the same folder?")


def _print_summary(result: dict, elapsed: float, out: Path) -> None:
    pp = result["post-process"]
    rate = pp["processed_files"] / elapsed if elapsed > 0 else float("inf")
    print(f"{pp['successful_files']} samples written to {out} from {pp['processed_files']} records "
          f"({rate:.0f} records/s); {pp['discarded_files']} skipped, {pp['truncated_samples']} truncated at a "
          f"turn boundary; image_patch_start_idx = {result['image_patch_info']['image_patch_start_idx']}")
    for reason, n in pp["discarded_by_reason"].items():
        ex = ", ".join(str(e) for e in pp["discarded_examples"].get(reason, []))
        print(f"  skipped {n:>8} {reason}: {SKIP_REASONS.get(reason, '')} (e.g. {ex})")
    for path in pp["truncated_input_files"]:
        print(f"  warning: {path} is truncated or damaged (the compressed stream ends early): the records before "
              f"the damage were used; re-download or re-compress it to use the rest")
    if pp["system_turns_dropped"]:
        print(f"  note: {pp['system_turns_dropped']} leading system turn(s) dropped: the style's system prompt "
              f"is used so that the image position stays fixed")


# --------------------------------------------------------------------------------------------------------------
# Shuffle (spec 2.10, deterministic, waits for its workers)
# --------------------------------------------------------------------------------------------------------------
# Same two-level scheme as Cerebras' h5_dataset_shuffle.py (every row goes to a random output chunk, then each
# chunk is permuted), computed from the seed alone: the rng of input file i is seeded (seed, 0, i) and the
# permutation of chunk c (seed, 1, c), so the result does not depend on the number of workers. Rows are moved as
# raw compressed H5 chunks when the input stores one row per chunk (ours and Cerebras' files do), so nothing is
# decompressed; other layouts are copied row by row.


def _list_h5(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*.h5") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _chunk_members(sizes: list[int], num_chunks: int, seed: int) -> list[np.ndarray]:
    """Per output chunk: the (file index, row) pairs it holds, in their final (permuted) order."""
    chunk_of = [np.random.default_rng([seed, 0, i]).integers(0, num_chunks, size=n) for i, n in enumerate(sizes)]
    members = []
    for c in range(num_chunks):
        pairs = np.concatenate([np.stack([np.full(len(rows), i), rows], 1)
                                for i, rows in ((i, np.flatnonzero(co == c)) for i, co in enumerate(chunk_of))])
        members.append(pairs[np.random.default_rng([seed, 1, c]).permutation(len(pairs))])
    return members


def _row_chunked(dset) -> bool:
    return dset.chunks == (1,) + dset.shape[1:]


def _shuffle_write_chunk(args: tuple) -> int:
    """Write output chunk c (data-<c>.h5) from its member rows; returns its number of rows."""
    import h5py

    c, files, members, out_dir = args
    final = Path(out_dir) / f"data-{c:05d}.h5"
    tmp = final.with_suffix(".h5.tmp")
    handles = [h5py.File(f, "r") for f in files]
    try:
        dsets = [h["data"] for h in handles]
        paths = [h["img_path"][:, 0] if "img_path" in h else None for h in handles]
        first = dsets[0]
        raw = all(_row_chunked(d) and d.compression == first.compression and d.compression_opts ==
                  first.compression_opts and d.shuffle == first.shuffle for d in dsets)
        n = len(members)
        with h5py.File(tmp, "w") as out:
            out.attrs["n_examples"] = n
            opts = dict(compression=first.compression, compression_opts=first.compression_opts,
                        shuffle=first.shuffle) if raw else dict(compression="gzip")
            data = out.create_dataset("data", shape=(n,) + first.shape[1:], dtype=first.dtype,
                                      chunks=(1,) + first.shape[1:], **opts)
            zero = (0,) * (len(first.shape) - 1)
            for k, (fi, j) in enumerate(members.tolist()):
                if raw:  # move the compressed bytes as they are
                    mask, chunk = dsets[fi].id.read_direct_chunk((j,) + zero)
                    data.id.write_direct_chunk((k,) + zero, chunk, mask)
                else:
                    data[k] = dsets[fi][j]
            if paths[0] is not None:
                width = max(1, max(p.dtype.itemsize for p in paths))
                img = np.array([paths[fi][j] for fi, j in members.tolist()], dtype=f"S{width}").reshape(n, 1)
                out.create_dataset("img_path", data=img, compression="gzip")
    finally:
        for h in handles:
            h.close()
    os.replace(tmp, final)
    return n


def shuffle(input_dir: str | os.PathLike, output_dir: str | os.PathLike, num_chunks: int, num_workers: int = 1,
            seed: int = 0, overwrite: bool = False, progress: bool = True) -> int:
    """Shuffle all samples of input_dir/**.h5 into output_dir/data-<chunk:05d>.h5; returns the number of samples.

    `data` rows keep their `img_path` rows. Waits for its workers. data_params.json is copied (with a `shuffle`
    entry) so that readers still find image_patch_info."""
    import h5py
    from tqdm import tqdm

    src, dst = Path(input_dir), Path(output_dir)
    if num_chunks < 1 or num_workers < 1:
        raise ConfigError(f"--num_chunks and --num_workers must be >= 1, found {num_chunks}, {num_workers}")
    if not src.is_dir():
        raise ConfigError(f"shuffle: input folder {str(src)!r} not found")
    files = _list_h5(src)
    if not files:
        raise ConfigError(f"shuffle: no .h5 files under {str(src)!r}")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConfigError(f"shuffle: output folder {str(dst)!r} must not be the input folder or inside it")
    params_src = src / "data_params.json"
    params = json.loads(params_src.read_text(encoding="utf-8")) if params_src.is_file() else {}
    problem = unfinished_dataset_problem(params, src)
    if problem:
        raise ConfigError(f"shuffle: {problem}")
    dst.mkdir(parents=True, exist_ok=True)
    old = list(dst.glob("*.h5"))
    if old and not overwrite:
        raise ConfigError(f"shuffle: {str(dst)!r} already holds {len(old)} H5 file(s); pass --overwrite")
    for p in old:
        p.unlink()
    sizes, shapes, with_paths = [], set(), set()
    for p in files:
        with h5py.File(p, "r") as f:
            if "data" not in f:
                raise ConfigError(f"shuffle: {p} has no 'data' dataset")
            sizes.append(f["data"].shape[0])
            shapes.add((f["data"].shape[1:], f["data"].dtype.str))
            with_paths.add("img_path" in f)
    if len(shapes) > 1 or len(with_paths) > 1:
        raise ConfigError(f"shuffle: input files differ in row shape/dtype {sorted(shapes)} or in having "
                          f"img_path; shuffle only files of one dataset")
    # Marked unfinished until every chunk is written: a killed shuffle is not taken for a dataset.
    _write_json_atomic(dst / "data_params.json", {**params, "dataset_complete": False})
    members = _chunk_members(sizes, num_chunks, seed)
    jobs = [(c, [str(f) for f in files], members[c], str(dst)) for c in range(num_chunks) if len(members[c])]
    total = 0
    bar = tqdm(total=sum(sizes), unit="row", desc="shuffle", disable=not progress)
    if num_workers == 1:
        for job in jobs:
            n = _shuffle_write_chunk(job)
            total += n
            bar.update(n)
    else:
        import multiprocessing as mp

        with mp.get_context().Pool(min(num_workers, len(jobs))) as pool:
            for n in pool.imap_unordered(_shuffle_write_chunk, jobs):
                total += n
                bar.update(n)
    bar.close()
    params["shuffle"] = {"source": str(src), "num_chunks": num_chunks, "seed": seed, "n_examples": total}
    _write_json_atomic(dst / "data_params.json", {**params, "dataset_complete": True})
    print(f"shuffled {total} samples from {len(files)} file(s) into {len(jobs)} file(s) in {dst}")
    return total


# --------------------------------------------------------------------------------------------------------------
# Reader: image transforms (spec 3.3) with Pillow + numpy
# --------------------------------------------------------------------------------------------------------------

INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _size_hw(size: Any) -> tuple[int, int] | int:
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and len(size) in (1, 2):
        return (int(size[0]), int(size[-1])) if len(size) == 2 else int(size[0])
    raise ValueError(f"transform size must be an int or [h, w], found {size!r}")


def _t_expand_to_square(background_color=(0, 0, 0)):
    color = tuple(int(c) for c in background_color)

    def fn(img):
        from PIL import Image

        w, h = img.size
        if w == h:
            return img
        side = max(w, h)
        canvas = Image.new(img.mode, (side, side), color)
        canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        return canvas
    return fn


def _t_resize(size, interpolation="bilinear", max_size=None, antialias=None):
    size = _size_hw(size)
    if str(interpolation).lower() not in INTERPOLATIONS:
        raise ValueError(f"resize interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    resample = INTERPOLATIONS[str(interpolation).lower()]

    def fn(img):
        w, h = img.size
        if isinstance(size, tuple):
            new_h, new_w = size
        else:  # shorter side -> size, the other side scaled and truncated (torchvision / CLIPImageProcessor)
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size, int(size * long / short)
            if max_size is not None and new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) == (w, h):
            return img
        return img.resize((new_w, new_h), resample=resample)
    return fn


def _t_center_crop(size):
    size = _size_hw(size)
    th, tw = size if isinstance(size, tuple) else (size, size)

    def fn(img):
        from PIL import Image

        w, h = img.size
        if (w, h) == (tw, th):
            return img
        if w < tw or h < th:  # pad with zeros like torchvision, then crop
            canvas = Image.new(img.mode, (max(w, tw), max(h, th)))
            canvas.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
            img, (w, h) = canvas, canvas.size
        # floor offsets, as CLIPImageProcessor (torchvision rounds half to even, 1 px apart when (w-tw)%4 == 3)
        left, top = (w - tw) // 2, (h - th) // 2
        return img.crop((left, top, left + tw, top + th))
    return fn


def _t_to_tensor():
    def fn(img):
        arr = np.asarray(img)  # uint8 HWC
        if arr.ndim == 2:
            arr = arr[:, :, None]
        out = arr.transpose(2, 0, 1).astype(np.float32)  # one pass: CHW copy + cast
        out *= np.float32(1.0 / 255.0)
        return out
    return fn


def _t_normalize(mean, std):
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def fn(x):
        if not isinstance(x, np.ndarray):
            raise ValueError("normalize must come after to_tensor in the transforms list")
        x -= m
        x /= s
        return x
    return fn


# yaml transform name -> factory(**kwargs). Image -> image steps first, then to_tensor, then array steps.
TRANSFORMS: dict[str, Callable[..., Callable]] = {
    "expand_to_square": _t_expand_to_square,
    "resize": _t_resize,
    "center_crop": _t_center_crop,
    "to_tensor": _t_to_tensor,
    "normalize": _t_normalize,
}


def build_transforms(specs: list[dict] | None) -> Callable[[Any], np.ndarray]:
    """yaml `transforms` list ([{name: resize, size: 336, ...}, ...]) -> callable(PIL image) -> float32 CHW array.

    A to_tensor step is appended when the list has none."""
    steps = []
    seen_tensor = False
    for i, spec in enumerate(specs or []):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"transforms[{i}] must be a mapping with a 'name', found {spec!r}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
        if name not in TRANSFORMS:
            raise ValueError(f"transforms[{i}]: unknown transform {name!r}; supported: {', '.join(TRANSFORMS)}")
        try:
            steps.append(TRANSFORMS[name](**kwargs))
        except TypeError as e:
            raise ValueError(f"transforms[{i}] ({name}): bad arguments {kwargs}: {e}") from e
        seen_tensor = seen_tensor or name == "to_tensor"
    if not seen_tensor:
        steps.append(_t_to_tensor())

    def apply(img) -> np.ndarray:
        x = img
        for step in steps:
            x = step(x)
        return x
    return apply


# --------------------------------------------------------------------------------------------------------------
# Reader: H5 dataset and sampler (torch classes built on first use so that --help stays instant)
# --------------------------------------------------------------------------------------------------------------


def _h5_files(data_dir: str | os.PathLike) -> list[Path]:
    d = Path(data_dir)
    if not d.is_dir():
        raise DatasetError(f"data_dir {str(d)!r} not found; create it with create_hdf5_dataset.py")
    files = sorted(p for p in d.glob("*.h5") if p.is_file())
    if not files:
        others = sorted(p.name for p in d.iterdir())[:5]
        raise DatasetError(f"data_dir {str(d)!r} holds no .h5 files (found: {', '.join(others) or 'nothing'}); "
                           f"point data_dir at the output_dir of create_hdf5_dataset.py")
    return files


def _h5_shape(path: Path) -> tuple:
    """Shape of the `data` dataset of one H5 file; a file h5py cannot open is named with what to do."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or "img_path" not in f:
                raise DatasetError(f"{path}: expected 'data' and 'img_path' datasets (multimodal H5), found "
                                   f"{list(f.keys())}")
            return f["data"].shape
    except OSError as e:  # truncated copy, not HDF5 at all, damaged superblock
        raise DatasetError(f"{path}: not a readable H5 file ({e}); it is truncated or corrupt: copy it again or "
                           f"regenerate the dataset with create_hdf5_dataset.py") from None


def _make_reader_classes():
    import torch

    class LlavaH5Dataset(torch.utils.data.Dataset):
        """Map-style dataset over the H5 files of one or more directories (ours or Cerebras').

        Sample i -> {image_data [3,H,W] dtype, text_input_ids, loss_mask, labels, key_padding_mask int32 [MSL]}.
        H5 files are opened lazily in the process that reads them (never shared across a fork) and kept open."""

        def __init__(self, data_dir: str | list[str], img_data_dir: str | None, transforms: list[dict] | None,
                     image_data_size: tuple[int, int, int] = (3, 336, 336), dtype: torch.dtype = torch.float32,
                     on_bad_image: str = "error"):
            if on_bad_image not in ("error", "text_only"):
                raise ValueError(f"on_bad_image must be 'error' or 'text_only', found {on_bad_image!r}")
            dirs = [data_dir] if isinstance(data_dir, (str, os.PathLike)) else list(data_dir)
            if not dirs:
                raise ValueError("data_dir is empty")
            self.files: list[str] = []
            sizes, msl = [], None
            for d in dirs:
                problem = unfinished_dataset_problem(_read_data_params(Path(d)), d)
                if problem:
                    raise DatasetError(problem)
                for path in _h5_files(d):
                    shape = _h5_shape(path)
                    if len(shape) != 3 or shape[1] != 4:
                        raise DatasetError(f"{path}: data has shape {shape}; expected [n, 4, MSL] (input_ids, "
                                           f"loss_mask, labels, key_padding_mask)")
                    if msl is not None and shape[2] != msl:
                        raise DatasetError(f"{path}: MSL {shape[2]} differs from {msl} of {self.files[0]}")
                    msl = shape[2]
                    self.files.append(str(path))
                    sizes.append(shape[0])
            self.max_sequence_length = int(msl)
            self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self.img_data_dir = img_data_dir
            self.image_data_size = tuple(int(x) for x in image_data_size)
            self.dtype = dtype
            self.on_bad_image = on_bad_image
            self.transform = build_transforms(transforms)
            self.bad_image_count = 0
            self.data_params = _read_data_params(Path(dirs[0]))
            info = (self.data_params or {}).get("image_patch_info", {})
            num_patches = (self.data_params or {}).get("dataset", {}).get("num_patches")
            self._image_start = info.get("image_patch_start_idx")
            self._num_patches = info.get("num_patches", num_patches)
            self._mask_start = info.get("text_only_mask_start")
            self._handles: dict[int, Any] = {}
            self._pid = None

        def __len__(self) -> int:
            return int(self._starts[-1])

        def __getstate__(self):
            state = self.__dict__.copy()
            state["_handles"], state["_pid"] = {}, None  # h5py handles never cross processes
            return state

        def _file(self, k: int) -> tuple:
            """(h5 file, data dataset, img_path array) of file k, opened once per process."""
            if self._pid != os.getpid():  # first use in this process (e.g. a forked DataLoader worker)
                self._handles, self._pid = {}, os.getpid()
            entry = self._handles.get(k)
            if entry is None:
                import h5py

                f = h5py.File(self.files[k], "r")
                entry = self._handles[k] = (f, f["data"], f["img_path"][:, 0])  # paths are small: keep them
            return entry

        def read_sample(self, i: int) -> tuple[np.ndarray, torch.Tensor | None]:
            """(row [4, MSL] int32, transformed image or None): None for a text-only row, and for an image
            that could not be read under on_bad_image "text_only" (the row is then masked as text-only)."""
            n = len(self)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"sample {i} out of range for {n} samples")
            k = int(np.searchsorted(self._starts, i, side="right")) - 1
            j = i - int(self._starts[k])
            _, data, paths = self._file(k)
            try:
                row = np.asarray(data[j], dtype=np.int32)
            except OSError as e:  # a damaged compressed chunk
                raise DatasetError(f"{self.files[k]}: sample {j} cannot be read ({e}); the file is corrupt: copy "
                                   f"it again or regenerate the dataset with create_hdf5_dataset.py") from None
            rel = paths[j]
            rel = rel.decode("utf-8") if isinstance(rel, bytes) else str(rel)
            if rel == "None":
                return row, None
            return row, self._load_image(rel, k, j, row)

        def image_slots(self, row: np.ndarray) -> tuple[int, int]:
            """(first position, count) of the image slots of an image row."""
            start, npatch = self._image_start, self._num_patches
            if start is None or npatch is None:  # no data_params: the slots are the first run of pad ids
                start, npatch = _find_pad_run(row[0], row[2], npatch)
            return int(start), int(npatch)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            row, image = self.read_sample(i)
            if image is None:
                image = torch.zeros(self.image_data_size, dtype=self.dtype)
            return {
                "image_data": image,
                "text_input_ids": torch.from_numpy(row[0]),
                "loss_mask": torch.from_numpy(row[1]),
                "labels": torch.from_numpy(row[2]),
                "key_padding_mask": torch.from_numpy(row[3]),
            }

        def _load_image(self, rel: str, k: int, j: int, row: np.ndarray) -> torch.Tensor:
            from PIL import Image

            where = f"sample {j} of {self.files[k]}"
            if self.img_data_dir is None:
                raise ValueError(f"{where} has image {rel!r} but the reader's img_data_dir is not set")
            path = os.path.join(self.img_data_dir, rel)
            try:
                if not safe_relative_path(rel):
                    raise ValueError("the path is absolute or escapes img_data_dir with ../")
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ... on bad files
                if self.on_bad_image == "error":
                    raise ImageReadError(f"image {path!r} ({where}) cannot be read: {type(e).__name__}: {e}. "
                                         f"Fix or replace the file, or set on_bad_image: text_only "
                                         f"(train_input / eval_input) to train such samples without their "
                                         f"image; create_hdf5_dataset.py with dataset.check_images: true finds "
                                         f"such files before training") from e
                self.bad_image_count += 1
                if self.bad_image_count == 1:
                    print(f"warning: image {path!r} ({where}) cannot be read ({type(e).__name__}: {e}); "
                          f"training it as text-only (further bad images in this process are only counted)",
                          file=sys.stderr)
                self._mask_as_text_only(row)
                return None
            arr = self.transform(img)
            if tuple(arr.shape) != self.image_data_size:
                raise ValueError(f"the transforms turn {path!r} into shape {tuple(arr.shape)} but image_data_size "
                                 f"is {self.image_data_size}; make the resize/center_crop sizes match")
            return torch.from_numpy(arr).to(self.dtype)

        def _mask_as_text_only(self, row: np.ndarray) -> None:
            """Make an image row look like a text-only row: image slots (and phase 2's '▁') not attended."""
            start, npatch = self.image_slots(row)
            mstart = self._mask_start
            if mstart is None:
                mstart = start - 1 if start > 1 else start  # phase 2 also masks the '▁' before the image
            row[3, mstart:start + npatch] = 1
            row[1, start:start + npatch] = 0

    class ResumableSampler(torch.utils.data.Sampler):
        """Deterministic order: epoch e uses a permutation seeded by (seed, e) when shuffle else 0..n-1; the
        global order is split across ranks (rank r takes every world_size-th sample of the global order after
        dropping the remainder so all ranks get equal counts); infinite over epochs when num_epochs is None.
        start_sample = number of GLOBAL samples already consumed (resume point), so resuming at k continues
        exactly where an uninterrupted run would be.

        The epoch permutation is torch.randperm with a generator seeded seed + e (Cerebras' BaseSampler)."""

        def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                     world_size: int = 1, start_sample: int = 0, num_epochs: int | None = None):
            if world_size < 1 or not 0 <= rank < world_size:
                raise ValueError(f"rank {rank} / world_size {world_size} invalid")
            self.per_epoch = num_samples - num_samples % world_size
            if self.per_epoch <= 0:
                raise ValueError(f"{num_samples} samples cannot be split across {world_size} ranks")
            if start_sample < 0:
                raise ValueError(f"start_sample must be >= 0, found {start_sample}")
            self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
            self.rank, self.world_size = rank, world_size
            self.start_sample, self.num_epochs = start_sample, num_epochs

        def epoch_order(self, epoch: int) -> torch.Tensor:
            """Global order of epoch `epoch` (after dropping the remainder)."""
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed + epoch)
                return torch.randperm(self.num_samples, generator=g)[:self.per_epoch]
            return torch.arange(self.per_epoch)

        def __iter__(self):
            epoch, offset = divmod(self.start_sample, self.per_epoch)
            while self.num_epochs is None or epoch < self.num_epochs:
                order = self.epoch_order(epoch)
                first = offset + (self.rank - offset) % self.world_size  # first global position of this rank
                yield from order[first::self.world_size].tolist()
                epoch, offset = epoch + 1, 0

        def __len__(self) -> int:
            if self.num_epochs is None:
                raise TypeError("an infinite ResumableSampler (num_epochs=None) has no length")
            # global positions p in [start_sample, num_epochs * per_epoch) with p % world_size == rank
            end = self.num_epochs * self.per_epoch
            first = self.start_sample + (self.rank - self.start_sample) % self.world_size
            return max(0, (end - first + self.world_size - 1) // self.world_size)

    for cls in (LlavaH5Dataset, ResumableSampler):  # picklable by name (spawned DataLoader workers)
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return LlavaH5Dataset, ResumableSampler


class ImageReadError(RuntimeError):
    """An image named in an H5 file cannot be read at training time."""


class DatasetError(ValueError):
    """The H5 data folder cannot be used (no H5 files, a corrupt or unfinished dataset)."""


def _read_data_params(folder: Path) -> dict | None:
    path = folder / "data_params.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); regenerate it with create_hdf5_dataset.py") from None


def _find_pad_run(input_ids: np.ndarray, labels: np.ndarray, npatch: int | None) -> tuple[int, int]:
    """Start and length of the image slots: the first run of the pad id (= labels' trailing padding value)."""
    pad = int(labels[-1])
    is_pad = np.concatenate([[False], input_ids == pad, [False]])
    edges = np.flatnonzero(is_pad[1:] != is_pad[:-1])
    runs = list(zip(edges[::2], edges[1::2]))
    for a, b in runs:
        if npatch is None or b - a >= npatch:
            return int(a), int(npatch if npatch is not None else b - a)
    raise ValueError("cannot locate the image slots in this row (no data_params.json image_patch_info)")


_READER_CLASSES = None


def __getattr__(name: str):  # module attribute hook: builds the torch-based classes on first access
    global _READER_CLASSES
    if name in ("LlavaH5Dataset", "ResumableSampler"):
        if _READER_CLASSES is None:
            _READER_CLASSES = _make_reader_classes()
            globals()["LlavaH5Dataset"], globals()["ResumableSampler"] = _READER_CLASSES
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------------------
# Reader: sequence packing (train_input.packing)
# --------------------------------------------------------------------------------------------------------------
# Several samples share one MSL row; the H5 files stay as they are. A packed row puts the NP image tokens of its
# k-th image sample at row positions [k * NP, (k + 1) * NP) and every other attended token after the used image
# blocks, sample after sample. Each token carries its position in its own sample (RoPE restarts at 0) and its
# sample's segment id (1, 2, ...; 0 = padding), which the model turns into block-diagonal causal attention, so a
# sample computes exactly what it computes alone. Unused image blocks hold text (or padding): the row has fixed
# shapes (K image slots, MSL tokens), as the CSX path needs. A text-only sample drops its masked image slots and
# keeps its positions, so it costs only its real tokens.

PACK_INDEX_VERSION = 1
PACK_INDEX_NAME = "pack_index.npz"  # next to the H5 files; under PACK_INDEX_CACHE when the folder is read-only
PACK_INDEX_CACHE = Path.home() / ".cache" / "llava-pipeline" / "pack_index"
PACK_WINDOW = 16  # open rows a sample may join (first fit over a window, in the epoch's sample order)


def _pack_index_key(files: list[str]) -> str:
    """What the index was computed from: every H5 file's name, size and mtime (any rewrite invalidates it)."""
    entries = [[Path(f).name, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    return json.dumps({"version": PACK_INDEX_VERSION, "files": entries})


def _row_lengths_of_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(attended tokens per row, row has an image) of one H5 file, read in slabs of whole chunks."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            data, n = f["data"], f["data"].shape[0]
            tokens = np.empty(n, np.int32)
            for a in range(0, n, 512):
                tokens[a:a + 512] = (data[a:a + 512, 3, :] == 0).sum(axis=1)
            paths = f["img_path"][:, 0]
    except OSError as e:  # a damaged compressed chunk
        raise DatasetError(f"{path}: cannot be read for the packing index ({e}); the file is corrupt: copy it "
                           f"again or regenerate the dataset with create_hdf5_dataset.py") from None
    has_image = np.array([p not in (b"None", "None") for p in paths], dtype=bool)
    return tokens, has_image


def _pack_index_candidates(folder: Path) -> list[Path]:
    import hashlib

    digest = hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:16]
    return [folder / PACK_INDEX_NAME, PACK_INDEX_CACHE / f"{digest}.npz"]


def _load_pack_index(candidates: list[Path], key: str):
    for path in candidates:
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return z["tokens"], z["has_image"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable or older layout: recomputed below
    return None


def _save_pack_index(candidates: list[Path], key: str, tokens: np.ndarray, has_image: np.ndarray) -> None:
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), tokens=tokens, has_image=has_image)
            os.replace(tmp, path)
            return
        except OSError:
            continue  # read-only data folder: try the cache folder


def pack_index(files: list[str], progress: bool = True, workers: int | None = None) -> tuple:
    """(tokens, has_image) for every row of `files` in order, from the cached index when it is current.

    Computed once per data folder (a pass over the key_padding_mask rows, in `workers` processes) and saved as
    pack_index.npz beside the H5 files, or in ~/.cache/llava-pipeline/pack_index/ when that folder is read-only;
    recomputed when any H5 file's name, size or mtime changes."""
    by_folder: dict[Path, list[str]] = {}
    for f in files:
        by_folder.setdefault(Path(f).parent, []).append(f)
    tokens, has_image = [], []
    for folder, members in by_folder.items():
        key = _pack_index_key(members)
        candidates = _pack_index_candidates(folder)
        found = _load_pack_index(candidates, key)
        if found is None:
            found = _compute_pack_index(members, progress, workers)
            _save_pack_index(candidates, key, *found)
        tokens.append(found[0])
        has_image.append(found[1])
    return np.concatenate(tokens), np.concatenate(has_image)


def _compute_pack_index(files: list[str], progress: bool, workers: int | None) -> tuple:
    from tqdm import tqdm

    workers = workers or min(len(files), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 1)
    bar = tqdm(total=len(files), unit="file", desc="packing index", disable=not progress)
    try:
        if workers <= 1:
            parts = []
            for f in files:
                parts.append(_row_lengths_of_file(f))
                bar.update(1)
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                parts = []
                for part in pool.imap(_row_lengths_of_file, files):
                    parts.append(part)
                    bar.update(1)
    finally:
        bar.close()
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def plan_rows(order, tokens: np.ndarray, has_image: np.ndarray, msl: int, max_images: int,
              window: int = PACK_WINDOW) -> list[tuple[int, ...]]:
    """Rows of sample indices: each sample, in `order`, joins the first of the `window` most recently opened
    rows with room for its tokens and (if it has one) its image; else it opens a row, closing the oldest when
    `window` are open. Deterministic; every sample of `order` lands in exactly one row; no sample is split."""
    rows: list[tuple[int, ...]] = []
    open_rows: list[list] = []  # [free tokens, free image slots, members]
    for i in order:
        t, im = int(tokens[i]), int(has_image[i])
        for row in open_rows:
            if row[0] >= t and row[1] >= im:
                row[0] -= t
                row[1] -= im
                row[2].append(int(i))
                break
        else:
            if len(open_rows) == window:
                rows.append(tuple(open_rows.pop(0)[2]))
            open_rows.append([msl - t, max_images - im, [int(i)]])
    rows.extend(tuple(r[2]) for r in open_rows)
    return rows


def pack_row(samples: list, msl: int, max_images: int, image_tokens: int, image_size: tuple, dtype,
             slots_of) -> dict:
    """One packed row from [(row [4, MSL] int32, image tensor or None), ...] (see the section comment).

    slots_of(row) -> (first image slot, count) of an image row. Returns the row features (int32 [MSL]),
    image_data [K, C, H, W], image_valid [K], num_samples (a 0-d tensor). answer_start marks the first loss
    position of every answer span in the sample's own order (evaluation's first-answer-token accuracy)."""
    import torch

    # input_ids, loss_mask, labels, key_padding_mask (as the H5 row), position_ids, segment_ids, answer_start
    out = np.zeros((7, msl), np.int32)
    out[3] = 1
    images = torch.zeros((max_images, *image_size), dtype=dtype)
    valid = np.zeros(max_images, np.int32)
    n_images = sum(image is not None for _, image in samples)
    if n_images > max_images:
        raise ValueError(f"a packed row got {n_images} images for {max_images} slots")
    block, cursor = 0, n_images * image_tokens
    for seg, (row, image) in enumerate(samples, start=1):
        row = np.concatenate([row, (row[1] > 0)[None] & ~np.pad(row[1, :-1] > 0, (1, 0))[None]]).astype(np.int32)
        attended = np.flatnonzero(row[3] == 0)
        if image is not None:
            start, count = slots_of(row)
            if count != image_tokens:
                raise ValueError(f"an image row has {count} image slots but the model makes {image_tokens} tokens")
            slots = np.arange(start, start + count)
            dst = slice(block * image_tokens, (block + 1) * image_tokens)
            out[[0, 1, 2, 3, 6], dst], out[4, dst], out[5, dst] = row[:, slots], slots, seg
            images[block], valid[block] = image, 1
            block += 1
            attended = attended[(attended < start) | (attended >= start + count)]
        end = cursor + len(attended)
        if end > msl:
            raise ValueError(f"packed samples need {end} positions, the row has {msl}")
        out[[0, 1, 2, 3, 6], cursor:end], out[4, cursor:end], out[5, cursor:end] = row[:, attended], attended, seg
        cursor = end
    out[3, :cursor] = 0
    names = ("text_input_ids", "loss_mask", "labels", "key_padding_mask", "position_ids", "segment_ids",
             "answer_start")
    features = {name: torch.from_numpy(out[i].copy()) for i, name in enumerate(names)}
    return {"image_data": images, **features, "image_valid": torch.from_numpy(valid),
            "num_samples": torch.tensor(len(samples), dtype=torch.int32)}


class PackedDataset:
    """Packed rows over a LlavaH5Dataset: dataset[(i, j, ...)] is the row holding samples i, j, ... (an empty
    tuple is an all-padding row). Works in DataLoader worker processes like the dataset it wraps."""

    def __init__(self, base, max_images: int, image_tokens: int):
        if max_images < 1 or max_images * image_tokens > base.max_sequence_length:
            raise ValueError(f"max_images_per_row {max_images} x {image_tokens} image tokens must be between "
                             f"{image_tokens} and the row length {base.max_sequence_length}")
        self.base, self.max_images, self.image_tokens = base, max_images, image_tokens
        self.max_sequence_length = base.max_sequence_length

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, members: tuple) -> dict:
        samples = [self.base.read_sample(int(i)) for i in members]
        return pack_row(samples, self.max_sequence_length, self.max_images, self.image_tokens,
                        self.base.image_data_size, self.base.dtype, self.base.image_slots)


class PackedRowSampler:
    """The global stream of packed rows, epoch after epoch: epoch e packs the samples in the order of a
    torch.randperm seeded seed + e (0..n-1 without shuffle) with plan_rows. Rank r takes global rows r, r + W,
    r + 2W, ... of the stream, so the plan does not depend on the number of processes or workers, no sample is
    lost or repeated in an epoch, and start_row (global rows consumed) resumes exactly. A finite stream
    (num_epochs) is padded with empty rows to a multiple of world_size, so every rank gets as many rows."""

    def __init__(self, tokens: np.ndarray, has_image: np.ndarray, msl: int, max_images: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, start_row: int = 0,
                 num_epochs: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} invalid")
        self.tokens, self.has_image, self.msl, self.max_images = tokens, has_image, msl, max_images
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.start_row, self.num_epochs = start_row, num_epochs
        self._plans: dict[int, list] = {}

    def epoch_rows(self, epoch: int) -> list[tuple[int, ...]]:
        if epoch not in self._plans:
            import torch

            n = len(self.tokens)
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed + epoch)
                order = torch.randperm(n, generator=g).numpy()
            else:
                order = np.arange(n)
            self._plans = {epoch: plan_rows(order, self.tokens, self.has_image, self.msl, self.max_images)}
        return self._plans[epoch]

    def _stream(self):
        epoch = 0
        while self.num_epochs is None or epoch < self.num_epochs:
            yield from self.epoch_rows(epoch)
            epoch += 1
        if self.num_epochs is not None:
            total = sum(len(self.epoch_rows(e)) for e in range(self.num_epochs))
            yield from [()] * (-total % self.world_size)

    def __iter__(self):
        for g, row in enumerate(self._stream()):
            if g >= self.start_row and g % self.world_size == self.rank:
                yield row

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an infinite PackedRowSampler (num_epochs=None) has no length")
        total = sum(len(self.epoch_rows(e)) for e in range(self.num_epochs))
        total += -total % self.world_size
        first = self.start_row + (self.rank - self.start_row) % self.world_size
        return max(0, (total - first + self.world_size - 1) // self.world_size)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _bool_arg(s: str) -> bool:
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, found {s!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in PROCESSORS:
        p = sub.add_parser(mode, help=f"tokenize LLaVA jsonl into phase-{1 if mode.endswith('One') else 2} H5")
        p.add_argument("--params", required=True, help="preprocessing yaml (configs/llava_phase_*_preproc.yaml)")
        g = p.add_argument_group("overrides (win over the yaml only when given)")
        g.add_argument("--input_dir")
        g.add_argument("--metadata_files")
        g.add_argument("--output_dir")
        g.add_argument("--processes", type=int, help="0 = all cores")
        g.add_argument("--huggingface_tokenizer", help="local tokenizer folder")
        g.add_argument("--eos_id", type=int)
        g.add_argument("--pad_id", type=int)
        g.add_argument("--max_seq_length", "--max_sequence_length", dest="max_seq_length", type=int)
        g.add_argument("--output_name")
        g.add_argument("--files_per_record", type=int)
        g.add_argument("--write_remainder", type=_bool_arg)
        g.add_argument("--resume_from_checkpoint", type=_bool_arg)
        g.add_argument("--use_ftfy", type=_bool_arg)
        g.add_argument("--image_dir")
        g.add_argument("--num_patches", type=int)
        g.add_argument("--system_prompt_style", choices=[*PROMPT_STYLES, *CHAT_TEMPLATE_STYLES])
        g.add_argument("--prompt_prefix")
        g.add_argument("--completion_prefix")
        p.add_argument("--overwrite", action="store_true", help="replace the H5 files already in output_dir")
        p.add_argument("--no_progress", action="store_true", help="no progress bar")
    s = sub.add_parser("shuffle", help="shuffle samples (with their img_path) across H5 files")
    s.add_argument("input_dir")
    s.add_argument("output_dir")
    s.add_argument("--num_chunks", type=int, required=True, help="number of output files")
    s.add_argument("--num_workers", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no_progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.mode == "shuffle":
            shuffle(args.input_dir, args.output_dir, args.num_chunks, args.num_workers, args.seed,
                    overwrite=args.overwrite, progress=not args.no_progress)
            return 0
        overrides = {k: getattr(args, k) for k in CLI_OVERRIDES}
        cfg = load_config(args.params, args.mode, overrides)
        preprocess(args.mode, cfg, overwrite=args.overwrite, progress=False if args.no_progress else None)
        return 0
    except (ConfigError, YamlFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
