"""Can a randomly initialised tiny Llama learn the demo task from scratch on 2 CPU cores?

Not a pytest test (no `test_` prefix): a plain single-process loop that prints held-out exact
match as it trains. Full fine-tuning, AdamW, the chatml template through clusterft.data (the same
encoding the training code uses), greedy HF `generate` for eval. Run from the repo root:

    .venv/bin/python tests/data/learnability_check.py --steps 1500 --lr 2e-3 --batch 64
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

from clusterft.runtime import apply_runtime_defaults

apply_runtime_defaults()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from clusterft.config.spec import DataArgs  # noqa: E402
from clusterft.data import EpochBatchSampler, build_datasets, collate, exact_match, render_prompt  # noqa: E402
from clusterft.hf.tiny import make_tiny_model  # noqa: E402


@torch.no_grad()
def evaluate(model, tokenizer, examples, template: str, max_new_tokens: int = 8) -> float:
    """Exact match of greedy answers to `examples` (one left-padded batch)."""
    model.eval()
    prompts = [render_prompt(example.prompt_messages, template, tokenizer) for example in examples]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train()
    hits = sum(
        exact_match(answer, example.reference) for answer, example in zip(answers, examples, strict=True)
    )
    return hits / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--num-eval", type=int, default=100)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model_dir = make_tiny_model(tempfile.mkdtemp(prefix="learnability-"), "llama", "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    data = DataArgs(
        dataset=["demo_tasks"],
        eval_dataset=["demo_tasks_eval"],
        dataset_dir="examples/data",
        template=args.template,
        cutoff_len=64,
    )
    splits = build_datasets(data, tokenizer, seed=args.seed)
    eval_examples = splits.eval_examples[: args.num_eval]
    mean_len = sum(len(e.input_ids) for e in splits.train) / len(splits.train)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"params={num_params} train={len(splits.train)} mean_tokens={mean_len:.1f} args={vars(args)}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        # Linear warmup, then cosine decay to 10% of the peak.
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    sampler = EpochBatchSampler(
        len(splits.train), micro_batch_size=args.batch, world_size=1, rank=0, seed=args.seed
    )
    pad_id = tokenizer.pad_token_id
    print(f"step 0 exact_match={evaluate(model, tokenizer, eval_examples, args.template):.2f}", flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        epoch, micro_step = divmod(step, sampler.micro_steps_per_epoch())
        batch = collate([splits.train[i] for i in sampler.batch(epoch, micro_step)], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            train_s = time.perf_counter() - start
            score = evaluate(model, tokenizer, eval_examples, args.template)
            print(
                f"step {step + 1} loss={loss.item():.4f} exact_match={score:.2f} train_s={train_s:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
