"""FastGRPOTrainer's shared-prefix update (grpo_fast/integrations/trl.py): ``_get_per_token_logps_and_entropies`` on
the packed batch (each prompt once) against the same method on TRL's padded rows — log-probs, entropies and every
parameter gradient, within the precision-aware bound against the padded path in float64 — and the group shuffle of
``_prepare_inputs`` that keeps whole groups in TRL's minibatches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import grpo_fast.integrations.trl as dropin  # noqa: E402
from grpo_fast.shared_prefix import PolicyBatch, SharedPrefixBatch  # noqa: E402
from grpo_fast.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402

V = tiny_causal_lm().config.vocab_size


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a loaded machine
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, kind="llama", peft_config=None, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                num_generations=2, max_completion_length=5, bf16=False, gradient_checkpointing=False, seed=0)
    base.update(kw)
    path = tmp_path / "model"  # TRL builds its reference model (beta > 0) from a path
    tiny_causal_lm(kind, seed=2).save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = dropin.FastGRPOTrainer(str(path), [lambda completions, **k: [0.0] * len(completions)],
                                   args=GRPOConfig(**base), train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
                                   processing_class=tiny_tokenizer(), peft_config=peft_config)
    t.model.train()
    return t


def _inputs(prompt_lens, group_sizes, L=6, seed=0):
    """TRL's ``cat(prompt_ids, completion_ids)`` for prompts of ``prompt_lens`` left-padded to P = max, each
    repeated per ``group_sizes``; completions end early (one fully masked, one full)."""
    g = torch.Generator().manual_seed(seed)
    P = max(prompt_lens)
    rows = []
    for n, G in zip(prompt_lens, group_sizes):
        prompt = torch.cat([torch.zeros(P - n, dtype=torch.long), torch.randint(3, V, (n,), generator=g)])
        rows += [prompt] * G
    prompt_ids = torch.stack(rows)  # [N, P]
    prompt_mask = (prompt_ids != 0).long()
    N = prompt_ids.size(0)
    lens = torch.randint(0, L + 1, (N,), generator=g)
    lens[0], lens[-1] = 0, L
    completion_mask = (torch.arange(L)[None] < lens[:, None]).long()  # [N, L]
    completion_ids = torch.randint(3, V, (N, L), generator=g).masked_fill(completion_mask == 0, 0)
    return torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), L


def _trl_logps(model, input_ids, attention_mask, L):
    """TRL's math in plain PyTorch (the float64 oracle): the model called on the padded rows, log-softmax of the
    logits predicting each completion token (temperature 1), and the entropy there."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -L - 1 : -1]  # [N, L, V]
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, input_ids[:, -L:, None]).squeeze(-1)  # [N, L]
    return logp, -(logp_all.exp() * logp_all).sum(-1), None


def _run(trainer, model, inputs, shared, batch_size=None, weights_seed=1):
    """Log-probs, entropies (masked) and parameter gradients of a weighted sum of both; ``shared`` toggles the
    packed forward (None: the float64 oracle); also the shapes of the embeddings' inputs (what the decoder was
    fed)."""
    input_ids, attention_mask, L = inputs
    trainer.use_shared_prefix_update = bool(shared)
    model.zero_grad(set_to_none=True)
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[:2])))
    try:
        if shared is None:
            logp, entropy, _ = _trl_logps(model, input_ids, attention_mask, L)
        else:
            logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, L, batch_size=batch_size, compute_entropy=True)
    finally:
        hook.remove()
    mask = attention_mask[:, -L:].to(logp.dtype)
    gen = torch.Generator().manual_seed(weights_seed)
    w1, w2 = torch.randn(2, *mask.shape, generator=gen, dtype=torch.float64).to(logp.dtype)
    if torch.is_grad_enabled():
        ((logp * w1 + entropy * w2) * mask).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return (logp * mask).detach(), (entropy * mask).detach(), grads, shapes


