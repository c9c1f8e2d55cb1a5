"""Bad input, as a table.

Each row makes one bad input (a setting, model, tokenizer, dataset, recipe, cache or path) inside a "user" folder
and checks that it is refused before the first optimizer step, with an exception of the expected type whose message
names what was given and how to fix it, and that no file of the user's folder changed. Command-line rows run
`hf-distill` in-process: exit status 2 and one line on stderr, and the same exception type under `--debug`.
docs/troubleshooting.md's table is rendered from this table (`markdown_table`), and checked to match.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import huggingface_hub
import pytest
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaModel, TrainingArguments

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.cache import build_cache
from hf_distill.data import CausalLMCollator
from hf_distill.runner import arguments
from hf_distill.runner.cli import UsageError, main
from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer

from conftest import DATA, REPO, prompt_response_dataset, spanish_lines, tiny_classifier, tiny_t5

NAN, INF = math.nan, math.inf


# ---- the user's folder --------------------------------------------------------------------------------------


class User:
    """A user's folder (an output_dir that already holds a file, a data file) and the calls a user makes."""

    def __init__(self, root: Path, tokenizer):
        self.root, self.tokenizer, self.trainer = root, tokenizer, None
        (root / "out").mkdir(parents=True)
        (root / "out" / "notes.txt").write_text("the user's own notes: never touched\n")
        (root / "data").mkdir()
        with open(DATA, encoding="utf-8") as handle:
            self.write("data/train.jsonl", "".join(line for _, line in zip(range(24), handle)))

    def write(self, name: str, text: str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def student(self, **overrides):
        return small_llama(len(self.tokenizer), hidden_size=32, num_layers=1, seed=1, **overrides)

    def teacher(self, **overrides):
        return small_llama(len(self.tokenizer), hidden_size=64, num_layers=2, seed=0, **overrides)

    def dataset(self, n: int = 8):
        return prompt_response_dataset(self.tokenizer, n=n)

    def folder(self, name: str, model, tokenizer=None) -> str:
        model.save_pretrained(self.root / name)
        (tokenizer or self.tokenizer).save_pretrained(self.root / name)
        return str(self.root / name)

    def config(self, **settings) -> DistillationConfig:
        defaults = dict(output_dir=str(self.root / "out"), report_to=[], save_strategy="no", use_cpu=True,
                        disable_tqdm=True, max_steps=2, per_device_train_batch_size=4, dataloader_pin_memory=False)
        return DistillationConfig(**{**defaults, **settings})

    def train(self, settings: dict | None = None, **kwargs):
        """Build the trainer (tiny student and teacher unless given) and train: the error must come first."""
        kwargs.setdefault("model", self.student())
        kwargs.setdefault("teacher_model", self.teacher())
        kwargs.setdefault("train_dataset", self.dataset())
        kwargs.setdefault("processing_class", self.tokenizer)
        kwargs.setdefault("args", self.config(**(settings or {})))
        self.trainer = DistillationTrainer(**kwargs)
        self.trainer.train()

    def recipe(self, **fields) -> str:
        """A causal translation recipe on the user's local teacher, student and data, with `fields` on top."""
        recipe = dict(
            task="causal", teacher_model_name_or_path=self.folder("teacher", self.teacher()),
            student_model_name_or_path=self.folder("student", self.student()),
            dataset_name=str(self.root / "data" / "train.jsonl"), translation_column="translation",
            prompt_template="English: {source}\nSpanish:", max_length=48, held_out_size=4, max_train_samples=8,
            eval_max_new_tokens=2, baseline=False, output_dir=str(self.root / "out"), max_steps=1, use_cpu=True,
            per_device_train_batch_size=4, eval_strategy="no", report_to="none", save_strategy="no",
        )
        recipe.update(fields)
        return self.write("recipe.yaml", yaml.safe_dump(recipe))

    def cache(self, dataset, shard_rows: int = 1024) -> str:
        return str(build_cache(self.teacher(), dataset, self.tokenizer, self.root / "cache", shard_rows=shard_rows))


# ---- the table ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    bad_input: str  # for the table in docs/troubleshooting.md
    build: Callable[[User], Any]  # makes the bad input; returns the call that must fail (or argv for a CLI row)
    error: type[BaseException]  # the exact type raised (under --debug for a CLI row)
    given: str  # regex: the message names what was given ...
    fix: str  # ... and how to fix it
    fix_text: str  # for the table in docs/troubleshooting.md
    cli: bool = False


def setting(**settings):
    """A row builder for a bad DistillationConfig value."""
    return lambda user: lambda: user.train(settings)


def trainer(**kwargs):
    """A row builder for bad DistillationTrainer arguments; callables among them are called with the user first."""

    def build(user):
        made = {key: value(user) if callable(value) else value for key, value in kwargs.items()}
        return lambda: user.train(**made)

    return build


def rows_of(**columns):
    return lambda user: Dataset.from_dict(columns)


def command(*argv, **recipe_fields):
    """A CLI row builder: `hf-distill train RECIPE argv...`; "{root}" in argv is the user's folder."""
    return lambda user: ["train", user.recipe(**recipe_fields), *(a.format(root=user.root) for a in argv)]


def offline(build):
    """The Hub is off in CI (HF_HUB_OFFLINE=1); these rows make sure of it whatever the environment says."""

    def wrapped(user):
        user.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        user.monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        return build(user)

    return wrapped


def without_bf16_gpu(build):
    """These rows run as on a machine without a bfloat16 GPU, whatever this one has."""

    def wrapped(user):
        user.monkeypatch.setattr(arguments, "bf16_available", lambda: False)
        return build(user)

    return wrapped


def other_tokenizer_teacher(user):
    spanish = train_bpe_tokenizer(spanish_lines(300), vocab_size=len(user.tokenizer))
    return user.folder("teacher-es", small_llama(len(spanish), seed=0), spanish)


def bare_tokenizer(user):
    bare = copy.deepcopy(user.tokenizer)
    bare.pad_token, bare.eos_token, bare.name_or_path = None, None, "bare-bpe"
    return bare


def nan_teacher(user):
    teacher = user.teacher()
    with torch.no_grad():
        teacher.get_output_embeddings().weight[3, 0] = NAN
    return teacher


def cache_for_other_rows(user):
    cache = user.cache(user.dataset(8))
    return lambda: user.train({"teacher_cache": cache}, teacher_model=None, train_dataset=user.dataset(6))


def incomplete_cache(user):
    cache = user.cache(user.dataset(8), shard_rows=4)
    (Path(cache) / "shard-00001.arrow").unlink()  # as if the build had been interrupted
    return lambda: user.train({"teacher_cache": cache}, teacher_model=None)


def empty_cache_folder(user):
    (user.root / "cache").mkdir()
    return lambda: user.train({"teacher_cache": str(user.root / "cache")}, teacher_model=None)


def tiny_gpt2(vocab_size: int, seed: int):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=128))


