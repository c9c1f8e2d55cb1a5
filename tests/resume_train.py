"""A small distillation run for test_resume's kill tests, shared by the test (in process) and its subprocess.

    python tests/resume_train.py WORKDIR OUTPUT_DIR SLOW_FROM_STEP

WORKDIR holds `teacher/`, `student/` and `tokenizer/`. From step SLOW_FROM_STEP on, each step waits 0.5 s, so the
test can kill the process with SIGKILL while it is still training.
"""

import os
import sys
import time

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import prompt_response_dataset  # noqa: E402

from hf_distill import DistillationConfig, DistillationTrainer  # noqa: E402

MAX_STEPS, SAVE_STEPS, LOGGING_STEPS = 8, 2, 3


def make_trainer(workdir, output_dir, student=None, callbacks=None) -> DistillationTrainer:
    """Rows of 12, batch 4: 3 steps an epoch, so checkpoints fall inside epochs; logs and saves interleave."""
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
    args = DistillationConfig(
        output_dir=str(output_dir), max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
        logging_steps=LOGGING_STEPS, per_device_train_batch_size=4, learning_rate=1e-2, alpha=0.5, temperature=2.0,
        warmup_steps=2, report_to=[], disable_tqdm=True, use_cpu=True, seed=0, dataloader_pin_memory=False,
    )
    return DistillationTrainer(
        model=student or AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "student")),
        teacher_model=AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "teacher")),
        args=args,
        train_dataset=prompt_response_dataset(tokenizer, n=12),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


class SlowSteps(TrainerCallback):
    def __init__(self, from_step: int):
        self.from_step = from_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.from_step:
            time.sleep(0.5)


if __name__ == "__main__":
    workdir, output_dir, slow_from = sys.argv[1], sys.argv[2], int(sys.argv[3])
    make_trainer(workdir, output_dir, callbacks=[SlowSteps(slow_from)]).train()
