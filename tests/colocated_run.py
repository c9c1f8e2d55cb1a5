"""On-policy steps with the student's copy in a vLLM engine inside the training process (vllm_mode="colocate"), for
test_served. Run by the interpreter vLLM is installed in (hf_distill installed there too):

    .vllm-venv/bin/python tests/colocated_run.py OUTPUT_DIR

Prints one JSON line: what the engine was sent and what it computes after training, against the same model here.
"""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.runner.scratch import small_llama, train_bpe_tokenizer

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "bible_en_es.jsonl"


def model(vocab, seed):
    # head_dim 64: a size every vLLM CPU attention kernel takes
    return small_llama(vocab, hidden_size=128, num_layers=2, seed=seed, num_attention_heads=2, num_key_value_heads=2)


def logprobs_of(student, prompt, response):
    """The student's log-probability of each response token after the prompt, here."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(student(ids).logits[0].double(), -1)
    return [logprobs[len(prompt) - 1 + i, token].item() for i, token in enumerate(response)]


def main(output_dir: str) -> None:
    with open(DATA, encoding="utf-8") as handle:
        lines = [json.loads(line)["translation"]["en"] for _, line in zip(range(400), handle)]
    tokenizer = train_bpe_tokenizer(lines, vocab_size=384)
    prompts = [tokenizer(line, add_special_tokens=False)["input_ids"][:12] for line in lines[:8]]
    data = Dataset.from_dict({"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts],
                              "labels": [[-100] * len(p) for p in prompts]})
    teacher = model(len(tokenizer), seed=0)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(5.0)  # peaked, so the student has something to learn
    student = model(len(tokenizer), seed=3)
    start = {name: value.clone() for name, value in student.state_dict().items()}
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    args = DistillationConfig(output_dir=output_dir, lmbda=1.0, alpha=1.0, use_vllm=True, vllm_mode="colocate",
                              vllm_max_model_length=64, max_new_tokens=6, max_steps=3, vllm_sync_interval=2,
                              learning_rate=1e-2, per_device_train_batch_size=4, use_cpu=True, report_to=[],
                              save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    engine = trainer.responses.rollouts
    pushed, answered = [], []
    push, generate = engine.push_weights, engine.generate
    engine.push_weights = lambda model, folder, weights=None: (
        pushed.append({k: v.clone() for k, v in model.state_dict().items()}), push(model, folder, weights))
    engine.generate = lambda prompts, *a, **k: answered.append(generate(prompts, *a, **k)) or answered[-1]
    trainer.train()

    # What the engine computes now: a greedy answer and its log-probs, against the last weights sent and the start.
    params = engine._sampling(max_tokens=6, temperature=0.0, logprobs=0)
    output = engine.llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0].outputs[0]
    response = list(output.token_ids)
    engine_logprobs = [entry[token].logprob for entry, token in zip(output.logprobs, response)]
    sent, first = model(len(tokenizer), seed=0), model(len(tokenizer), seed=0)
    sent.load_state_dict(pushed[-1])
    first.load_state_dict(start)
    print(json.dumps({
        "pushes": len(pushed),
        "trained": any(not torch.equal(value, pushed[0][name]) for name, value in pushed[-1].items()),
        "answered": [len(rows) for rows in answered],
        "engine_logprobs": engine_logprobs,
        "sent_logprobs": logprobs_of(sent.eval(), prompts[0], response),
        "start_logprobs": logprobs_of(first.eval(), prompts[0], response),
        "kd_loss": [log["kd_loss"] for log in trainer.state.log_history if "kd_loss" in log],
        "threads_kept": torch.get_num_threads() == threads and os.sched_getaffinity(0) == cores,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