def folder_without_config(user):
    user.write("empty_teacher/README.md", "a folder that save_pretrained did not write")
    return str(user.root / "empty_teacher")


ROWS = [
    # settings
    Row("loss-type-unknown", "`loss_type='kl_div'`", setting(loss_type="kl_div"), ValueError,
        r"loss_type='kl_div'", r"choose one of forward_kl", "a listed `loss_type`"),
    Row("alpha-above-one", "`alpha=1.5`", setting(alpha=1.5), ValueError, r"alpha=1\.5", r"must lie in \[0, 1\]",
        "`alpha` in [0, 1]"),
    Row("alpha-not-a-number", "`alpha=[0.5]` (a list)", setting(alpha=[0.5]), TypeError, r"alpha=\[0\.5\]",
        r"must be a number, for instance alpha=0\.5", "one number"),
    Row("alpha-end-above-one", "`alpha_end=2`", setting(alpha_end=2.0), ValueError, r"alpha_end=2\.0",
        r"a number in \[0, 1\] \(where alpha ends\), or None", "`alpha_end` in [0, 1], or none"),
    Row("temperature-zero", "`temperature=0`", setting(temperature=0.0), ValueError, r"temperature=0\.0",
        r"finite number > 0", "`temperature` > 0"),
    Row("temperature-nan", "`temperature=nan`", setting(temperature=NAN), ValueError, r"temperature=nan",
        r"finite number > 0", "`temperature` > 0"),
    Row("beta-inf", "`beta=inf`", setting(beta=INF), ValueError, r"beta=inf", r"must lie in \[0, 1\]",
        "`beta` in [0, 1]"),
    Row("hidden-weight-inf", "`hidden_loss_weight=inf`", setting(hidden_loss_weight=INF), ValueError,
        r"hidden_loss_weight=inf", r"finite number >= 0", "a finite weight >= 0"),
    Row("attention-weight-negative", "`attention_loss_weight=-1`", setting(attention_loss_weight=-1.0), ValueError,
        r"attention_loss_weight=-1\.0", r"finite number >= 0", "a finite weight >= 0"),
    Row("attention-seq2seq", "`attention_loss_weight=1` with seq2seq models",
        trainer(model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=1),
                teacher_model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=0),
                args=lambda user: user.config(attention_loss_weight=1.0)),
        ValueError, r"attention_loss_weight=1\.0 compares causal self-attention relations; this is a seq2seq model",
        r"Set attention_loss_weight=0", "`attention_loss_weight=0` (`hidden_loss_weight` works)"),
    Row("attention-no-qkv", "`attention_loss_weight=1` with GPT-2 (fused `c_attn`)",
        trainer(model=lambda user: tiny_gpt2(len(user.tokenizer), seed=1),
                teacher_model=lambda user: tiny_gpt2(len(user.tokenizer), seed=0),
                args=lambda user: user.config(attention_loss_weight=1.0)),
        ValueError, r"self_attn\.q_proj, k_proj and v_proj, which GPT2LMHeadModel does not have",
        r"set attention_loss_weight=0", "a Llama-style model, or `attention_loss_weight=0`"),
    Row("attention-with-cache", "`attention_loss_weight=1` with a `teacher_cache`",
        lambda user: (lambda cache: lambda: user.train({"attention_loss_weight": 1.0, "teacher_cache": cache},
                                                       teacher_model=None))(user.cache(user.dataset())),
        ValueError, r"attention_loss_weight > 0 needs the teacher's layers, which an offline teacher_cache",
        r"set attention_loss_weight=0", "a live teacher"),
    Row("learning-rate-nan", "`learning_rate=nan`", setting(learning_rate=NAN), ValueError, r"learning_rate=nan",
        r"finite number >= 0, for instance 5e-05", "a finite `learning_rate` >= 0"),
    Row("chunk-size-zero", "`chunk_size=0`", setting(chunk_size=0), ValueError, r"chunk_size=0",
        r"positive number of positions \(or None", "a positive `chunk_size`, or None"),
    Row("hidden-loss-type-unknown", "`hidden_loss_type='l1'`", setting(hidden_loss_type="l1"), ValueError,
        r"hidden_loss_type='l1'", r"choose one of mse", "`mse` or `cosine`"),
    Row("init-kwargs-bad-json", "`teacher_model_init_kwargs='{dtype: bf16'`",
        setting(teacher_model_init_kwargs="{dtype: bf16"), ValueError, r"'\{dtype: bf16'", r"write it like",
        "valid JSON, e.g. `{\"dtype\": \"bfloat16\"}`"),
    Row("init-kwargs-bad-dtype", "`teacher_model_init_kwargs={\"dtype\": \"bf16\"}`",
        setting(teacher_model_init_kwargs={"dtype": "bf16"}), ValueError, r"dtype='bf16'",
        r"use 'float32', 'bfloat16'", "a torch dtype name: `bfloat16`"),
    Row("layer-map-out-of-range", "`layer_map=[7]` for a 2-layer teacher",
        setting(hidden_loss_weight=1.0, layer_map=[7]), ValueError, r"layer_map=\[7\]",
        r"one teacher layer \(0\.\.1\) for each of the student's 1 layers", "one teacher layer index per student layer"),
    Row("lmbda-above-one", "`lmbda=1.5`", setting(lmbda=1.5), ValueError, r"lmbda=1\.5", r"must lie in \[0, 1\]",
        "`lmbda` in [0, 1]"),
    Row("generation-temperature-zero", "`generation_temperature=0`", setting(generation_temperature=0.0), ValueError,
        r"generation_temperature=0\.0", r"finite number > 0", "`generation_temperature` > 0"),
    Row("max-new-tokens-zero", "`max_new_tokens=0`", setting(max_new_tokens=0), ValueError, r"max_new_tokens=0",
        r"whole number >= 1", "`max_new_tokens` >= 1"),
    Row("on-policy-with-cache", "`lmbda=0.5` with a `teacher_cache`", setting(lmbda=0.5, teacher_cache="cache"),
        ValueError, r"lmbda=0\.5 needs the teacher live", r"Drop teacher_cache", "a live teacher, or `lmbda=0`"),
    # the trainer's arguments: models and tokenizers
    Row("args-training-arguments", "`args=TrainingArguments(...)`",
        trainer(args=lambda user: TrainingArguments(output_dir=str(user.root / "out"), use_cpu=True)), TypeError,
        r"args is a TrainingArguments", r"DistillationConfig\(output_dir=", "use `DistillationConfig`"),
    Row("no-teacher", "no teacher, no `teacher_model_name_or_path`, no cache", trainer(teacher_model=None),
        ValueError, r"needs a teacher", r"pass teacher_model=\.\.\.", "pass `teacher_model=` (or a cache)"),
    Row("kind-mismatch", "causal teacher, seq2seq student",
        trainer(model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=0)), ValueError,
        r"causal model \(LlamaForCausalLM\) but the student is a seq2seq model \(T5ForConditionalGeneration\)",
        r"same AutoModelFor\.\.\. class", "load both with one `AutoModelFor...` class"),
    Row("num-labels-mismatch", "classifiers with 3 (teacher) and 2 (student) labels",
        trainer(model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=1, num_labels=2),
                teacher_model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=0, num_labels=3)),
        ValueError, r"predicts 3 classes but the student \(LlamaForSequenceClassification\) predicts 2",
        r"num_labels=3 and the teacher's label2id", "give the student the teacher's `num_labels`"),
    Row("model-without-head", "a `LlamaModel` (no head) as the student",
        trainer(model=lambda user: LlamaModel(LlamaConfig(vocab_size=len(user.tokenizer), hidden_size=32,
                                                          intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, num_key_value_heads=2))),
        TypeError, r"LlamaModel is not a model", r"AutoModelForCausalLM", "load it with `AutoModelFor...`"),
    Row("tokenizers-differ", "teacher folder with another tokenizer",
        trainer(teacher_model=other_tokenizer_teacher), ValueError, r"teacher-es.*differ: id \d+ is",
        r"one model family \(or the same tokenizer\), or set cross_tokenizer='uld'",
        "a teacher and student of one family, or `cross_tokenizer='uld'`"),
    Row("tokenizer-beyond-vocab", "tokenizer larger than the student's vocabulary",
        trainer(model=lambda user: small_llama(len(user.tokenizer) - 84, hidden_size=32, num_layers=1, seed=1),
                teacher_processing_class=lambda user: user.tokenizer),
        ValueError, r"have \d+ tokens but the smaller model has only \d+ output rows",
        r"resize_token_embeddings", "`model.resize_token_embeddings(len(tokenizer))`"),
    Row("tokenizer-no-pad-no-eos", "tokenizer with neither pad nor eos token",
        trainer(processing_class=bare_tokenizer), ValueError, r"'bare-bpe' has neither a pad nor an eos token",
        r"set pad_token", "set `tokenizer.pad_token`"),
    Row("no-tokenizer", "no `processing_class` and no `data_collator`", trainer(processing_class=None), ValueError,
        r"needs a processing_class", r"or a data_collator", "pass the student's tokenizer"),
    Row("on-policy-no-tokenizer", "`lmbda=0.5`, a `data_collator` and no `processing_class`",
        trainer(processing_class=None, data_collator=lambda user: CausalLMCollator(0),
                args=lambda user: user.config(lmbda=0.5)),
        ValueError, r"lmbda=0\.5 needs the student's tokenizer", r"processing_class=tokenizer",
        "pass the student's tokenizer"),
    Row("on-policy-seq2seq", "`lmbda=0.5` with a seq2seq student",
        trainer(model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=1),
                teacher_model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=0),
                args=lambda user: user.config(lmbda=0.5)),
        ValueError, r"lmbda=0\.5 trains on the student's generated responses.*seq2seq model", r"Set lmbda=0",
        "a causal student, or `lmbda=0`"),
    Row("seq-kd-classifier", "`seq_kd=True` with a classifier student",
        trainer(model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=1),
                teacher_model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=0),
                args=lambda user: user.config(seq_kd=True)),
        ValueError, r"seq_kd=True trains on the teacher's generated responses.*classification model", r"Set seq_kd=False",
        "a causal or seq2seq student, or `seq_kd=False`"),
    Row("seq-kd-with-cache", "`seq_kd=True` with a `teacher_cache`", setting(seq_kd=True, teacher_cache="cache"),
        ValueError, r"seq_kd=True needs the teacher live", r"Drop teacher_cache", "a live teacher, or `seq_kd=False`"),
    Row("seq-kd-several-teachers", "`seq_kd=True` with two teachers",
        trainer(teacher_model=lambda user: [user.teacher(), user.teacher()], args=lambda user: user.config(seq_kd=True)),
        ValueError, r"seq_kd=True trains on one teacher's responses, but 2 teachers", r"distill from one teacher",
        "one teacher, or `seq_kd=False`"),
    Row("cross-tokenizer-unknown", "`cross_tokenizer='bpe'`", setting(cross_tokenizer="bpe"), ValueError,
        r"cross_tokenizer='bpe'", r"choose one of uld, align, or None", "`uld`, or None (one tokenizer)"),
    Row("cross-tokenizer-align-logit-loss", "`cross_tokenizer='align'` with `loss_type='mse'`",
        setting(cross_tokenizer="align", loss_type="mse"), ValueError, r"loss_type='mse' compares raw logits",
        r"choose forward_kl, reverse_kl, jsd", "a probability `loss_type`"),
    Row("cross-tokenizer-with-cache", "`cross_tokenizer='uld'` with a `teacher_cache`",
        setting(cross_tokenizer="uld", teacher_cache="cache"), ValueError,
        r"cross_tokenizer='uld' does not work with teacher_cache='cache'", r"drop teacher_cache", "a live teacher"),
    Row("cross-tokenizer-hidden", "`cross_tokenizer='uld'` with `hidden_loss_weight=1`",
        setting(cross_tokenizer="uld", hidden_loss_weight=1.0), ValueError,
        r"cross_tokenizer='uld' does not work with hidden_loss_weight=1\.0", r"set hidden_loss_weight=0",
        "`hidden_loss_weight=0`"),
    Row("cross-tokenizer-seq2seq", "`cross_tokenizer='uld'` with seq2seq models",
        trainer(model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=1),
                teacher_model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=0),
                args=lambda user: user.config(cross_tokenizer="uld")),
        ValueError, r"cross_tokenizer='uld' pairs the response tokens of two causal LMs.*seq2seq model",
        r"use causal LMs, or drop cross_tokenizer", "causal LMs, or no `cross_tokenizer`"),
    Row("cross-tokenizer-two-teachers", "`cross_tokenizer='uld'` with two teachers",
        trainer(teacher_model=lambda user: [user.teacher(), user.teacher()],
                args=lambda user: user.config(cross_tokenizer="uld")),
        ValueError, r"cross_tokenizer='uld' distills from one teacher, but 2 are given", r"pass one teacher_model",
        "one teacher"),
    Row("cross-tokenizer-no-teacher-tokenizer", "`cross_tokenizer='uld'`, a teacher model and no teacher tokenizer",
        trainer(args=lambda user: user.config(cross_tokenizer="uld")), ValueError,
        r"cross_tokenizer='uld' tokenizes each row again for the teacher",
        r"pass the teacher's tokenizer \(teacher_processing_class", "pass `teacher_processing_class`"),
    Row("peft-targets-nothing", "`LoraConfig(target_modules=['nope'])`",
        trainer(peft_config=LoraConfig(r=4, target_modules=["nope"])), ValueError,
        r"target_modules=\{'nope'\} matches no module of LlamaForCausalLM", r"'q_proj'",
        "target modules that exist (listed)"),
    Row("teacher-folder-missing", "`teacher_model='…/no_such_teacher'`",
        trainer(teacher_model=lambda user: str(user.root / "no_such_teacher")), FileNotFoundError,
        r"no_such_teacher'?: no such folder", r"local model folder or a Hub id", "an existing folder or a Hub id"),
    Row("teacher-folder-without-config", "teacher folder without config.json",
        trainer(teacher_model=folder_without_config),
        FileNotFoundError, r"empty_teacher' is a folder without config\.json", r"save_pretrained wrote",
        "the folder `save_pretrained` wrote"),
    Row("teacher-hub-offline", "uncached Hub id with `HF_HUB_OFFLINE=1`",
        offline(trainer(teacher_model="hf-distill-tests/no-such-teacher")), FileNotFoundError,
        r"'hf-distill-tests/no-such-teacher' is not a local folder, and the Hub is off",
        r"hf download hf-distill-tests/no-such-teacher", "download it while online, or a local folder"),
    # datasets
    Row("dataset-empty", "empty `train_dataset`", trainer(train_dataset=rows_of(input_ids=[], labels=[])), ValueError,
        r"train_dataset is empty", r"at least one tokenized row", "at least one row"),
    Row("eval-dataset-empty", "empty `eval_dataset`", trainer(eval_dataset=rows_of(input_ids=[], labels=[])),
        ValueError, r"eval_dataset is empty", r"at least one tokenized row", "at least one row, or none"),
    Row("dataset-untokenized", "raw text column, no `input_ids`",
        trainer(train_dataset=rows_of(text=["In the beginning"])), ValueError, r"columns \['text'\] but no 'input_ids'",
        r"Tokenize it first", "tokenize it (`dataset.map(...)`)"),
    Row("dataset-prompt-only", "every label -100",
        trainer(train_dataset=rows_of(input_ids=[[5, 6, 7], [8, 9]], labels=[[-100] * 3, [-100] * 2])), ValueError,
        r"None of the 2 rows of train_dataset has a target token", r"Check the response column and max_length, or set lmbda=1",
        "check the response column and `max_length`, or `lmbda=1` (on-policy) or `seq_kd=True`"),
    Row("seq2seq-without-labels", "seq2seq rows without `labels`",
        trainer(model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=1),
                teacher_model=lambda user: tiny_t5(len(user.tokenizer), 32, 1, seed=0),
                train_dataset=rows_of(input_ids=[[5, 6, 7]])), ValueError,
        r"columns \['input_ids'\] but no 'labels'", r"tokenizer\(text_target=", "add target ids as `labels`"),
    Row("classifier-without-labels", "classifier rows without `labels`, and `alpha=0`",
        trainer(model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=1),
                teacher_model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=0),
                train_dataset=rows_of(input_ids=[[5, 6, 7]]), args=lambda user: user.config(alpha=0.0)), ValueError,
        r"None of the 1 rows of train_dataset has a label, and alpha=0", r"set alpha > 0 to distill the unlabeled rows",
        "`alpha` > 0 (unlabeled rows are distilled from the teacher), or add labels"),
    Row("token-id-beyond-vocab", "token id 5000 for a 384-token model",
        trainer(train_dataset=rows_of(input_ids=[[5, 5000, 6]], labels=[[5, 5000, 6]])), ValueError,
        r"token id 5000 but LlamaForCausalLM embeds only \d+ tokens", r"tokenize the data with the student's tokenizer",
        "tokenize with the student's tokenizer"),
    Row("negative-input-id", "`input_ids` padded with -100",
        trainer(train_dataset=rows_of(input_ids=[[5, 6, -100]], labels=[[5, 6, -100]])), ValueError,
        r"input id -100 in input_ids", r"pad input_ids with the pad token id", "pad `input_ids` with the pad token"),
    Row("class-label-out-of-range", "class label 5 for 3-class models",
        trainer(model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=1),
                teacher_model=lambda user: tiny_classifier(len(user.tokenizer), 32, 1, seed=0),
                train_dataset=rows_of(input_ids=[[5, 6, 7]] * 2, labels=[0, 5])), ValueError,
        r"class label 5 but the models predict 3 classes", r"map the labels to 0\.\.2", "labels in 0..num_labels-1"),
    Row("sequence-too-long", "600-token rows for a 512-position model",
        trainer(train_dataset=rows_of(input_ids=[[5] * 600], labels=[[5] * 600])), ValueError,
        r"rows of up to 600 tokens but LlamaForCausalLM takes at most 512 positions", r"max_length=512",
        "truncate to `max_position_embeddings`"),
    Row("nan-teacher", "a teacher whose weights hold NaN", trainer(teacher_model=nan_teacher), FloatingPointError,
        r"the distillation term \(kd_loss\) is not finite", r"dtype': 'bfloat16'\} or float32",
        "a teacher in bf16/fp32; check weights and inputs"),
    # offline teacher caches
    Row("cache-folder-empty", "`teacher_cache` folder without a cache", empty_cache_folder, ValueError,
        r"cache holds no teacher cache", r"build one with `hf-distill cache-teacher`", "build it with `cache-teacher`"),
    Row("cache-for-other-data", "cache built for other rows", cache_for_other_rows, ValueError,
        r"cache in .*cache was built for a different dataset",
        r"use another cache folder", "one cache folder per dataset"),
    Row("cache-incomplete", "cache with a shard missing", incomplete_cache, ValueError,
        r"missing \['shard-00001\.arrow'\]", r"run cache-teacher again", "run `cache-teacher` again"),
    # the command line and recipes
    Row("cli-recipe-missing", "`hf-distill train missing.yaml`",
        lambda user: ["train", str(user.root / "missing.yaml")], UsageError, r"missing\.yaml' not found",
        r"give the path of a YAML recipe", "the path of a YAML recipe", cli=True),
    Row("cli-recipe-yaml-syntax", "recipe that is not YAML",
        lambda user: ["train", user.write("recipe.yaml", "alpha: 0.5\n beta: : 1\n")], UsageError,
        r"recipe\.yaml is not valid YAML \(line 2", r"one `field: value` a line", "one `field: value` a line", cli=True),
    Row("cli-recipe-not-mapping", "recipe holding a list",
        lambda user: ["train", user.write("recipe.yaml", "- alpha\n- 0.5\n")], UsageError, r"not a list",
        r"must hold a mapping of field: value", "a mapping of `field: value`", cli=True),
    Row("cli-recipe-unknown-field", "recipe field `alpah`", command(alpah=0.5), UsageError,
        r"unknown fields \['alpah'\]", r"did you mean alpha\?", "the suggested field", cli=True),
    Row("cli-recipe-list-for-number", "recipe `alpha: [0.5]`", command(alpha=[0.5]), UsageError,
        r"alpha=\[0\.5\] is not one float", r"write it like `alpha: 0\.5`", "one value", cli=True),
    Row("cli-recipe-number-for-list", "recipe `student_layers: 3`", command(student_layers=3), UsageError,
        r"student_layers=3 is not a list of int", r"`student_layers: \[3\]`", "a YAML list", cli=True),
    Row("cli-bf16-without-gpu", "recipe `bf16: true` on a machine without a bf16 GPU",
        without_bf16_gpu(command(bf16=True, use_cpu=False)), UsageError, r"bf16=True needs a GPU",
        r"pass `--bf16 false`", "`--bf16 false` (or `--use_cpu true`)", cli=True),
    Row("cli-metric-unknown", "`--metrics bleurt` (no such built-in metric or script)", command("--metrics", "bleurt"),
        ValueError, r"metrics: 'bleurt' is neither a built-in metric", r"the path of an `evaluate` metric script",
        "a built-in metric or an `evaluate` script's path", cli=True),
    Row("cli-recipe-bad-task", "recipe `task: regression`", command(task="regression"), ValueError,
        r"task='regression'", r"choose one of causal, seq2seq, classification", "a listed task", cli=True),
    Row("cli-bad-dtype", "`--teacher_model_init_kwargs '{\"dtype\": \"bf16\"}'`",
        command("--teacher_model_init_kwargs", '{{"dtype": "bf16"}}'), ValueError, r"dtype='bf16'",
        r"use 'float32', 'bfloat16'", "a torch dtype name", cli=True),
    Row("cli-data-file-missing", "`--data_files` that does not exist",
        command("--data_files", "{root}/data/nope.jsonl"), UsageError, r"nope\.jsonl': no such file",
        r"give a \.json, \.jsonl, \.csv or \.parquet file", "an existing data file", cli=True),
    Row("cli-data-file-xml", "a `.xml` data file",
        lambda user: command("--data_files", user.write("data/train.xml", "<text>In the beginning</text>\n"))(user),
        UsageError, r"Cannot read '.*train\.xml'", r"use a \.json, \.jsonl, \.csv, \.parquet or \.txt file",
        "json/jsonl/csv/parquet/txt", cli=True),
    Row("cli-text-file-one-paragraph", "a `.txt` file of one paragraph (no blank lines) to carve held-out text from",
        lambda user: command("--data_files", user.write("data/one.txt", "In the beginning\nGod created\n"),
                             packing=True)(user),
        ValueError, r"Only 1 training rows \(paragraphs: blank-line separated text\)", r"smaller held_out_size",
        "blank lines between paragraphs, or `eval_split`", cli=True),
    Row("cli-data-file-empty", "an empty data file",
        lambda user: command("--dataset_name", user.write("data/empty.jsonl", ""))(user), UsageError,
        r"empty\.jsonl' is empty", r"at least one row", "a file with rows", cli=True),
    Row("cli-teacher-folder-missing", "`--teacher_model_name_or_path` folder that does not exist",
        command("--teacher_model_name_or_path", "{root}/no_such_teacher"), UsageError,
        r"teacher_model_name_or_path='.*no_such_teacher': no such folder", r"local model folder or a Hub id",
        "an existing folder or a Hub id", cli=True),
    Row("cli-teacher-hub-offline", "uncached Hub id for the teacher, offline",
        offline(command("--teacher_model_name_or_path", "hf-distill-tests/no-such-teacher")), UsageError,
        r"teacher_model_name_or_path='hf-distill-tests/no-such-teacher' is not a local folder",
        r"hf download hf-distill-tests/no-such-teacher", "download it while online", cli=True),
    Row("cli-dataset-hub-offline", "uncached Hub dataset, offline",
        offline(command("--dataset_name", "hf-distill-tests/no-such-data")), ValueError,
        r"dataset_name='hf-distill-tests/no-such-data' .*cannot be fetched from the Hub",
        r"download it while online, or give a local data file", "download it while online, or a local file", cli=True),
    Row("cli-unknown-columns", "data columns the recipe does not name",
        lambda user: command("--dataset_name", user.write("data/cols.jsonl", '{"en": "a", "es": "b"}\n' * 12))(user),
        ValueError, r"columns \['en', 'es'\] but the recipe needs \['translation'\]", r"set the matching \*_column option",
        "set the `*_column` options", cli=True),
    Row("cli-packing-no-text-column", "plain text (`packing`) whose rows have no `text` column",
        lambda user: command("--dataset_name", user.write("data/body.jsonl", '{"body": "In the beginning"}\n' * 12),
                             packing=True)(user),
        ValueError, r"columns \['body'\] but plain-text LM \(packing\) reads text_column='text' or translation_column=",
        r"set text_column to the column that holds the text", "set `text_column`", cli=True),
    Row("cli-translation-key-missing", "translation rows without the `target_lang` key",
        lambda user: command("--dataset_name", user.write("data/en.jsonl", '{"translation": {"en": "a"}}\n' * 12))(user),
        ValueError, r"translation_column='translation' holds \['en'\], without 'es'",
        r"set source_lang/target_lang to keys the rows have", "set `source_lang`/`target_lang`", cli=True),
    Row("cli-packing-source-key-missing", "plain text (`packing`) from translation rows without `source_lang`",
        lambda user: command("--dataset_name", user.write("data/es.jsonl", '{"translation": {"es": "a"}}\n' * 12),
                             packing=True)(user),
        ValueError, r"translation_column='translation' holds \['es'\], without 'en'",
        r"set source_lang/target_lang to keys the rows have", "set `source_lang`", cli=True),
    Row("cli-packing-null-text", "plain text (`packing`) with a row whose text is null",
        lambda user: command("--dataset_name", user.write("data/null.jsonl", '{"text": "a b c"}\n' * 11 + '{"text": null}\n'),
                             packing=True, held_out_size=1)(user),
        ValueError, r"Row \d+ of column 'text' holds None, not text", r"give every row a string",
        "a string in every row", cli=True),
    Row("cli-train-split-missing", "`--train_split validation` on a one-split file",
        command("--train_split", "validation"), ValueError, r"splits \['train'\], not train_split='validation'",
        r"set train_split to one of them", "a split the data has", cli=True),
    Row("cli-data-file-no-rows", "a CSV file with a header and no rows",
        lambda user: command("--data_files", user.write("data/header.csv", "prompt,response\n"))(user), ValueError,
        r"header\.csv' has no rows", r"at least one row", "a file with rows", cli=True),
    Row("cli-held-out-too-large", "`--held_out_size 500` on 24 rows", command("--held_out_size", "500"),
        ValueError, r"Only 24 training rows: too few to carve a\w* eval split of 500", r"smaller held_out_size",
        "a smaller `held_out_size`", cli=True),
    Row("cli-baseline-learning-rate", "`--baseline_learning_rate 0`", command("--baseline_learning_rate", "0"),
        ValueError, r"baseline_learning_rate=0\.0 must be a number > 0", r"leave it unset",
        "a positive rate, or none", cli=True),
    Row("cli-all-rows-dropped", "`--min_response_tokens 1000`", command("--min_response_tokens", "1000"),
        ValueError, r"All \d+ rows of the train split were dropped", r"lower min_response_tokens \(now 1000\)",
        "raise `max_length` / lower `min_response_tokens`", cli=True),
]