def _fp64_copy(model):
    # accelerate wraps the trainer's model.forward per instance: a deepcopy would keep calling the original
    ref = copy.deepcopy(model)
    for module in ref.modules():
        module.__dict__.pop("forward", None)
    return ref.double()


def _compare(trainer, inputs, numerics, model=None, batch_size=None, ref_model=None):
    """Shared-prefix path (fp32) against TRL's math in fp64 within 2x the error of today's padded path (fp32)."""
    model = model if model is not None else trainer.model
    ref_model = ref_model if ref_model is not None else _fp64_copy(model)
    ref = _run(trainer, ref_model, inputs, shared=None)
    plain = _run(trainer, model, inputs, shared=False, batch_size=batch_size)
    ours = _run(trainer, model, inputs, shared=True, batch_size=batch_size)
    numerics.check_2x(ours[0], ref[0], plain[0], name="logp")
    numerics.check_2x(ours[1], ref[1], plain[1], name="entropy")
    if torch.is_grad_enabled():
        scales = numerics.ulp_response_scales(ref_model, lambda: _run(trainer, ref_model, inputs, None)[2], ref[2])
        assert set(ours[2]) == set(ref[2]) == set(plain[2]) and ours[2]
        for name in ref[2]:
            numerics.check_2x(ours[2][name], ref[2][name], plain[2][name], name=name, scale=scales[name])
    return ours[3], plain[3]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_whole_groups_match_padded_path(tmp_path, kind, numerics):
    """Ragged prompts (left padding 0, 4, 2), completions ending early; the decoder sees B·P + S tokens (S: the
    completions' real tokens)."""
    trainer = _trainer(tmp_path, kind)
    inputs = _inputs([7, 3, 5], [3, 3, 3])
    ours, plain = _compare(trainer, inputs, numerics)
    N, L = 9, inputs[2]
    S = int(inputs[1][:, -L:].sum())
    assert S < N * L
    assert ours == [(1, 3 * 7 + S)], "each prompt once, no trailing padding, in one forward"
    assert plain == [(N, 7 + L)]


def test_mixed_group_sizes_and_chunks(tmp_path, numerics):
    """G = 1 groups among G = 3 (one packed forward per group size, rows put back in order) and TRL's
    ``batch_size`` chunking: chunks hold whole groups, at most batch_size rows unless one group is larger."""
    trainer = _trainer(tmp_path)
    inputs = _inputs([4, 6, 2, 5, 3], [3, 1, 3, 1, 1])
    ours, _ = _compare(trainer, inputs, numerics, batch_size=8)
    L = inputs[2]
    real = inputs[1][:, -L:].sum(1).tolist()  # each row's real completion tokens, rows in order [3, 1, 3, 1, 1]
    # chunks [3, 1, 3, 1] and [1]: in the first, the two G = 3 groups (P = 4) then the two G = 1 rows (P = 6)
    assert ours == [(1, 2 * 4 + sum(real[0:3] + real[4:7])), (1, 2 * 6 + real[3] + real[7]), (1, 3 + L)]


def test_layout_positions_follow_trl():
    """With offsets, the packed layout gives each real token the position TRL's call gives it on the left-padded
    row (no position_ids: column index). RoPE only sees position differences, so the model-level tests cannot
    see a shift; RoPE variants that read the largest position (dynamic scaling) can."""
    P, L = 5, 3
    batch = PolicyBatch([[7, 8], [4, 5, 6, 7, 8]], torch.arange(6 * L).view(6, L) % 9 + 3,
                        torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]] * 2), 3, position_offsets=[P - 2, 0])
    layout = SharedPrefixBatch.from_policy_batch(batch, pad_id=0)
    pos = layout.position_ids[0]
    assert pos[:2].tolist() == [3, 4] and pos[P : 2 * P].tolist() == [0, 1, 2, 3, 4]  # prompts: their columns
    keep = batch.completion_mask.bool()  # the layout holds the real completion tokens only
    assert torch.equal(pos[2 * P :], (P + torch.arange(L)).expand(6, L)[keep])  # completion token t at column P + t


