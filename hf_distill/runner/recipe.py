"""`RecipeArguments`: what a recipe trains on (models, data, columns, task format) beside `DistillationConfig`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from datasets import DatasetDict, load_dataset, load_from_disk
from transformers.utils import logging

from ..data import TEACHER_PROMPT_COLUMN
from ..modeling import CAUSAL, CLASSIFICATION, SEQ2SEQ, load_model, student_from_teacher
from ..pruning import prune_student
from ..quantization import QUANTIZATION_SCHEMES, check_scheme
from .metrics import METRIC_NAMES
from .tasks import MODEL_COLUMNS, prompt_ids, tokenize_causal, tokenize_classification, tokenize_seq2seq, tokenize_text

logger = logging.get_logger(__name__)

TASKS = (CAUSAL, SEQ2SEQ, CLASSIFICATION)


@dataclass
class RecipeArguments:
    r"""
    Models, data and task format of a recipe, beside [`DistillationConfig`]. Every field can be set in the recipe's
    YAML file and overridden on the command line as `--field value`.

    Args:
        task (`str`, defaults to `"causal"`):
            causal (prompt → response), seq2seq (source → target) or classification (text → label).
        student_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the student (student_init=pretrained).
        student_init (`str`, defaults to `"pretrained"`):
            pretrained: load student_model_name_or_path. from_teacher: copy the teacher and keep only
            student_layers of its layers (DistilBERT-style).
        student_layers (`list[int]`, *optional*):
            With student_init=from_teacher: indices of the teacher layers to keep, e.g. 0 10 20 29. Default:
            every other layer.
        student_num_layers (`int`, *optional*):
            Make the student from the teacher with this many layers, chosen by block influence on calibration
            rows of the training data (`hf_distill.pruning`); implies student_init=from_teacher.
        student_intermediate_size (`int`, *optional*):
            Also prune every MLP to this many channels by activation importance (Llama-style gated MLPs).
        calibration_rows (`int`, defaults to `16`):
            Training rows the pruning scores layers and channels on.
        packing (`bool`, defaults to `False`):
            Plain-text language modeling (causal): each row's text (text_column, or source_lang of
            translation_column) is tokenized whole, every token is a target, and the rows are joined with EOS
            and packed into max_length blocks.
        tokenizer_name_or_path (`str`, *optional*):
            Tokenizer to use; defaults to the student's, else the teacher's.
        dataset_name (`str`, *optional*):
            A Hub dataset id, a folder written by save_to_disk, or a local data file
            (.json/.jsonl/.csv/.parquet).
        dataset_config_name (`str`, *optional*):
            The dataset's configuration name.
        data_files (`str`, *optional*):
            Local json/jsonl/csv/parquet file(s) (a glob works); overrides dataset_name.
        train_split (`str`, defaults to `"train"`):
            Split to train on.
        eval_split (`str`, *optional*):
            Split for evaluation during training; carved from train when absent.
        test_split (`str`, *optional*):
            Split for the final report; carved from train when absent.
        held_out_size (`int`, defaults to `200`):
            Rows carved from train for each missing eval/test split (shuffled, seeded).
        max_train_samples (`int`, *optional*):
            Use at most this many training rows.
        max_eval_samples (`int`, *optional*):
            Use at most this many eval/test rows.
        prompt_column (`str`, defaults to `"prompt"`):
            causal: the column with the prompt text.
        response_column (`str`, defaults to `"response"`):
            causal: the column with the answer text.
        source_column (`str`, defaults to `"source"`):
            seq2seq / translation: source text column.
        target_column (`str`, defaults to `"target"`):
            seq2seq / translation: target text column.
        text_column (`str`, defaults to `"text"`):
            classification / sentiment: the text column.
        label_column (`str`, defaults to `"label"`):
            classification / sentiment: the label column.
        translation_column (`str`, *optional*):
            A column of {lang: text} dicts (as in Hub translation datasets); with source_lang and target_lang it
            gives source and target.
        source_lang (`str`, defaults to `"en"`):
            Source language key in translation_column.
        target_lang (`str`, defaults to `"es"`):
            Target language key in translation_column.
        prompt_template (`str`, defaults to `"{source}"`):
            Format string for the prompt (causal) or source (seq2seq), over the row's fields (source, text,
            ...), e.g. 'Translate English to Spanish: {source}'.
        label_words (`list[str]`, *optional*):
            Causal sentiment: the answer word of each label id (e.g. negative positive). The model is scored by
            which word it finds most likely, with no free-form parsing.
        use_chat_template (`bool`, defaults to `True`):
            Wrap causal prompts in the tokenizer's chat template when it has one.
        max_length (`int`, defaults to `256`):
            Maximum tokens of a training row (prompt + response).
        max_target_length (`int`, defaults to `128`):
            seq2seq: maximum target tokens.
        min_response_tokens (`int`, defaults to `1`):
            Rows whose response would keep fewer tokens after truncation are dropped (counted).
        baseline (`bool`, defaults to `False`):
            Also train the same student for the same steps without a teacher (alpha=0) and compare.
        baseline_learning_rate (`float`, *optional*):
            The baseline's learning rate, where it trains best at another than the distilled run's (None: the same).
        eval_max_new_tokens (`int`, defaults to `64`):
            Generation length for translation metrics (on-policy training has its own `max_new_tokens`).
        num_samples (`int`, defaults to `5`):
            Generated samples shown in the report.
        metrics (`list[str]`, *optional*):
            More metrics for the report, computed on the same predictions as the task's own: built-in names
            (accuracy, f1, bleu, chrf) or paths of `evaluate` metric scripts (loaded with `evaluate.load`). Each
            number a metric returns becomes a column.
        quantize (`str`, defaults to `"none"`):
            After training, also export the student quantized (`int8` / `int4`, weight-only, torchao) to
            `output_dir/quantized-<scheme>` and add its row (bytes on disk, latency, metrics) to the report.
        stages (`list[dict]`, *optional*):
            A teacher-assistant chain: each stage distills the previous stage's student (the first stage's
            teacher is the recipe's) into a smaller one, with its own overrides of the student-building fields
            (student_num_layers, student_layers, student_intermediate_size) and of DistillationConfig fields
            (max_steps, alpha, learning_rate, ...). The last stage is the recipe's run (report, baseline, export
            in output_dir); earlier ones go to output_dir/stage-<i>, are evaluated in the report, and are reused
            when a rerun finds them finished with the same settings.
    """

    task: str = field(
        default=CAUSAL,
        metadata={"help": "causal (prompt → response), seq2seq (source → target) or classification (text → label).",
                  "choices": list(TASKS)},
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the student (student_init=pretrained)."}
    )
    student_init: str = field(
        default="pretrained",
        metadata={"help": "pretrained: load student_model_name_or_path. from_teacher: copy the teacher and keep "
                  "only student_layers of its layers (DistilBERT-style).", "choices": ["pretrained", "from_teacher"]},
    )
    student_layers: list[int] | None = field(
        default=None,
        metadata={"help": "With student_init=from_teacher: indices of the teacher layers to keep, e.g. 0 10 20 29. "
                  "Default: every other layer."},
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Make the student from the teacher with this many layers, chosen by block influence on "
                  "calibration rows of the training data (hf_distill.pruning); implies student_init=from_teacher."},
    )
    student_intermediate_size: int | None = field(
        default=None,
        metadata={"help": "Also prune every MLP to this many channels by activation importance (Llama-style MLPs)."},
    )
    calibration_rows: int = field(default=16, metadata={"help": "Training rows the pruning scores layers and channels on."})
    packing: bool = field(
        default=False,
        metadata={"help": "Plain-text LM (causal): each row's text is tokenized whole, every token a target, rows joined "
                  "with EOS and packed into max_length blocks. The text is text_column where the data has it, else the "
                  "source_lang side of translation_column; .txt files are read a paragraph (blank-line separated) a row."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use; defaults to the student's, else the teacher's."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset id, a folder written by save_to_disk, a local data file "
                  "(.json/.jsonl/.csv/.parquet/.txt) or a folder of .txt files."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_files: str | None = field(
        default=None, metadata={"help": "Local json/jsonl/csv/parquet/txt file(s) (a glob works); overrides dataset_name."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split for evaluation during training; carved from train when absent."}
    )
    test_split: str | None = field(
        default=None, metadata={"help": "Split for the final report; carved from train when absent."}
    )
    held_out_size: int = field(
        default=200, metadata={"help": "Rows carved from train for each missing eval/test split (shuffled, seeded)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval/test rows."})
    prompt_column: str = field(default="prompt", metadata={"help": "causal: the column with the prompt text."})
    response_column: str = field(default="response", metadata={"help": "causal: the column with the answer text."})
    source_column: str = field(default="source", metadata={"help": "seq2seq / translation: source text column."})
    target_column: str = field(default="target", metadata={"help": "seq2seq / translation: target text column."})
    text_column: str = field(
        default="text", metadata={"help": "classification / sentiment, and plain-text LM (packing): the text column."}
    )
    label_column: str = field(default="label", metadata={"help": "classification / sentiment: the label column."})
    translation_column: str | None = field(
        default=None,
        metadata={"help": "A column of {lang: text} dicts (as in Hub translation datasets); with source_lang and "
                  "target_lang it gives source and target."},
    )
    source_lang: str = field(default="en", metadata={"help": "Source language key in translation_column."})
    target_lang: str = field(default="es", metadata={"help": "Target language key in translation_column."})
    prompt_template: str = field(
        default="{source}",
        metadata={"help": "Format string for the prompt (causal) or source (seq2seq), over the row's fields "
                  "(source, text, ...), e.g. 'Translate English to Spanish: {source}'."},
    )
    label_words: list[str] | None = field(
        default=None,
        metadata={"help": "Causal sentiment: the answer word of each label id (e.g. negative positive). The model is "
                  "scored by which word it finds most likely, with no free-form parsing."},
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "Wrap causal prompts in the tokenizer's chat template when it has one."}
    )
    max_length: int = field(default=256, metadata={"help": "Maximum tokens of a training row (prompt + response)."})
    max_target_length: int = field(default=128, metadata={"help": "seq2seq: maximum target tokens."})
    min_response_tokens: int = field(
        default=1, metadata={"help": "Rows whose response would keep fewer tokens after truncation are dropped (counted)."}
    )
    baseline: bool = field(
        default=False,
        metadata={"help": "Also train the same student for the same steps without a teacher (alpha=0) and compare."},
    )
    baseline_learning_rate: float | None = field(
        default=None,
        metadata={"help": "The baseline's learning rate, where it trains best at another than the distilled run's "
                  "(None: the same). A fair comparison gives each run its best rate."},
    )
    eval_max_new_tokens: int = field(
        default=64,
        metadata={"help": "Generation length for translation metrics (on-policy training has its own max_new_tokens)."},
    )
    num_samples: int = field(default=5, metadata={"help": "Generated samples shown in the report."})
    metrics: list[str] | None = field(
        default=None,
        metadata={"help": "More metrics for the report, computed on the same predictions as the task's own: built-in "
                  "names (accuracy, f1, bleu, chrf) or paths of `evaluate` metric scripts (loaded with evaluate.load). "
                  "Each number a metric returns becomes a column."},
    )
    quantize: str = field(
        default="none",
        metadata={"help": "After training, also export the student quantized (int8 / int4 weight-only, torchao) to "
                  "output_dir/quantized-<scheme> and report it.", "choices": list(QUANTIZATION_SCHEMES)},
    )
    stages: list[dict] | str | None = field(
        default=None,
        metadata={"help": "A teacher-assistant chain: a list of stages, each a mapping of overrides (student_num_layers, "
                  "max_steps, alpha, ...), e.g. [{student_num_layers: 20}, {student_num_layers: 10}]. The last stage "
                  "is the recipe's run; earlier ones train in output_dir/stage-<i> and are reused when finished."},
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}; choose one of {', '.join(TASKS)}.")
        if self.student_init not in ("pretrained", "from_teacher"):
            raise ValueError(f"student_init={self.student_init!r}; choose pretrained or from_teacher.")
        if self.student_num_layers is not None or self.student_intermediate_size is not None:
            if self.student_model_name_or_path:
                raise ValueError(
                    "student_num_layers / student_intermediate_size make the student from the teacher; drop "
                    f"student_model_name_or_path={self.student_model_name_or_path!r}, or drop them to load that student."
                )
            self.student_init = "from_teacher"
        if self.student_init == "pretrained" and not self.student_model_name_or_path:
            raise ValueError(
                "student_model_name_or_path is required with student_init=pretrained (or make the student from the "
                "teacher with student_num_layers)."
            )
        if self.packing and self.task != CAUSAL:
            raise ValueError(f"packing=True is plain-text language modeling, for task=causal (not {self.task!r}).")
        if self.dataset_name is None and self.data_files is None:
            raise ValueError("Give the data: dataset_name (Hub id, save_to_disk folder or file) or data_files.")
        check_scheme("quantize", self.quantize)
        rate = self.baseline_learning_rate
        if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"baseline_learning_rate={rate!r} must be a number > 0 (or leave it unset: the distilled run's).")
        for metric in self.metrics or []:  # refused now, not after training
            if metric not in METRIC_NAMES and not os.path.exists(metric):
                raise ValueError(
                    f"metrics: {metric!r} is neither a built-in metric ({', '.join(METRIC_NAMES)}) nor the path of an "
                    "`evaluate` metric script; give one of those."
                )
        self.stages = parse_stages(self.stages)


# Fields a stage of a chain may set on the recipe (how its student is made); the rest go to DistillationConfig.
STAGE_RECIPE_FIELDS = ("student_num_layers", "student_layers", "student_intermediate_size", "calibration_rows")


def parse_stages(stages) -> list[dict] | None:
    """`stages` as a list of mappings (a JSON string from a command line is parsed), each checked for known fields."""
    if stages is None or stages == []:
        return None
    if isinstance(stages, str):
        try:
            stages = json.loads(stages)
        except json.JSONDecodeError as error:
            raise ValueError(f"stages={stages!r} is not valid JSON ({error}); write it like '[{{\"student_num_layers\": 20}}, {{}}]'.") from None
    if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
        raise ValueError(f"stages={stages!r} must be a list of mappings, like [{{student_num_layers: 20}}, {{student_num_layers: 10}}].")
    from ..config import DistillationConfig  # the config module imports nothing of the runner

    allowed = set(STAGE_RECIPE_FIELDS) | {spec.name for spec in dataclasses.fields(DistillationConfig)}
    allowed -= {"output_dir", "teacher_model_name_or_path", "teacher_cache", "resume_from_checkpoint", "push_to_hub"}
    for i, stage in enumerate(stages, 1):
        unknown = sorted(set(stage) - allowed)
        if unknown:
            raise ValueError(
                f"stage {i} of stages sets {unknown}, which a stage cannot set: give each stage student-building fields "
                f"({', '.join(STAGE_RECIPE_FIELDS)}) or DistillationConfig fields such as max_steps and alpha."
            )
    return stages


# ---- data ----------------------------------------------------------------------------------------

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Plain text is read a paragraph a row: a unit of meaning to hold out, and lines of wrapped prose stay together.
_BUILDER_KWARGS = {"text": {"sample_by": "paragraph"}}


def builder_for(path: str) -> str:
    extension = os.path.splitext(path.replace("*", ""))[1].lower()
    if extension not in _FILE_BUILDERS:
        raise ValueError(f"Cannot read {path!r}: use a .json, .jsonl, .csv, .parquet or .txt file, a folder of .txt "
                         "files, or a save_to_disk folder.")
    return _FILE_BUILDERS[extension]


def _text_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(".txt"))


def _load_files(builder: str, files, source: str):
    try:
        return load_dataset(builder, data_files=files, **_BUILDER_KWARGS.get(builder, {}))
    except (StopIteration, ValueError) as error:  # what `datasets` raises for a file without rows
        if isinstance(error, ValueError) and "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"data file {source!r} has no rows; give a file with at least one row.") from None


def load_raw_splits(recipe: RecipeArguments, seed: int = 42):
    """A `DatasetDict` with train, eval and test splits; missing held-out splits are carved from train."""
    source = recipe.data_files or recipe.dataset_name
    if recipe.data_files or os.path.isfile(source):
        splits = _load_files(builder_for(source), source, source)
    elif os.path.isdir(source) and any(
        os.path.exists(os.path.join(source, name)) for name in ("dataset_dict.json", "dataset_info.json")
    ):
        splits = load_from_disk(source)
        splits = splits if isinstance(splits, DatasetDict) else DatasetDict({"train": splits})
    elif os.path.isdir(source) and _text_files(source):
        splits = _load_files("text", _text_files(source), source)
    else:
        try:
            splits = load_dataset(source, recipe.dataset_config_name)
        except ConnectionError as error:  # `datasets` raises it for the Hub offline or unreachable
            raise ValueError(
                f"dataset_name={source!r} is not a local file or folder and cannot be fetched from the Hub ({error}); "
                "download it while online, or give a local data file or save_to_disk folder."
            ) from None
    for name, split in (("train", recipe.train_split), ("eval", recipe.eval_split), ("test", recipe.test_split)):
        if split is not None and split not in splits:
            raise ValueError(f"The data has splits {list(splits)}, not {name}_split={split!r}; set {name}_split to one of them.")
        if split is not None and len(splits[split]) == 0:
            raise ValueError(f"{name}_split={split!r} of the data has no rows; give a split with rows, or leave {name}_split "
                             "unset to carve it from train.")
    train = splits[recipe.train_split].shuffle(seed=seed)  # canonical orders (books, dates) must not leak
    held = {}
    for name, split in (("eval", recipe.eval_split), ("test", recipe.test_split)):
        if split is not None:
            held[name] = splits[split]
        else:
            if len(train) <= recipe.held_out_size:
                unit = " (paragraphs: blank-line separated text)" if "text" in train.column_names and len(
                    train.column_names) == 1 else ""
                raise ValueError(
                    f"Only {len(train)} training rows{unit}: too few to carve a {name} split of {recipe.held_out_size}. "
                    f"Give {name}_split or a smaller held_out_size."
                )
            held[name] = train.select(range(recipe.held_out_size))
            train = train.select(range(recipe.held_out_size, len(train)))
    if recipe.max_train_samples:
        train = train.select(range(min(recipe.max_train_samples, len(train))))
    if recipe.max_eval_samples:
        held = {k: v.select(range(min(recipe.max_eval_samples, len(v)))) for k, v in held.items()}
    return DatasetDict({"train": train, **held})


def to_task_rows(dataset, recipe: RecipeArguments):
    """Rename the user's columns into the task's fields: prompt/response, source/target or text/label.

    Causal rows that hold prompt/response columns but not the recipe's `translation_column` (the folder written by
    `hf-distill generate-targets`) are read as prompt → response. Plain text (`packing`) is `text_column` where the
    data has it, else the source side of `translation_column`.
    """
    columns = dataset.column_names
    if recipe.translation_column and recipe.translation_column not in columns and (
        (recipe.task == CAUSAL and {recipe.prompt_column, recipe.response_column} <= set(columns))
        or (recipe.packing and recipe.text_column in columns)
    ):
        recipe = dataclasses.replace(recipe, translation_column=None)
    if recipe.packing and recipe.text_column in columns:
        recipe = dataclasses.replace(recipe, translation_column=None)

    def require(*names):
        missing = [n for n in names if n not in columns]
        if missing:
            raise ValueError(
                f"The data has columns {columns} but the recipe needs {missing}; set the matching *_column option "
                "(prompt_column, response_column, source_column, target_column, text_column, label_column, "
                "translation_column)."
            )

    # With packing only the source side is read, so only its key must be there.
    languages = (recipe.source_lang,) if recipe.packing else (recipe.source_lang, recipe.target_lang)

    def translation_pair(row, index):
        pair = row[recipe.translation_column]
        missing = [lang for lang in languages if not isinstance(pair, dict) or lang not in pair]
        if missing:
            held = sorted(pair) if isinstance(pair, dict) else type(pair).__name__
            raise ValueError(
                f"Row {index} of translation_column={recipe.translation_column!r} holds {held}, without "
                f"{', '.join(repr(lang) for lang in missing)}; set source_lang/target_lang to keys the rows have."
            )
        return pair[recipe.source_lang], pair.get(recipe.target_lang)

    def fields(row, index):
        out = dict(row)
        if recipe.translation_column:
            out["source"], out["target"] = translation_pair(row, index)
        elif recipe.source_column in row:
            out["source"] = row[recipe.source_column]
            out["target"] = row.get(recipe.target_column)
        if recipe.text_column in row:
            out["text"] = row[recipe.text_column]
        if recipe.label_column in row:
            out["label"] = row[recipe.label_column]
        return out

    if recipe.packing and recipe.text_column not in columns and recipe.translation_column not in columns:
        raise ValueError(
            f"The data has columns {columns} but plain-text LM (packing) reads text_column={recipe.text_column!r}"
            f"{f' or translation_column={recipe.translation_column!r}' if recipe.translation_column else ''}; "
            "set text_column to the column that holds the text."
        )
    if recipe.translation_column:
        require(recipe.translation_column)
    elif recipe.task == SEQ2SEQ or (
        recipe.task == CAUSAL and not recipe.packing and not recipe.label_words and recipe.prompt_column not in columns
    ):
        require(recipe.source_column, recipe.target_column)
    if recipe.task == CLASSIFICATION or recipe.label_words:
        require(recipe.text_column, recipe.label_column)

    def build(row, index):
        values = fields(row, index)
        if recipe.packing:
            text = values["source"] if recipe.translation_column else values["text"]
            if not isinstance(text, str):
                column = recipe.translation_column or recipe.text_column
                raise ValueError(f"Row {index} of column {column!r} holds {text!r}, not text; give every row a string.")
            return {"text": text}
        if recipe.task == CLASSIFICATION:  # a row without a label (None) is distilled from the teacher alone
            return {"text": values["text"], "label": None if values["label"] is None else int(values["label"])}
        if recipe.label_words:  # a causal LM that answers with a label word
            label = int(values["label"])
            return {"prompt": recipe.prompt_template.format(**values), "response": " " + recipe.label_words[label],
                    "label": label}
        if recipe.task == CAUSAL and recipe.prompt_column in columns:
            return {"prompt": values[recipe.prompt_column], "response": values[recipe.response_column]}
        prompt = recipe.prompt_template.format(**values)
        if recipe.task == SEQ2SEQ:
            return {"source": prompt, "target": values["target"]}
        return {"prompt": prompt, "response": " " + values["target"]}

    return dataset.map(build, with_indices=True, remove_columns=columns)


def prepare_splits(recipe: RecipeArguments, tokenizer, seed: int = 42, teacher_tokenizer=None):
    """Tokenized train/eval/test splits (test keeps its raw text for scoring) and their truncation stats.

    With `teacher_tokenizer` (a teacher with another tokenizer), prompt → response rows also carry their prompt as
    the teacher sees it: its tokens and its chat template.
    """
    prepared, stats = {}, {}
    for name, split in load_raw_splits(recipe, seed).items():
        rows = to_task_rows(split, recipe)
        if recipe.packing:
            prepared[name], stats[name] = tokenize_text(rows, tokenizer, max_length=recipe.max_length)
        elif recipe.task == CAUSAL:
            prepared[name], stats[name] = tokenize_causal(
                rows, tokenizer, max_length=recipe.max_length, min_response_tokens=recipe.min_response_tokens,
                use_chat_template=recipe.use_chat_template,
            )
        elif recipe.task == SEQ2SEQ:
            prepared[name], stats[name] = tokenize_seq2seq(
                rows, tokenizer, max_length=recipe.max_length, max_target_length=recipe.max_target_length
            )
        else:
            prepared[name], stats[name] = tokenize_classification(
                rows, tokenizer, max_length=recipe.max_length, require_label=name != "train"
            )
        logger.warning(stats[name].summary(name)) if stats[name].dropped else logger.info(stats[name].summary(name))
        if teacher_tokenizer is not None and "prompt" in prepared[name].column_names:
            prepared[name] = prepared[name].map(lambda rows: {TEACHER_PROMPT_COLUMN: [
                prompt_ids(teacher_tokenizer, prompt, recipe.use_chat_template) for prompt in rows["prompt"]]},
                batched=True, desc="The prompts in the teacher's tokens")
        if len(split) and not len(prepared[name]):  # otherwise the trainer would only say the split is empty
            if recipe.packing:
                raise ValueError(
                    f"The {name} split's text makes no full block of max_length={recipe.max_length} tokens; lower "
                    "max_length or give more text."
                )
            raise ValueError(
                f"All {len(split)} rows of the {name} split were dropped ({stats[name].summary(name)}); raise "
                f"max_length (now {recipe.max_length}) or lower min_response_tokens (now {recipe.min_response_tokens})."
            )
    return DatasetDict(prepared), stats


def model_columns(dataset):
    """Only what the model and collator take: the raw text stays out of training batches."""
    return dataset.select_columns([c for c in (*MODEL_COLUMNS, TEACHER_PROMPT_COLUMN) if c in dataset.column_names])


def build_student(recipe: RecipeArguments, teacher, calibration: list[dict] | None = None):
    """The recipe's student: loaded, cut from the teacher at fixed layers, or pruned from it by importance."""
    if recipe.student_num_layers is not None or recipe.student_intermediate_size is not None:
        return prune_student(teacher, calibration, recipe.student_num_layers, recipe.student_intermediate_size)
    if recipe.student_init == "from_teacher":
        return student_from_teacher(teacher, recipe.student_layers)
    kwargs = {}
    if recipe.task == CLASSIFICATION:  # a base checkpoint gets the teacher's label set on its new head
        config = teacher.config
        kwargs = {"num_labels": config.num_labels, "id2label": config.id2label, "label2id": config.label2id}
    return load_model(recipe.student_model_name_or_path, kind=recipe.task, **kwargs)