# ---- the checks -----------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """(size, mtime, sha256) of every file under `root`."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(root.rglob("*")) if path.is_file()
    }


@pytest.fixture
def user(tmp_path, tokenizer, monkeypatch):
    person = User(tmp_path / "user", tokenizer)
    person.monkeypatch = monkeypatch
    return person


@pytest.fixture(autouse=True)
def no_optimizer_step():
    def stepped(optimizer, args, kwargs):
        raise AssertionError(f"{type(optimizer).__name__}.step() ran: the bad input was not refused before training")

    handle = register_optimizer_step_pre_hook(stepped)
    yield
    handle.remove()


def test_table_is_big_and_ids_unique():
    assert len(ROWS) >= 30 and len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row, user, capsys):
    action = row.build(user)
    before = snapshot(user.root)
    if row.cli:
        capsys.readouterr()
        assert main(list(action)) == 2
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("hf-distill: error:")]
        # one line, the last one: what comes before it is progress bars and log lines
        assert len(errors) == 1 and captured.err.rstrip().endswith(errors[0]), captured.err
        assert "Traceback" not in captured.err
        message = errors[0]
        with pytest.raises(BaseException) as raised:  # the same mistake, with the traceback
            main([*action, "--debug"])
        assert raised.type is row.error, raised.value
    else:
        with pytest.raises(BaseException) as raised:
            action()
        assert raised.type is row.error, repr(raised.value)
        message = str(raised.value)
        if user.trainer is not None:
            assert user.trainer.state.global_step == 0
    assert "\n" not in message.strip() and len(message) < 600, message
    assert re.search(row.given, message), f"the message does not name what was given: {message}"
    assert re.search(row.fix, message), f"the message does not say how to fix it: {message}"
    assert snapshot(user.root) == before, "a file of the user's changed"


# ---- the documented table -------------------------------------------------------------------------------------


def markdown_table(rows=ROWS) -> str:
    """The table of docs/troubleshooting.md: one line per row of the table above."""
    lines = ["| Bad input | Error | Fix |", "| --- | --- | --- |"]
    for row in rows:
        error = f"`{row.error.__name__}`" + (", exit 2" if row.cli else "")
        lines.append(f"| {row.bad_input} | {error} | {row.fix_text} |")
    return "\n".join(lines)


def test_docs_have_the_table():
    docs = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    assert markdown_table() in docs, "docs/troubleshooting.md's table is out of date: paste markdown_table()"
