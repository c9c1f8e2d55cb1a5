"""The dataclasses each command parses, and a recipe parsed into them: YAML values first, `--field value` on top."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..config import DistillationConfig, parse_init_kwargs
from .errors import UsageError
from .fields import COMMAND_CLASSES
from .recipe import RecipeArguments


def _config_field(name: str):
    """A field with the default and help of `DistillationConfig.<name>`, so the two cannot drift apart."""
    spec = next(spec for spec in dataclasses.fields(DistillationConfig) if spec.name == name)
    return dataclasses.field(default=spec.default, metadata=spec.metadata)


@dataclass
class _TeacherFields:
    """The teacher and how it loads, shared by the commands that run a teacher without training."""

    teacher_model_name_or_path: str | None = _config_field("teacher_model_name_or_path")
    teacher_model_init_kwargs: dict[str, Any] | str | None = _config_field("teacher_model_init_kwargs")
    seed: int = _config_field("seed")

    def __post_init__(self):
        try:
            self.teacher_model_init_kwargs = parse_init_kwargs(self.teacher_model_init_kwargs)
        except ValueError as error:
            raise UsageError(str(error)) from None


@dataclass
class TeacherArguments(_TeacherFields):
    """The `DistillationConfig` fields `cache-teacher` reads: parsing them builds no `TrainingArguments`."""

    temperature: float = _config_field("temperature")
    distill_all_tokens: bool = _config_field("distill_all_tokens")
    teacher_server_url: str | None = _config_field("teacher_server_url")
    teacher_server_model: str | None = _config_field("teacher_server_model")
    teacher_server_top_k: int = _config_field("teacher_server_top_k")
    teacher_server_timeout: float = _config_field("teacher_server_timeout")
    teacher_server_retries: int = _config_field("teacher_server_retries")

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise UsageError(f"temperature={self.temperature} must be > 0.")
        if self.teacher_server_url is not None and self.temperature != 1.0:
            raise UsageError(
                f"--teacher_server_url with temperature={self.temperature}: a server gives log-probabilities at "
                "temperature 1 only; set --temperature 1."
            )


@dataclass
class GenerateArguments(_TeacherFields):
    """The `DistillationConfig` fields `generate-targets` reads: the teacher and how it answers."""

    max_new_tokens: int = _config_field("max_new_tokens")
    seq_kd_sampling: bool = _config_field("seq_kd_sampling")
    generation_temperature: float = _config_field("generation_temperature")

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens} must be >= 1 tokens per response.")
        if not self.generation_temperature > 0:
            raise UsageError(f"generation_temperature={self.generation_temperature} must be > 0.")


@dataclass
class EvalArguments:
    """The one `DistillationConfig` field `eval` reads: the seed that carves the held-out splits."""

    seed: int = _config_field("seed")


# Which dataclasses each command parses from the recipe and `--field value` options.
_CLASSES = {cls.__name__: cls for cls in (DistillationConfig, EvalArguments, TeacherArguments, GenerateArguments)}
COMMAND_FIELDS = {command: (RecipeArguments, _CLASSES[name]) for command, name in COMMAND_CLASSES.items()}


class _FieldParser(HfArgumentParser):
    def error(self, message):  # argparse would print the usage and exit
        raise UsageError(message)


def _field_names(*classes) -> set[str]:
    return {spec.name for cls in classes for spec in dataclasses.fields(cls)}


def parse_recipe(config_path: str | None, overrides: list[str], dataclass_types=None, command: str = "train"):
    """The dataclasses of `command` (RecipeArguments and DistillationConfig for train) from a YAML file, with
    `--field value` overrides on top. Raises `UsageError` (a `ValueError`) for a missing file or an unknown field."""
    dataclass_types = dataclass_types or COMMAND_FIELDS[command]
    parser = _FieldParser(dataclass_types)
    accepted = _field_names(*dataclass_types)
    if config_path:
        if not os.path.isfile(config_path):
            raise UsageError(
                f"recipe file {config_path!r} not found; give the path of a YAML recipe, like recipes/translation.yaml."
            )
        with open(config_path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f"line {mark.line + 1}: " if mark is not None else ""
                raise UsageError(
                    f"{config_path} is not valid YAML ({where}{getattr(error, 'problem', None) or error}); write one "
                    "`field: value` a line."
                ) from None
        if not isinstance(values, dict):
            raise UsageError(f"{config_path} must hold a mapping of field: value, not a {type(values).__name__}.")
        known = _field_names(RecipeArguments, DistillationConfig)
        unknown = sorted(set(values) - known)
        if unknown:
            match = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            raise UsageError(
                f"{config_path} sets unknown fields {unknown}" + (f" (did you mean {match[0]}?)" if match else "")
                + ". Fields are those of RecipeArguments and DistillationConfig (TrainingArguments included); see "
                "`hf-distill train --help`."
            )
        # A recipe holds training settings too; eval and cache-teacher take only the fields they use.
        values = {key: value for key, value in values.items() if key in accepted}
        parser.set_defaults(**_yaml_defaults(values, dataclass_types, config_path))
    namespace, rest = parser.parse_known_args(overrides)  # unknown options first: before any dataclass validates
    if rest:
        flag = next((arg for arg in rest if arg.startswith("-")), rest[0])
        name = flag.lstrip("-").replace("-", "_")
        if name in _field_names(RecipeArguments, DistillationConfig) - accepted:
            message = f"hf-distill {command} does not use {flag}"
            if name == "max_new_tokens":  # the training (on-policy) setting; metrics have their own
                message += " (the generation length of the metrics is --eval_max_new_tokens)"
        else:
            match = difflib.get_close_matches(name, sorted(accepted), n=1)
            message = f"unknown option {flag}" + (f" (did you mean --{match[0]}?)" if match else "")
        raise UsageError(f"{message}; see `hf-distill {command} --help`.")
    check_precision(namespace)
    parsed = parser.parse_args_into_dataclasses(args=overrides, look_for_args_file=False)
    return tuple(parsed)


def bf16_available() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def check_precision(settings) -> None:
    """A GPU recipe (`bf16: true`) on a machine without bf16 hardware: name the flag to change, where
    `TrainingArguments` would ask to "assign use_cpu"."""
    for flag in ("bf16", "bf16_full_eval"):
        if getattr(settings, flag, False) and not getattr(settings, "use_cpu", False) and not bf16_available():
            raise UsageError(
                f"{flag}=True needs a GPU with bfloat16 support (or a TPU), and this machine has none: pass "
                f"`--{flag} false` (or set `{flag}: false` in the recipe) to train in float32, or `--use_cpu true` "
                "for bfloat16 on the CPU."
            )


def _field_types(hint) -> list:
    """The types a field annotated `hint` takes, None left out: `int | None` gives [int]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [member for member in typing.get_args(hint) if member is not type(None)]
    return [hint]


