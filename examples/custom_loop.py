"""GRPO in a hand-written loop from grpo_fast's public ops — no GRPOTrainer.

What a larger stack (verl, OpenRLHF, your own) embeds: the shared-prefix sampler for rollouts,
``group_advantages`` for the group-relative baseline, and ``linear_grpo_loss`` on the policy's final hidden states
(the LM head's ``[T, V]`` logits never exist). Runs on the CPU in a few seconds with a tiny random model; pass
``--model smollm2`` for the embedded SmolLM2-135M-Instruct.

Simplifications: on-policy (one optimizer step per rollout, so old log-probs are None), beta = 0, no gradient
accumulation; each completion carries its own copy of the prompt in the update (see grpo_fast.shared_prefix for
the shared-prefix update).

    python examples/custom_loop.py [--steps 20] [--model tiny|smollm2]

How a verl / OpenRLHF actor calls the same ops: where the actor computes ``logits = lm_head(hidden)`` and then
``log_softmax``/gather and its policy loss, call instead
``linear_grpo_loss(hidden[mask_positions], lm_head.weight, targets, old_logp, ref_logp, advantages, mask,
completion_shape=(N, L), loss_type=..., epsilon=..., beta=..., num_items_in_batch=global_token_count)`` — hidden
is the last decoder layer's normed output (``model.model(...).last_hidden_state``), shifted by one so position t
predicts token t + 1; ``num_items_in_batch`` is the token count summed over ranks, as the loss normalizer of
dapo/cispo/vespo requires. Rollout engines keep their own sampler; ``group_advantages`` replaces the advantage code.
"""

from __future__ import annotations

import argparse

import torch

from grpo_fast.ops import SharedPrefixSampler, group_advantages, linear_grpo_loss


def digit_reward(completions: list[str]) -> list[float]:
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="tiny")
    p.add_argument("--group_size", type=int, default=8)
    args = p.parse_args()
    if args.model == "tiny":
        from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer

        model, tokenizer = tiny_causal_lm(seed=1), tiny_tokenizer()
    else:
        from grpo_fast.models import load_model

        model, tokenizer = load_model(args.model)
    prompts = [tokenizer("3+4=", add_special_tokens=False)["input_ids"]]
    sampler = SharedPrefixSampler(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    G = args.group_size
    for step in range(args.steps):
        out = sampler.generate(prompts, group_size=G, max_new_tokens=2, temperature=1.0, seed=step)  # N = B·G
        rewards = torch.tensor(digit_reward(out.texts))  # [N]
        advantages, stats = group_advantages(rewards, G)  # [N]

        prompt = torch.tensor(prompts[0]).repeat(G, 1)  # [N, P]
        input_ids = torch.cat([prompt, out.completion_ids], 1)  # [N, P + L]
        n, L = out.completion_ids.shape
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state[:, prompt.shape[1] - 1 : -1]  # [N, L, D]
        targets = out.completion_ids.masked_fill(out.completion_mask == 0, -100)  # [N, L]
        loss, metrics = linear_grpo_loss(
            hidden.reshape(n * L, -1), model.get_output_embeddings().weight, targets.reshape(-1),
            None, None, advantages, out.completion_mask, completion_shape=(n, L), loss_type="dapo",
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step:3d}  reward {rewards.mean():.3f}  loss {loss.item():+.4f}")


if __name__ == "__main__":
    main()
