"""`DistillationConfig`: `TrainingArguments` plus the knobs of knowledge distillation."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .loss import CROSS_TOKENIZER, HIDDEN_LOSS_TYPES, LOSS_TYPES, MULTI_TEACHER, check_loss_settings, check_reduction, normalized_weights
from .modeling import resolve_init_kwargs
from .quantization import QUANTIZATION_SCHEMES, check_scheme


@dataclass
class DistillationConfig(TrainingArguments):
    r"""
    Configuration for [`DistillationTrainer`]: every [`~transformers.TrainingArguments`] field, plus the
    distillation settings below. The loss is `alpha · KD + (1 − alpha) · CE`, where KD is the divergence
    between teacher and student (at `temperature`) and CE the student's own loss on the labels, both
    averaged over the target tokens of the whole accumulated batch.
    """

    # list[str] first: HfArgumentParser then takes it as a str option (it fails on `str | list[str] | None`)
    teacher_model_name_or_path: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of the teacher, used when the trainer is given no teacher_model. A list "
            "(on a command line: comma-separated) distills from several teachers at once, see multi_teacher."
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "With several teachers: one weight each, in their order (normalized to sum to 1); None: equal."
        },
    )
    multi_teacher: str = field(
        default="mean_probs",
        metadata={
            "help": "With several teachers, how their targets combine: 'mean_probs' distills toward the weighted mixture "
            "of their distributions at the temperature (computed in log space); 'mean_loss' sums each teacher's "
            "divergence, weighted. Each teacher's divergence is logged as kd_loss/<name>.",
            "choices": list(MULTI_TEACHER),
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for the teacher's from_pretrained, as a dict or a JSON string, e.g. "
            '\'{"dtype": "bfloat16"}\'. The teacher runs in that dtype (float32 when not given).'
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the distillation term in [0, 1]: loss = alpha·KD + (1 − alpha)·CE. 0 is exactly the "
            "student's own loss (the teacher is not run in training), 1 is pure distillation."
        },
    )
    alpha_end: float | None = field(
        default=None,
        metadata={
            "help": "With a value in [0, 1], alpha moves linearly from `alpha` at the first optimizer step to "
            "`alpha_end` at the last, and is logged as `alpha`; None keeps alpha constant. 0.8 → 0.2 leans on the "
            "teacher first and on the data last (KD stopped early helps small students: Cho & Hariharan, 2019); "
            "0 → 0.5 warms the KD term up."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature T > 0 for both models in the KD term; KL-type losses are scaled by T²."},
    )
    loss_type: str = field(
        default="forward_kl",
        metadata={
            "help": "The divergence: forward_kl T²·KL(p‖q), reverse_kl T²·KL(q‖p), jsd (generalized, see beta), "
            "skew_kl / skew_reverse_kl (DistiLLM, see skew), tvd (total variation), mse or cosine (on raw logits). "
            "p is the teacher's distribution, q the student's.",
            "choices": list(LOSS_TYPES),
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "For loss_type='jsd': the mixture m = beta·p + (1 − beta)·q and loss beta·KL(p‖m) + "
            "(1 − beta)·KL(q‖m), in [0, 1]; 0 gives forward KL and 1 reverse KL (TRL GKD's convention)."
        },
    )
    skew: float = field(
        default=0.1,
        metadata={
            "help": "For skew_kl: KL(p ‖ skew·p + (1 − skew)·q); for skew_reverse_kl: KL(q ‖ (1 − skew)·p + skew·q). "
            "In [0, 1]; DistiLLM uses 0.1."
        },
    )
    distill_all_tokens: bool = field(
        default=False,
        metadata={
            "help": "Distill on every non-padding position (prompt included) instead of only where labels are not "
            "-100. The CE term always uses the labels. Causal LMs only; seq2seq and classifiers ignore it."
        },
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss from the final hidden states chunk by chunk, never holding full (tokens, vocab) "
            "logits of either model. Used where the model takes `logits_to_keep` and its head is a plain linear "
            "layer (checked once on the first batch); other models fall back to full logits."
        },
    )
    chunk_size: int | None = field(
        default=None,
        metadata={"help": "Positions per chunk of the chunked loss; None picks about 16M logits a chunk on CPU, 134M on GPU."},
    )
    compile_loss: bool = field(
        default=False,
        metadata={
            "help": "Fuse the chunked loss's per-chunk math (softmaxes, divergence, its gradient) with `torch.compile`, "
            "for a one-off compile (needs a C++ compiler; on GPU, Triton). Applies to a live teacher with forward_kl, "
            "reverse_kl or jsd. Measured speed-ups: benchmarks/RESULTS.md."
        },
    )

    hidden_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight γ of the intermediate-layer term: loss = alpha·KD + (1 − alpha)·CE + γ·H, where H averages, "
            "over the student's layers and the distilled positions, the distance between each student layer's output "
            "and the output of the teacher layer it is mapped to (layer_map); where hidden sizes differ, a learned linear "
            "projection per mapped layer maps the student's to the teacher's (trained, checkpointed, not exported). "
            "Needs a live teacher. Seq2seq models match decoder layers; classifiers "
            "match each row's mean hidden state over its tokens. 0 turns it off."
        },
    )
    hidden_loss_type: str = field(
        default="mse",
        metadata={
            "help": "Distance of the hidden-state term, scale-free so γ = 1 suits any model: 'mse' is ‖s − t‖² / ‖t‖² "
            "per position (relative squared error), 'cosine' is 1 − cos(s, t).",
            "choices": list(HIDDEN_LOSS_TYPES),
        },
    )
    attention_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the attention-relation term (MiniLM v2): loss += weight · A, where A averages, over the "
            "student's layers, their query–query, key–key and value–value relations and the distilled positions, the "
            "KL divergence from the relations of the teacher layer each is mapped to (layer_map). A relation is the "
            "softmax over a row's earlier positions of scaled dot products, split into heads (the greatest common "
            "divisor of the models' key/value head counts), so the models' widths may differ. Needs a live teacher "
            "and causal LMs whose blocks have self_attn.q_proj/k_proj/v_proj (Llama, Mistral, Qwen, Gemma). "
            "0 turns it off."
        },
    )
    layer_map: list[int] | None = field(
        default=None,
        metadata={
            "help": "For each student layer, the index of the teacher layer whose output (and attention relations) it "
            "learns to match. None: a "
            "student cut or pruned from the teacher maps each layer to the one it came from (recorded in its config "
            "as distill_source_layers); other students spread their layers uniformly over the teacher's."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of an offline teacher cache (`hf-distill cache-teacher`): training reads the teacher's "
            "stored top-k log-probabilities instead of running it. The cache must match the training data, "
            "tokenizer, temperature and distill_all_tokens. Causal LMs."
        },
    )
    teacher_cache_tail: str = field(
        default="bucket",
        metadata={
            "help": "With teacher_cache: 'bucket' keeps the teacher's mass outside its top-k as one extra bucket "
            "(compared with the student's mass there); 'renormalize' drops it and renormalizes both top-k.",
            "choices": ["bucket", "renormalize"],
        },
    )
    teacher_server_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of an OpenAI-compatible server (vLLM, SGLang) serving the teacher, e.g. "
            "http://localhost:8000: training asks it for the teacher's top-k log-probabilities at every position of "
            "each row and distills from them like from teacher_cache (its weights never load here). Causal LMs, the "
            "student's tokenizer (checked at start), temperature 1, probability losses (not mse/cosine), no "
            "hidden-state term. Batches are prepared by dataloader_num_workers processes (1 unless set) so the "
            "next batches' requests run during the current step. teacher_model_name_or_path may name a local copy "
            "of the served model: the trainer never loads it; recipes make their student from it and score the "
            "teacher's row with it. See docs/served_teacher.md."
        },
    )
    teacher_server_model: str | None = field(
        default=None,
        metadata={"help": "The served teacher's name (vLLM's --served-model-name); None takes the server's only model."},
    )
    teacher_server_top_k: int = field(
        default=20,
        metadata={"help": "Log-probabilities asked per position (vLLM serves at most its --max-logprobs, 20 by "
                  "default); the rest of the teacher's mass is kept as one bucket, like teacher_cache_tail."},
    )
    teacher_server_timeout: float = field(
        default=120.0, metadata={"help": "Seconds to wait for one answer of the teacher server."}
    )
    teacher_server_retries: int = field(
        default=3,
        metadata={"help": "Further tries after a connection error, a timeout or a 5xx answer of the teacher server "
                  "(1, 2, 4... s apart) before training stops with an error naming the server."},
    )
    cross_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "A teacher with another tokenizer. None (default): the tokenizers must match (checked). 'uld': "
            "Universal Logit Distillation, the L1 distance between the two models' sorted probability vectors, on "
            "response positions paired in order (the k-th target token of each tokenization, cut to the shorter); "
            "it replaces loss_type's divergence. 'align': only response tokens covering the same characters in both "
            "tokenizations are distilled, with loss_type's divergence over the tokens both vocabularies spell alike "
            "(plus one bucket for the rest). Each row is tokenized again by the teacher's tokenizer (from "
            "teacher_processing_class or the teacher's folder). Causal LMs, one live teacher.",
            "choices": [None, *CROSS_TOKENIZER],
        },
    )

    student_quantization: str = field(
        default="none",
        metadata={
            "help": "Quantization-aware distillation: 'int8' or 'int4' trains the student with fake-quantized weights "
            "(torchao QAT; linear layers, not the embeddings or head) against the full-precision teacher, and exports "
            "it quantized (weight-only). 'none' trains in full precision.",
            "choices": list(QUANTIZATION_SCHEMES),
        },
    )

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation (GKD, Agarwal et al.): the fraction of optimizer steps, in [0, 1], whose "
            "batches are replaced by the student's own responses to the batch's prompts (the part of each row whose "
            "labels are -100), sampled with `generate` and then distilled on the generated tokens. Decided per step by "
            "an RNG seeded with `seed`, so runs repeat. Causal LMs with a live teacher; 0 (default) trains on the "
            "dataset only, 1 on generated responses only (prompt-only datasets then suffice)."
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "On-policy steps (lmbda > 0) and seq_kd: the most tokens the student (or teacher) generates per prompt."},
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={
            "help": "On-policy steps (lmbda > 0): the sampling temperature (> 0) of the student's responses, separate "
            "from the loss's `temperature`. 1 samples the student's own distribution (no top-k / top-p)."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level distillation (Kim & Rush): the teacher answers each batch's prompts (greedy, up to "
            "max_new_tokens) and the student trains on those responses instead of the dataset's: CE on the teacher's "
            "tokens plus the KD term. With lmbda > 0, on-policy steps use the student's responses and the others the "
            "teacher's (as TRL's GKD seq_kd). Causal LMs (or seq2seq: the teacher writes each source's target) with a "
            "live teacher; prompt-only datasets then suffice."
        },
    )
    seq_kd_sampling: bool = field(
        default=False,
        metadata={"help": "seq_kd: sample the teacher's responses at generation_temperature instead of greedy decoding."},
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "On-policy steps (lmbda > 0): the student's responses are written by a vLLM server holding a copy "
            "of the student, sent the student's current weights every vllm_sync_interval steps, instead of by HF "
            "`generate` in the training process (docs/served_teacher.md)."
        },
    )
    vllm_mode: str = field(
        default="server",
        metadata={"help": "use_vllm: 'server' (a vLLM server at vllm_server_base_url) or 'colocate' (a vLLM engine "
                  "inside the training process, handed the weights in memory; one process, vLLM must import there).",
                  "choices": ["server", "colocate"]},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "vllm_mode='colocate' on a GPU: the share of its memory the engine may take next to training."},
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={"help": "vllm_mode='colocate': the longest prompt + response the engine holds. Default: the "
                  "student's position limit, at most 4096."},
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "use_vllm: the student's vLLM server, e.g. http://localhost:8001, started on the student's "
                  "starting weights with VLLM_SERVER_DEV_MODE=1 (it reloads new weights through /collective_rpc)."},
    )
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "use_vllm: seconds to wait for one answer of the student's vLLM server."}
    )
    vllm_sync_interval: int = field(
        default=1,
        metadata={"help": "use_vllm: send the student's weights to the server before an on-policy step when this many "
                  "optimizer steps have passed since the last send (1: every on-policy step samples the current "
                  "student; larger values trade staleness for time)."},
    )
    vllm_sync_adapters: bool = field(
        default=False,
        metadata={"help": "use_vllm with a PEFT LoRA student: send only its adapters, which the server loads in place "
                  "as a LoRA adapter and samples (start it with --enable-lora --max-lora-rank R and "
                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), instead of weights with the adapters merged in: megabytes "
                  "instead of the whole model."},
    )
    vllm_weights_dir: str | None = field(
        default=None,
        metadata={"help": "use_vllm: the folder the student's weights are written to for the server to read (it must "
                  "see the same path); with vllm_mode='colocate', its starting weights, which the engine loads. "
                  "Default: <output_dir>/vllm-weights."},
    )

    def __post_init__(self):
        # A YAML list or string here would otherwise fail deep inside a comparison or the optimizer.
        for name in ("alpha", "temperature", "beta", "skew", "hidden_loss_weight", "attention_loss_weight",
                     "learning_rate", "lmbda", "generation_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                default = self.__dataclass_fields__[name].default
                raise TypeError(f"{name}={value!r} must be a number, for instance {name}={default!r}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number >= 0, for instance 5e-05.")
        if self.teacher_cache_tail not in ("bucket", "renormalize"):
            raise ValueError(f"teacher_cache_tail={self.teacher_cache_tail!r}; choose 'bucket' or 'renormalize'.")
        check_loss_settings(self.loss_type, self.temperature, self.beta, self.skew)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha={self.alpha!r} must lie in [0, 1]: loss = alpha·KD + (1 − alpha)·CE (0 = no teacher, 1 = pure KD)."
            )
        end = self.alpha_end
        if end is not None and (isinstance(end, bool) or not isinstance(end, (int, float)) or not 0.0 <= end <= 1.0):
            raise ValueError(
                f"alpha_end={end!r} must be a number in [0, 1] (where alpha ends), or None to keep alpha constant."
            )
        for name in ("hidden_loss_weight", "attention_loss_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0 (0 turns it off).")
        if self.hidden_loss_type not in HIDDEN_LOSS_TYPES:
            raise ValueError(f"hidden_loss_type={self.hidden_loss_type!r}; choose one of {', '.join(HIDDEN_LOSS_TYPES)}.")
        if isinstance(self.layer_map, str):  # from a command line: "0,3,6" or "[0, 3, 6]"
            self.layer_map = [int(i) for i in self.layer_map.strip("[] ").split(",") if i.strip()]
        self._check_on_policy()
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be a positive number of positions (or None for auto).")
        self.teacher_model_init_kwargs = parse_init_kwargs(self.teacher_model_init_kwargs)
        self._check_teachers()
        self._check_cross_tokenizer()
        self._check_teacher_server()
        self._check_vllm()
        check_scheme("student_quantization", self.student_quantization)
        super().__post_init__()

    @property
    def distills(self) -> bool:
        """Whether the KD term has weight at any step (alpha, or where a schedule takes it)."""
        return self.alpha > 0 or bool(self.alpha_end)

    @property
    def matches_layers(self) -> bool:
        """Whether a layer term (hidden states or attention relations) is on."""
        return self.hidden_loss_weight > 0 or self.attention_loss_weight > 0

    def alpha_at(self, step: int, total_steps: int) -> float:
        """The KD weight at optimizer step `step` (0-based) of `total_steps`: alpha, or along its line to alpha_end."""
        if self.alpha_end is None:
            return self.alpha
        progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        return self.alpha + (self.alpha_end - self.alpha) * progress

    def _check_on_policy(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(
                f"lmbda={self.lmbda!r} must lie in [0, 1]: the fraction of steps trained on the student's own "
                "responses (0 = the dataset only, 1 = generated responses only)."
            )
        if not (math.isfinite(self.generation_temperature) and self.generation_temperature > 0):
            raise ValueError(
                f"generation_temperature={self.generation_temperature!r} must be a finite number > 0 (1.0 samples the "
                "student's own distribution; small values approach greedy decoding)."
            )
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens!r} must be a whole number >= 1 of tokens to generate per prompt, "
                "for instance max_new_tokens=128."
            )

    def _check_teachers(self) -> None:
        """Several teachers: a comma-separated command-line value becomes a list; weights and reduction are checked."""
        teachers = self.teacher_model_name_or_path
        if isinstance(teachers, str) and "," in teachers:
            teachers = self.teacher_model_name_or_path = [name.strip() for name in teachers.split(",") if name.strip()]
        if isinstance(teachers, list):
            if not teachers or not all(isinstance(name, str) for name in teachers):
                raise ValueError(f"teacher_model_name_or_path={teachers!r} must be a path or Hub id, or a non-empty list of them.")
            if len(teachers) == 1:
                self.teacher_model_name_or_path = teachers[0]
        check_reduction(self.multi_teacher)
        if self.teacher_weights is not None:
            count = len(teachers) if isinstance(teachers, list) else len(self.teacher_weights)
            normalized_weights(self.teacher_weights, count)

    def _check_cross_tokenizer(self) -> None:
        """What a teacher with another tokenizer can't be combined with, refused before anything loads."""
        value = self.cross_tokenizer
        if value is None:
            return
        if value not in CROSS_TOKENIZER:
            raise ValueError(f"cross_tokenizer={value!r}; choose one of {', '.join(CROSS_TOKENIZER)}, or None (one tokenizer).")
        if value == "align" and self.loss_type in ("mse", "cosine"):
            raise ValueError(
                f"cross_tokenizer='align' compares probabilities over the tokens both vocabularies share, but "
                f"loss_type={self.loss_type!r} compares raw logits: choose forward_kl, reverse_kl, jsd, skew_kl, "
                "skew_reverse_kl or tvd."
            )
        conflicts = [
            (self.teacher_cache is not None, f"teacher_cache={self.teacher_cache!r}", "a cache holds the logits of one "
             "tokenizer's positions; drop teacher_cache"),
            (bool(self.hidden_loss_weight), f"hidden_loss_weight={self.hidden_loss_weight}", "hidden states of two "
             "tokenizations do not line up; set hidden_loss_weight=0"),
            (bool(self.attention_loss_weight), f"attention_loss_weight={self.attention_loss_weight}", "attention "
             "relations of two tokenizations do not line up; set attention_loss_weight=0"),
            (isinstance(self.teacher_model_name_or_path, list), f"{len(self.teacher_model_name_or_path or [])} "
             "teachers", "distill from one teacher"),
            (self.lmbda > 0, f"lmbda={self.lmbda}", "generated responses have no teacher tokenization; set lmbda=0"),
            (self.seq_kd, "seq_kd=True", "the teacher's responses are in its own tokens; drop seq_kd"),
            (self.distill_all_tokens, "distill_all_tokens=True", "positions are aligned on the response only; drop it"),
        ]
        for conflict, given, fix in conflicts:
            if conflict:
                raise ValueError(f"cross_tokenizer={value!r} does not work with {given}: {fix}.")

    def _check_teacher_server(self) -> None:
        """What a served teacher can't be combined with, refused before anything loads."""
        url = self.teacher_server_url
        if url is None:
            return
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_server_url={url!r} must be an http(s) URL, like http://localhost:8000.")
        self._check_whole_number("teacher_server_top_k", 1)
        self._check_whole_number("teacher_server_retries", 0)
        self._check_seconds("teacher_server_timeout")
        conflicts = [
            (self.teacher_cache is not None, f"teacher_cache={self.teacher_cache!r}",
             "train from one or the other (`hf-distill cache-teacher --teacher_server_url` builds a cache from the server)"),
            (isinstance(self.teacher_model_name_or_path, list), f"{len(self.teacher_model_name_or_path or [])} "
             "teachers in teacher_model_name_or_path", "a server serves one teacher; name its local copy only"),
            (self.temperature != 1.0, f"temperature={self.temperature}",
             "a server gives log-probabilities at temperature 1 only, whose tail can't be re-tempered; set temperature=1"),
            (self.loss_type in ("mse", "cosine"), f"loss_type={self.loss_type!r}",
             "a server gives log-probabilities, not logits; choose a probability loss like forward_kl"),
            (bool(self.hidden_loss_weight), f"hidden_loss_weight={self.hidden_loss_weight}",
             "a server gives no hidden states; set hidden_loss_weight=0"),
            (bool(self.attention_loss_weight), f"attention_loss_weight={self.attention_loss_weight}",
             "a server gives no attention states; set attention_loss_weight=0"),
            (self.cross_tokenizer is not None, f"cross_tokenizer={self.cross_tokenizer!r}",
             "serve a teacher with the student's tokenizer"),
        ]
        for conflict, given, fix in conflicts:
            if conflict:
                raise ValueError(f"teacher_server_url={url!r} does not work with {given}: {fix}.")
        if self.dataloader_num_workers == 0:  # requests for the next batches overlap the current step
            self.dataloader_num_workers = 1

    def _check_whole_number(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} must be a whole number >= {minimum}.")

    def _check_seconds(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name}={value!r} must be a number of seconds > 0.")

    def _check_vllm(self) -> None:
        if self.vllm_sync_adapters and not self.use_vllm:
            raise ValueError("vllm_sync_adapters=True sends a LoRA student's adapters to its vLLM server, but use_vllm "
                             "is off; set use_vllm=True (and vllm_server_base_url) or drop vllm_sync_adapters.")
        if not self.use_vllm:
            return
        if self.lmbda == 0:
            raise ValueError("use_vllm=True generates the student's on-policy responses, but lmbda=0 trains on none; "
                             "set lmbda > 0 or drop use_vllm.")
        self._check_whole_number("vllm_sync_interval", 1)
        if self.vllm_mode == "colocate":
            given = [name for name in ("vllm_server_base_url", "vllm_sync_adapters") if getattr(self, name)]
            if given:
                raise ValueError(f"vllm_mode='colocate' runs vLLM inside the training process; {' and '.join(given)} "
                                 f"{'are' if len(given) > 1 else 'is'} for vllm_mode='server'. Drop "
                                 f"{'them' if len(given) > 1 else 'it'}, or use vllm_mode='server'.")
            utilization = self.vllm_gpu_memory_utilization
            if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
                raise ValueError(f"vllm_gpu_memory_utilization={utilization!r} must be a share in (0, 1], e.g. 0.3.")
            if self.vllm_max_model_length is not None:
                self._check_whole_number("vllm_max_model_length", 2)
        elif self.vllm_mode == "server":
            url = self.vllm_server_base_url
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"use_vllm=True needs vllm_server_base_url, an http(s) URL like http://localhost:8001; "
                                 f"got {url!r}.")
            self._check_seconds("vllm_server_timeout")
        else:
            raise ValueError(f"vllm_mode={self.vllm_mode!r} must be 'server' or 'colocate'.")
        if self.vllm_weights_dir is None:
            self.vllm_weights_dir = os.path.join(self.output_dir or "trainer_output", "vllm-weights")


def parse_init_kwargs(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """`teacher_model_init_kwargs` as a dict: a JSON string from a command line or YAML is parsed, and checked."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"teacher_model_init_kwargs={value!r} is not valid JSON ({error}); write it like '{{\"dtype\": \"bfloat16\"}}'."
            ) from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(
            f"teacher_model_init_kwargs={value!r} must be a mapping of from_pretrained arguments, like "
            '{"dtype": "bfloat16"}.'
        )
    try:
        resolve_init_kwargs(value)  # an unknown dtype name is refused now, not when the teacher loads
    except ValueError as error:
        raise ValueError(f"teacher_model_init_kwargs has {error}") from None
    return value
