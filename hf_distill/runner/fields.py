"""The fields of the recipe dataclasses, read from their source files, for `hf-distill ... --help`.

`DistillationConfig` is a `TrainingArguments`, and importing either imports torch: seconds, and warnings from
its extensions, before any help could print. Their fields are plain `name: type = field(default=...,
metadata={"help": ...})` statements, so the help reads them with `ast` instead of importing the classes.
tests/test_cli.py checks that what is read here matches the dataclasses' own fields, defaults and help.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # hf_distill/
UNKNOWN = object()  # a value the source computes: left out of the help


@dataclass
class FieldHelp:
    name: str
    annotation: str
    default: Any = UNKNOWN
    help: str = ""
    choices: list | None = None

    @property
    def types(self) -> list[str]:
        """The annotation's members other than None: `int | None` and `Optional[int]` give ["int"]."""
        annotation = self.annotation
        if annotation.startswith(("Optional[", "Union[")) and annotation.endswith("]"):
            annotation = annotation[annotation.index("[") + 1 : -1].replace(", ", " | ")
        return [member for member in annotation.split(" | ") if member not in ("None", "NoneType")]

    @property
    def takes_list(self) -> bool:  # HfArgumentParser gives `list[X]` and `list[X] | None` fields nargs="+"
        return len(self.types) == 1 and self.types[0].startswith("list[")

    @property
    def is_bool(self) -> bool:
        return self.types == ["bool"]


def source_of(module: str) -> str:
    """The file of `hf_distill.<module>` (dotted) or of a `transformers` module, found without importing it."""
    if module.startswith("transformers."):
        root = importlib.util.find_spec("transformers").submodule_search_locations[0]
        parts, base = module.split(".")[1:], root
    else:
        parts, base = module.split("."), PACKAGE
    path = os.path.join(base, *parts)
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