def test_rows_without_shared_prompts_keep_the_padded_path(tmp_path, numerics):
    trainer = _trainer(tmp_path)
    inputs = _inputs([4, 6, 2], [1, 1, 1])
    ours, plain = _compare(trainer, inputs, numerics)
    assert ours == plain == [(3, 6 + inputs[2])]


def test_model_refusal_keeps_the_padded_path(tmp_path, monkeypatch, caplog):
    """A model ``can_share_prefix`` refuses runs TRL's padded rows, with the reason logged once."""
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(dropin, "can_share_prefix", lambda model, max_len: (False, "no RoPE here"))
    inputs = _inputs([5, 2], [2, 2])
    with caplog.at_level("WARNING", logger=dropin.__name__):
        shapes = [_run(trainer, trainer.model, inputs, shared=True)[3] for _ in range(2)]
    assert shapes == [[(4, 5 + inputs[2])]] * 2
    assert [r.getMessage() for r in caplog.records].count(
        "FastGRPOTrainer runs TRL's padded forward for log-probs: no RoPE here") == 1


def test_gradient_checkpointing(tmp_path, numerics):
    trainer = _trainer(tmp_path, gradient_checkpointing=True)
    assert trainer.args.activation_checkpointing
    # what transformers' Trainer.train() does with that flag (the model is ours: TRL's trainer built it)
    trainer.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs=dict(trainer.args.activation_checkpointing_kwargs or {}) or None)
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
    ours, _ = _compare(trainer, _inputs([5, 2], [3, 3]), numerics)
    assert len(ours) == 1 and ours[0][0] == 1


def test_reference_model_no_grad(tmp_path, numerics):
    """TRL's reference pass: another model, under no_grad, through the same method."""
    trainer = _trainer(tmp_path, beta=0.04)
    assert trainer.ref_model is not None
    with torch.no_grad():
        ours, _ = _compare(trainer, _inputs([5, 2], [2, 2]), numerics, model=trainer.ref_model)
    assert len(ours) == 1 and ours[0][0] == 1


