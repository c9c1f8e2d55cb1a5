"""A teacher behind an OpenAI-compatible inference server (vLLM, SGLang): its weights never enter training.

For each row the server is asked for the teacher's top-k log-probabilities at every position of the row's own tokens
(`/v1/completions` with `prompt_logprobs`, keyed by token id). They take the offline cache's shape (`CachedTeacher`:
top-k ids, their log-probs, and the mass outside them kept as one bucket), so every loss the cache supports works
the same way. A served model gives log-probabilities at temperature 1 and no logits, hence temperature 1 and the
probability losses only (checked in the config).

`ServedTeacherCollator` asks while batches are collated, so with `dataloader_num_workers` > 0 the next batches'
requests run while the current step trains. A request that fails for a passing reason (no connection, a timeout, a
5xx) is retried; the step never trains on a partial answer: an answer is checked whole or raised as `ServerError`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .forward import target_positions
from .modeling import CACHE_COLUMNS, CAUSAL

# Compared with the student's tokenizer once at start: words, digits, spacing and punctuation of several kinds.
TOKENIZER_PROBE = "Hello world! The 3 quick brown foxes jumped over 12 lazy dogs.\n  Ça va? naïve café — end."


class ServerError(RuntimeError):
    """The teacher server could not be used; the message names the URL and what to change."""


@dataclass
class TeacherServer:
    """A client of one served teacher.

    Args:
        url: the server's base URL, e.g. http://localhost:8000 (a trailing /v1 is accepted).
        model: the served model's name; None takes the one model the server serves.
        top_k: log-probabilities per position (vLLM serves at most its `--max-logprobs`, 20 by default).
        timeout: seconds to wait for one answer.
        retries: further tries after a connection error, a timeout or a 5xx answer (with 1, 2, 4... s between).
    """

    url: str
    model: str | None = None
    top_k: int = 20
    timeout: float = 120.0
    retries: int = 3
    _session: Any = field(default=None, repr=False, compare=False)
    _pid: int | None = field(default=None, repr=False, compare=False)

    label = "teacher server"  # in messages
    fields = "teacher_server"  # the config fields' prefix, in messages

    def __post_init__(self):
        url = self.url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url

    @classmethod
    def from_config(cls, args) -> "TeacherServer":
        return cls(args.teacher_server_url, args.teacher_server_model, args.teacher_server_top_k,
                   args.teacher_server_timeout, args.teacher_server_retries)

    # ---- HTTP ---------------------------------------------------------------------------------------

    def _http(self):
        import requests  # a dependency of huggingface_hub's and datasets' stacks; imported only when serving

        if self._session is None or self._pid != os.getpid():  # a DataLoader worker opens its own connections
            self._session, self._pid = requests.Session(), os.getpid()
        return requests, self._session

    def request(self, method: str, path: str, payload: dict | None = None, text: bool = False) -> Any:
        """The JSON answer to one request (`text`: its text), retried on a passing fault; a refusal (4xx) is raised
        at once."""
        requests, session = self._http()
        address = f"{self.url}{path}"
        fault = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 30))
            try:
                answer = session.request(method, address, json=payload, timeout=self.timeout)
            except requests.Timeout:
                fault = f"no answer within {self.fields}_timeout={self.timeout:g} s"
                continue
            except requests.ConnectionError as error:
                fault = f"cannot connect ({type(error).__name__})"
                continue
            if answer.status_code >= 500:
                fault = f"HTTP {answer.status_code}: {_message(answer)}"
                continue
            if answer.status_code >= 400:
                raise ServerError(self._refusal(path, answer.status_code, _message(answer)))
            if text:
                return answer.text
            try:
                return answer.json()
            except ValueError:
                raise ServerError(f"The {self.label} at {address} answered with something that is not JSON.") from None
        raise ServerError(
            f"The {self.label} at {address} failed {self.retries + 1} times ({fault}). Is it running and reachable? "
            f"Start it (docs/served_teacher.md), or raise {self.fields}_timeout / {self.fields}_retries."
        )

    def _refusal(self, path: str, status: int, message: str) -> str:
        hint = ""
        lowered = message.lower()
        if status == 404 and "model" in lowered:
            hint = f" Set {self.fields}_model to a name the server lists at /v1/models."
        elif "logprobs" in lowered:
            hint = f" Start the server with --max-logprobs {self.top_k} or more, or lower {self.fields}_top_k."
        elif "length" in lowered or "context" in lowered or "too long" in lowered:
            hint = " Restart the server with a larger --max-model-len, or train on shorter rows (max_length)."
        return f"The {self.label} at {self.url}{path} refused the request (HTTP {status}: {message}).{hint}"

    # ---- start-up checks ----------------------------------------------------------------------------

    def check(self, tokenizer, max_length: int | None = None) -> str:
        """Check the served model once before training: it is there, takes rows of `max_length` tokens, and
        tokenizes like `tokenizer`. Returns its name (and keeps it for the requests)."""
        listed = self.request("GET", "/v1/models").get("data", [])
        names = [entry.get("id") for entry in listed]
        if self.model is None:
            if len(names) != 1:
                raise ServerError(
                    f"The {self.label} at {self.url} serves {names or 'no models'}; set {self.fields}_model to one."
                )
            self.model = names[0]
        elif self.model not in names:
            raise ServerError(
                f"{self.fields}_model={self.model!r} is not served at {self.url}, which serves {names}. Use one of "
                "those names (vLLM's --served-model-name)."
            )
        limit = next((entry.get("max_model_len") for entry in listed if entry.get("id") == self.model), None)
        if limit is not None and max_length is not None and limit < max_length:
            raise ServerError(
                f"The {self.label} at {self.url} takes at most {limit} tokens a row (--max-model-len) but training "
                f"rows hold up to {max_length}. Restart it with --max-model-len {max_length} or more, or lower max_length."
            )
        if tokenizer is not None:
            self._check_tokenizer(getattr(tokenizer, "tokenizer", tokenizer))
        return self.model

    def _check_tokenizer(self, tokenizer) -> None:
        served = self.request("POST", "/tokenize", {"model": self.model, "prompt": TOKENIZER_PROBE,
                                                    "add_special_tokens": False}).get("tokens")
        ours = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
        if served != ours:
            raise ServerError(
                f"The model served at {self.url} ({self.model}) tokenizes text differently from the student's "
                f"tokenizer ({_preview(served)} vs {_preview(ours)}): its log-probabilities would be over other "
                "tokens. Serve a teacher with the student's tokenizer."
            )

    # ---- top-k log-probabilities --------------------------------------------------------------------

    def top_k_logprobs(self, rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each row of token ids: (ids, log-probs), each (len(row) − 1, top_k), where entry t is the teacher's
        distribution at position t over the token at t + 1, most likely first."""
        if not rows:
            return []
        payload = {
            "model": self.model,
            "prompt": rows,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.top_k,
            "return_tokens_as_token_ids": True,
        }
        choices = sorted(self.request("POST", "/v1/completions", payload).get("choices", []), key=lambda c: c["index"])
        if len(choices) != len(rows):
            raise ServerError(f"The {self.label} at {self.url} answered {len(choices)} of {len(rows)} rows.")
        return [self._entries(row, choice.get("prompt_logprobs")) for row, choice in zip(rows, choices)]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 seed: int | None = None) -> list[list[int]]:
        """Each prompt's continuation as token ids (greedy, or sampled from the whole distribution at
        `temperature`), up to `max_new_tokens` or the model's EOS (kept)."""
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": max_new_tokens,
            "temperature": 0.0 if greedy else temperature,
            "top_p": 1.0,
            "top_k": -1,
            "seed": seed,
            "return_token_ids": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,  # older servers: the ids are in the log-prob entries' names
        }
        choices = sorted(self.request("POST", "/v1/completions", payload).get("choices", []), key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise ServerError(f"The {self.label} at {self.url} answered {len(choices)} of {len(prompts)} prompts.")
        return [_generated_ids(choice, self) for choice in choices]

    def _entries(self, row: list[int], positions) -> tuple[np.ndarray, np.ndarray]:
        if positions is None or len(positions) != len(row):
            raise ServerError(
                f"The {self.label} at {self.url} gave log-probs for {0 if positions is None else len(positions)} of "
                f"a row's {len(row)} positions; is it vLLM (or SGLang) with prompt_logprobs support?"
            )
        k = self.top_k
        ids = np.empty((len(row) - 1, k), dtype=np.int64)
        logprobs = np.empty((len(row) - 1, k), dtype=np.float32)
        for t, entries in enumerate(positions[1:]):  # position 0's entry (the first token's own) is None
            # The top-k, plus the row's actual token when it is not among them: keep the k most likely.
            ranked = sorted(((float(v["logprob"]), int(key)) for key, v in (entries or {}).items()), reverse=True)[:k]
            if len(ranked) < k:
                raise ServerError(
                    f"The {self.label} at {self.url} gave {len(ranked)} log-probs at a position, fewer than "
                    f"{self.fields}_top_k={k}: start it with --max-logprobs {k} or more."
                )
            logprobs[t], ids[t] = zip(*ranked)
        return ids, logprobs


@dataclass
class RolloutServer(TeacherServer):
    """The student's copy on a vLLM server (`use_vllm`, `vllm_mode="server"`), which writes the on-policy responses.

    The server is started on the student's starting weights with `VLLM_SERVER_DEV_MODE=1` (for its
    `/collective_rpc` and `/reset_prefix_cache` routes). `push_weights` writes the student's current weights to a
    folder the server can read and has it reload them in place (with `sync_adapters`, a LoRA student's adapters,
    loaded in place as the adapter it then samples); the prefix cache, computed with the old weights, is dropped.
    """

    label = "student's vLLM server"
    fields = "vllm_server"
    adapter = "hf-distill-student"  # the LoRA adapter's name on the server (vllm_sync_adapters)
    sync_adapters: bool = False  # send a LoRA student's adapters, not its merged weights

    @classmethod
    def from_config(cls, args) -> "RolloutServer":
        return cls(args.vllm_server_base_url, None, 1, args.vllm_server_timeout, sync_adapters=args.vllm_sync_adapters)

    def check(self, tokenizer, max_length: int | None = None) -> str:
        name = super().check(tokenizer, max_length)
        try:
            self.request("POST", "/reset_prefix_cache")
        except ServerError as error:
            if "HTTP 404" not in str(error):
                raise
            raise ServerError(
                f"The {self.label} at {self.url} cannot take new weights: start it with VLLM_SERVER_DEV_MODE=1 "
                "(docs/served_teacher.md)."
            ) from None
        if self.sync_adapters:
            self._check_adapter_routes()
        return name

    def _check_adapter_routes(self) -> None:
        # Unloading our adapter (left by an earlier run, or absent) changes nothing else and tells whether the server
        # has vLLM's runtime LoRA routes: without them the path itself is unknown ("Not Found").
        try:
            self.request("POST", "/v1/unload_lora_adapter", {"lora_name": self.adapter}, text=True)
        except ServerError as error:
            if "HTTP 404: Not Found" not in str(error):
                return  # the route answered: our adapter is not loaded yet
            raise ServerError(
                f"The {self.label} at {self.url} cannot take LoRA adapters (vllm_sync_adapters=True): start it with "
                "--enable-lora --max-lora-rank R (R ≥ the adapters' rank) and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                "in its environment, or set vllm_sync_adapters=False to send merged weights."
            ) from None

    def push_weights(self, student, folder: str, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Send `student`'s weights (a `PreTrainedModel`, or a PEFT model whose adapters are merged in) to the server,
        saved to `folder`; `weights`: a sharded student's, gathered whole. With `sync_adapters`, a LoRA student's
        adapters alone, loaded in place as the adapter the server then samples."""
        if self.sync_adapters:
            self._push_adapters(student, folder)
        else:
            model, weights = served_weights(student, weights)
            model.save_pretrained(folder, state_dict=weights)
            self.request("POST", "/collective_rpc",
                         {"method": "reload_weights", "kwargs": {"weights_path": os.path.abspath(folder)}})
        self.request("POST", "/reset_prefix_cache")  # its blocks were computed with the old weights

    def _push_adapters(self, student, folder: str) -> None:
        name = student.active_adapter
        student.save_pretrained(folder, selected_adapters=[name])
        path = folder if name == "default" else os.path.join(folder, name)  # PEFT saves other names in a subfolder
        self.request("POST", "/v1/load_lora_adapter",
                     {"lora_name": self.adapter, "lora_path": os.path.abspath(path), "load_inplace": True}, text=True)
        self.model = self.adapter


def served_weights(student, weights: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the model to save, its weights) as the served model names them: a PEFT student's adapters merged into its
    base weights (and unmerged again), the hidden-state term's projections left out. `weights`: the student's
    whole weights when they were gathered from shards."""
    from .teachers import PROJECTIONS  # the projections are not the served model's

    if not hasattr(student, "peft_config"):
        weights = student.state_dict() if weights is None else weights
        return student, {name: value for name, value in weights.items() if not name.startswith(PROJECTIONS)}
    weights = {}
    student.merge_adapter()
    try:
        for name, value in student.state_dict().items():
            if "lora_" in name or ".original_module." in name or PROJECTIONS in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            weights[name.replace(".modules_to_save.default.", ".")] = value.detach().clone()
    finally:
        student.unmerge_adapter()
    return student.get_base_model(), weights


def attach_rollouts(args, student, processing_class, synced: bool):
    """The checked `RolloutServer` (or, with vllm_mode="colocate", a `ColocatedRollouts`) when `use_vllm` is set,
    else None."""
    if not args.use_vllm:
        return None
    if args.vllm_mode == "colocate":
        if args.world_size > 1:  # vLLM inside a distributed run needs its external-launcher mode, not built here
            raise ValueError(f"vllm_mode='colocate' runs in one training process; this run has {args.world_size}. "
                             "Start a vLLM server on the student and use vllm_mode='server'.")
        from .colocated import ColocatedRollouts

        return ColocatedRollouts.from_config(args, student, processing_class)
    if synced and hasattr(student, "peft_config"):
        raise ValueError("use_vllm: a sharded PEFT student's adapters are not merged for vLLM; train it with DDP, "
                         "merge them first (merge_and_unload) or set use_vllm=False.")
    if args.vllm_sync_adapters:
        check_lora_student(student)
    server = RolloutServer.from_config(args)
    server.check(processing_class)
    return server


def check_lora_student(student) -> None:
    """vllm_sync_adapters: the student is a PEFT LoRA model whose trained weights are all in its adapters."""
    config = getattr(student, "peft_config", {}).get(getattr(student, "active_adapter", None))
    kind = getattr(getattr(config, "peft_type", None), "value", None)
    if kind != "LORA":
        raise ValueError(f"vllm_sync_adapters=True sends a LoRA student's adapters, but the student is "
                         f"{'a ' + kind + ' PEFT model' if kind else 'not a PEFT model'}; set vllm_sync_adapters=False "
                         "to send its (merged) weights.")
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"vllm_sync_adapters=True: the student also trains whole modules ({config.modules_to_save}, "
                         "modules_to_save), which vLLM's LoRA adapters do not carry; set vllm_sync_adapters=False to "
                         "send merged weights.")


@dataclass
class ServedTeacherCollator:
    """Wraps a collator: each batch also carries the served teacher's top-k at its distilled positions, flattened
    row-major like the trainer's selection (the same keys as `CachedTeacherCollator`)."""

    collator: Any
    server: TeacherServer
    distill_all_tokens: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return add_served_targets(self.collator(features), self.server, self.distill_all_tokens)


def add_served_targets(batch: dict[str, Any], server: TeacherServer, distill_all_tokens: bool = False) -> dict[str, Any]:
    """`batch` with `teacher_ids`, `teacher_logprobs` and `teacher_lse` from the server at its distilled positions."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    _, ce_mask, kd_mask = target_positions(batch["labels"], mask, CAUSAL, distill_all_tokens)
    select = (ce_mask | kd_mask).cpu()
    rows = [input_ids[i][real[i]].tolist() for i in range(input_ids.shape[0])]
    answers = server.top_k_logprobs([row for row in rows if len(row) > 1])
    ids, logprobs = [], []
    answer = iter(answers)
    for i, row in enumerate(rows):
        if len(row) <= 1:
            continue
        row_ids, row_logprobs = next(answer)
        # A selected position's index among the row's real tokens is the entry that predicts the next one.
        index = torch.cumsum(real[i].cpu().long(), 0)[select[i]] - 1
        ids.append(torch.from_numpy(row_ids)[index])
        logprobs.append(torch.from_numpy(row_logprobs)[index])
    k = server.top_k
    ids = torch.cat(ids) if ids else torch.empty(0, k, dtype=torch.long)
    logprobs = torch.cat(logprobs) if logprobs else torch.empty(0, k)
    batch.update(zip(CACHE_COLUMNS, (ids, logprobs, torch.zeros(len(ids)))))  # lse 0: log-probs are all it gives
    return batch


def _generated_ids(choice: dict, server: TeacherServer) -> list[int]:
    if choice.get("token_ids") is not None:
        return [int(token) for token in choice["token_ids"]]
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens is None or not all(str(token).startswith("token_id:") for token in tokens):
        raise ServerError(f"The {server.label} at {server.url} gave its answer as text, not token ids; use vLLM or SGLang.")
    return [int(str(token)[len("token_id:"):]) for token in tokens]


def _message(answer) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:200]
    error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body  # OpenAI's, FastAPI's
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:300]


def _preview(ids) -> str:
    ids = list(ids or [])
    return str(ids[:8])[:-1] + (", ...]" if len(ids) > 8 else "]")


def attach_server(args, kind, data_collator, processing_class, train_dataset):
    """(the checked `TeacherServer`, the collator that adds its targets to each batch) for a causal student."""
    if kind != CAUSAL:
        raise ValueError(f"teacher_server_url works with causal LMs; this student is a {kind} model.")
    if processing_class is None:
        raise ValueError("teacher_server_url needs the processing_class (tokenizer) to check the served model's.")
    longest = None
    if train_dataset is not None and "input_ids" in getattr(train_dataset, "column_names", []):
        longest = max((len(ids) for ids in train_dataset.with_format(None)["input_ids"]), default=None)
    server = TeacherServer.from_config(args)
    server.check(processing_class, longest)
    if args.lmbda == 1 or args.seq_kd:  # every step trains on generated rows, scored once generated
        return server, data_collator
    return server, ServedTeacherCollator(data_collator, server, args.distill_all_tokens)


class LocalVLLMServer:
    """A vLLM OpenAI-compatible server started here as a subprocess, for a teacher in a local folder (tests,
    benchmarks, one-machine runs). vLLM lives in its own environment: `python` is that environment's interpreter.

        with LocalVLLMServer(".vllm-venv/bin/python", "path/to/teacher", name="teacher") as server:
            config = DistillationConfig(..., teacher_server_url=server.url, teacher_server_model="teacher")

    On one machine, `cpus` keeps the server (and its model's threads) on those cores: give the trainer the others
    (`os.sched_setaffinity`, `torch.set_num_threads`), or the two compete for the same cores.
    """

    def __init__(self, python: str, model_dir: str, name: str = "teacher", port: int | None = None,
                 max_model_len: int = 512, max_logprobs: int = 64, dtype: str = "float32", log_file: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, cpus: list[int] | None = None):
        self.python, self.model_dir, self.name = python, model_dir, name
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
                     name, "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-logprobs",
                     str(max_logprobs), "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        # vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); small models need little.
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        self.cpus = sorted(cpus) if cpus else None
        if self.cpus:
            self.env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, self.cpus))
        self.log_file = log_file
        self.process = None

    def start(self, timeout: float = 900.0) -> "LocalVLLMServer":
        import subprocess

        import requests

        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        self.process = subprocess.Popen([self.python, *self.args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        preexec_fn=pin)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"vLLM exited with code {self.process.returncode} while starting; see {self.log_file}.")
            try:
                if requests.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        self.stop()
        raise ServerError(f"vLLM did not answer at {self.url} within {timeout:g} s; see {self.log_file}.")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except Exception:
                self.process.kill()
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