@functools.lru_cache(maxsize=None)
def _module(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as handle:
        return ast.parse(handle.read(), filename=path)


def _imported_from(path: str, name: str) -> str | None:
    """The file a module-level `from .x import name` in `path` reads `name` from."""
    here = os.path.dirname(path)
    for node in _module(path).body:
        if isinstance(node, ast.ImportFrom) and node.level and any(alias.name == name for alias in node.names):
            base = here
            for _ in range(node.level - 1):
                base = os.path.dirname(base)
            target = os.path.join(base, *(node.module or "").split("."))
            return os.path.join(target, "__init__.py") if os.path.isdir(target) else target + ".py"
    return None


def _value(node: ast.AST, path: str, depth: int = 0) -> Any:
    """A literal, or a module-level constant (followed through relative imports) built from literals; else UNKNOWN."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if depth > 8:  # a chain of names this long is computed, not written
        return UNKNOWN
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "keys" and not node.args:  # a dict's keys
        value = _value(node.func.value, path, depth + 1)
        return list(value) if isinstance(value, dict) else UNKNOWN
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("list", "tuple") and len(node.args) == 1:
        value = _value(node.args[0], path, depth + 1)
        return UNKNOWN if value is UNKNOWN else list(value)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = []
        for item in node.elts:
            starred = isinstance(item, ast.Starred)
            value = _value(item.value if starred else item, path, depth + 1)
            if value is UNKNOWN:
                return UNKNOWN
            items.extend(value) if starred else items.append(value)
        return items
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):  # "help " + "text"
        left, right = _value(node.left, path, depth + 1), _value(node.right, path, depth + 1)
        return UNKNOWN if UNKNOWN in (left, right) else left + right
    if isinstance(node, ast.Name):
        for statement in _module(path).body:
            if not isinstance(statement, ast.Assign):
                continue
            for target in statement.targets:
                if getattr(target, "id", None) == node.id:
                    return _value(statement.value, path, depth + 1)
                if isinstance(target, ast.Tuple) and isinstance(statement.value, ast.Tuple):  # A, B = "a", "b"
                    for name, value in zip(target.elts, statement.value.elts):
                        if getattr(name, "id", None) == node.id:
                            return _value(value, path, depth + 1)
        origin = _imported_from(path, node.id)
        if origin and os.path.isfile(origin):
            return _value(node, origin, depth + 1)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):  # an enum member: TaskKind.CAUSAL
        members = enum_values(path, node.value.id)
        return members.get(node.attr, UNKNOWN) if members else UNKNOWN
    return UNKNOWN


def _find_class(path: str, name: str) -> tuple[str, ast.ClassDef] | None:
    """(file, class) of the class `name` defined in `path` or imported into it (relative imports)."""
    for node in _module(path).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return path, node
    origin = _imported_from(path, name)
    return _find_class(origin, name) if origin and os.path.isfile(origin) else None


def enum_values(path: str, name: str) -> dict[str, Any] | None:
    """The members of an enum class `name` (as seen from `path`) with literal values; None if it is no enum."""
    found = _find_class(path, name)
    if found is None or not any("Enum" in ast.unparse(base) for base in found[1].bases):
        return None
    members = {}
    for statement in found[1].body:
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            value = _value(statement.value, found[0])
            if value is not UNKNOWN:
                members[statement.targets[0].id] = value
    return members


def _class(path: str, name: str) -> ast.ClassDef:
    return next(node for node in _module(path).body if isinstance(node, ast.ClassDef) and node.name == name)


def dataclass_fields(module: str, name: str, resolve=None) -> list[FieldHelp]:
    """The fields of dataclass `name` in `module`, its bases in the same file first (as `dataclasses.fields` orders
    them). `resolve(field_name)` gives the field a call like `_config_field("seed")` copies."""
    path = source_of(module)
    node = _class(path, name)
    fields = []
    for base in node.bases:
        if isinstance(base, ast.Name) and any(
            isinstance(n, ast.ClassDef) and n.name == base.id for n in _module(path).body
        ):
            fields += dataclass_fields(module, base.id, resolve)
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        spec = FieldHelp(statement.target.id, ast.unparse(statement.annotation))
        call = statement.value
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "field":
            keywords = {keyword.arg: keyword.value for keyword in call.keywords}
            if "init" in keywords and _value(keywords["init"], path) is False:
                continue  # not an argument
            if "default" in keywords:
                spec.default = _value(keywords["default"], path)
            elif getattr(keywords.get("default_factory"), "id", None) in ("list", "dict"):
                spec.default = [] if keywords["default_factory"].id == "list" else {}
            metadata = _value(keywords["metadata"], path) if "metadata" in keywords else {}
            if metadata is UNKNOWN and isinstance(keywords["metadata"], ast.Dict):  # help known, choices computed
                metadata = {_value(k, path): _value(v, path) for k, v in zip(keywords["metadata"].keys, keywords["metadata"].values)}
            if isinstance(metadata, dict):
                spec.help = metadata.get("help", "") if metadata.get("help") is not UNKNOWN else ""
                choices = metadata.get("choices")
                spec.choices = None if choices is UNKNOWN or choices is None else list(choices)
        elif isinstance(call, ast.Call) and resolve is not None and call.args:  # _config_field("name")
            copied = resolve(_value(call.args[0], path))
            spec.default, spec.help, spec.choices = copied.default, copied.help, copied.choices
        elif call is not None:
            spec.default = _value(call, path)
        if spec.choices is None:  # an enum type (`SchedulerType | str`): HfArgumentParser offers its values
            enums = [enum_values(path, member) for member in spec.types if member != "str" and member.isidentifier()]
            if len(enums) == 1 and enums[0]:
                spec.choices = list(enums[0].values())
        fields.append(spec)
    return fields


@functools.lru_cache(maxsize=None)
def training_fields() -> tuple[FieldHelp, ...]:
    return tuple(dataclass_fields("transformers.training_args", "TrainingArguments"))


@functools.lru_cache(maxsize=None)
def config_fields() -> tuple[FieldHelp, ...]:
    """DistillationConfig's fields: TrainingArguments' first, then its own."""
    return training_fields() + tuple(dataclass_fields("config", "DistillationConfig"))


@functools.lru_cache(maxsize=None)
def recipe_fields() -> tuple[FieldHelp, ...]:
    return tuple(dataclass_fields("runner.recipe", "RecipeArguments"))


# Besides RecipeArguments, the dataclass each command parses (runner/arguments.py defines the last three).
COMMAND_CLASSES = {
    "train": "DistillationConfig",
    "eval": "EvalArguments",
    "cache-teacher": "TeacherArguments",
    "generate-targets": "GenerateArguments",
}


def command_fields(command: str) -> tuple[FieldHelp, ...]:
    """The fields `hf-distill <command>` reads: RecipeArguments', then its own dataclass's."""
    name = COMMAND_CLASSES[command]
    if name == "DistillationConfig":
        return recipe_fields() + config_fields()
    by_name = {spec.name: spec for spec in config_fields()}
    return recipe_fields() + tuple(dataclass_fields("runner.arguments", name, resolve=by_name.__getitem__))