def _convert(kind, value):
    """A YAML scalar as a field of type `kind` holds it; strings go to argparse, which converts them itself."""
    if kind is bool:
        return string_to_bool(str(value))
    if kind in (int, float) and not isinstance(value, bool):
        return kind(str(value))
    if kind in (int, float):
        raise ValueError(value)
    return str(value)


def _yaml_defaults(values: dict, dataclass_types, config_path: str) -> dict:
    """The recipe's values as the parser's defaults, checked against the fields' annotations. argparse converts
    string defaults as if they were typed on the command line, but takes a YAML list, mapping or number as is, so
    one of the wrong kind would reach the dataclasses and fail deep inside training."""
    hints = {name: hint for cls in dataclass_types for name, hint in typing.get_type_hints(cls).items()}
    defaults = {spec.name: spec.default for cls in dataclass_types for spec in dataclasses.fields(cls)}
    typed = {}
    for key, value in values.items():
        kinds = _field_types(hints[key])
        origins = [typing.get_origin(kind) or kind for kind in kinds]
        takes_list = origins == [list]  # HfArgumentParser reads `list[X]` fields as `--field x y ...`
        kind = (typing.get_args(kinds[0]) or (str,))[0] if takes_list else kinds[0]
        try:
            if value is None or (isinstance(value, str) and not takes_list):
                typed[key] = value
            elif isinstance(value, list) and takes_list:
                typed[key] = [_convert(kind, item) for item in value]
            elif isinstance(value, (list, dict)) and type(value) in origins:  # `list[str] | str`, `dict | str`: as is
                typed[key] = value
            elif takes_list or isinstance(value, (list, dict)):
                raise ValueError(value)
            else:
                typed[key] = _convert(kind, value)
        except (ValueError, TypeError):
            name = "true or false" if kind is bool else getattr(kind, "__name__", "value")
            default = defaults[key]
            if takes_list:
                example = f"[{value!r}]" if not isinstance(value, (list, dict)) else f"[<{name}>, ...]"
            else:
                example = json.dumps(default) if isinstance(default, (int, float, str)) else f"<one {name}>"
            wanted = f"a list of {name}" if takes_list else f"one {name}"
            raise UsageError(f"{config_path}: {key}={value!r} is not {wanted}; write it like `{key}: {example}`.") from None
    return typed