def test_peft_adapters_and_adapters_disabled_reference(tmp_path, numerics):
    """LoRA inside the base model's modules (the method unwraps ``get_base_model()``): gradients of the adapters,
    and TRL's reference for PEFT without a ref model, the same call under ``disable_adapter()`` and no_grad."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(tmp_path, peft_config=lora)
    model = trainer.model
    with torch.no_grad():  # LoRA starts as the identity (B = 0): move it so the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    ref_model = _fp64_copy(model)
    inputs = _inputs([5, 2], [3, 3])
    _compare(trainer, inputs, numerics, ref_model=ref_model)
    grads = _run(trainer, model, inputs, shared=True)[2]
    assert grads and all("lora_" in name for name in grads)
    with torch.no_grad(), model.disable_adapter(), ref_model.disable_adapter():
        adapters_off = _run(trainer, model, inputs, shared=True)[0]
        ours, _ = _compare(trainer, inputs, numerics, ref_model=ref_model)
    assert ours == [(1, 2 * 5 + int(inputs[1][:, -inputs[2]:].sum()))]
    assert not torch.allclose(adapters_off, _run(trainer, model, inputs, shared=True)[0], atol=1e-3)


def test_compute_loss_uses_the_packed_forward(tmp_path, spy):
    """The policy update (``_compute_loss``) reaches the packed forward and gives TRL-shaped log-probs."""
    trainer = _trainer(tmp_path)
    calls = spy(dropin, "shared_prefix_hidden_states")
    input_ids, attention_mask, L = _inputs([5, 2], [2, 2])
    trainer.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": input_ids[:, :-L], "prompt_mask": attention_mask[:, :-L],
              "completion_ids": input_ids[:, -L:], "completion_mask": attention_mask[:, -L:],
              "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]), "num_items_in_batch": attention_mask[:, -L:].sum()}
    trainer._compute_loss(trainer.model, inputs).backward()
    assert len(calls) == 1


def test_position_offsets_validation():
    with pytest.raises(ValueError, match="position_offsets has 1 entries; expected one per prompt"):
        PolicyBatch([[3], [4]], torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2), 1, position_offsets=[0])


def test_runs_and_chunks():
    ids = torch.tensor([[0, 5], [9, 5], [0, 6], [0, 6], [0, 6], [7, 6]])
    mask = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1], [1, 1], [1, 1]])
    assert dropin.prompt_runs(ids, mask) == [2, 3, 1]  # pad tokens under the mask do not split a run
    assert dropin.chunk_runs([2, 3, 1], 4) == [[2], [3, 1]]
    assert dropin.chunk_runs([5, 1], 4) == [[5], [1]]


def _buffered(trainer, monkeypatch, seed):
    """``_prepare_inputs`` over one generation batch of 4 groups (row value = group index)."""
    n = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    G = trainer.num_generations
    group = torch.arange(n) // G
    batch = {"prompt_ids": group[:, None].repeat(1, 3), "advantages": torch.randn(n), "num_items_in_batch":
             torch.tensor(n), "tags": [f"g{int(i)}" for i in group]}
    monkeypatch.setattr(trainer, "_generate_and_score_completions", lambda inputs: batch)
    torch.manual_seed(seed)
    trainer._step, trainer._buffered_inputs = 0, None
    out = []
    for step in range(trainer.args.steps_per_generation):
        trainer._step = step
        out.append(trainer._prepare_inputs(None))
    return out, G


def test_minibatches_hold_whole_groups_and_are_seeded(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, per_device_train_batch_size=4, num_generations=2, steps_per_generation=2)
    minibatches, G = _buffered(trainer, monkeypatch, seed=0)
    assert len(minibatches) == 2
    seen = []
    for mb in minibatches:
        groups = mb["prompt_ids"][:, 0].view(-1, G)  # [B, G]
        assert (groups == groups[:, :1]).all(), f"a minibatch splits a group: {mb['prompt_ids'][:, 0].tolist()}"
        assert mb["tags"] == [f"g{int(i)}" for i in mb["prompt_ids"][:, 0]]  # lists follow the tensors
        assert mb["num_items_in_batch"].ndim == 0
        seen += mb["prompt_ids"][:, 0].tolist()
    assert sorted(seen) == [0, 0, 1, 1, 2, 2, 3, 3]
    orders = {tuple(torch.cat([mb["prompt_ids"][:, 0] for mb in _buffered(trainer, monkeypatch, s)[0]]).tolist())
              for s in (0, 0, 1, 2, 3, 4)}
    first = tuple(seen)
    assert first in orders and len(orders) > 1, "seeded: the same seed repeats the order, others change it"
    again = torch.cat([mb["prompt_ids"][:, 0] for mb in _buffered(trainer, monkeypatch, 0)[0]])
    assert tuple(again.tolist()) == first


def test_row_shuffle_when_minibatches_cannot_hold_whole_groups(tmp_path, monkeypatch, spy):
    """per_device_train_batch_size = 3 with G = 2: TRL's own row shuffle (and so the padded forward where rows
    split groups); use_shared_prefix_update = False also keeps TRL's shuffle."""
    import trl.trainer.grpo_trainer as trl_grpo

    trainer = _trainer(tmp_path, per_device_train_batch_size=3, num_generations=2, steps_per_generation=2)
    calls = spy(trl_grpo, "shuffle_sequence_dict")
    _buffered(trainer, monkeypatch, seed=0)
    assert len(calls) == 1
    trainer = _trainer(tmp_path, per_device_train_batch_size=4, num_generations=2, steps_per_generation=2)
    trainer.use_shared_prefix_update = False
    _buffered(trainer, monkeypatch, seed=0)
    assert len(calls) == 2
