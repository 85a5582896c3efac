"""group_advantages: Triton (interpreter) and torch paths against the fp64 reference and against TRL 1.16's own
``GRPOTrainer._generate_and_score_completions``, run unbound on a stand-in trainer whose generation and reward
functions return fixed rewards (so the advantages and metrics come from TRL's code, not a transcription of it)."""

from __future__ import annotations

import collections
import types

import pytest
import torch

from grpo_fast.kernels.advantages import group_advantages, group_advantages_ref

NAN, INF = float("nan"), float("inf")
AGGS = ("sum_then_normalize", "normalize_then_sum")
SCALES = ("group", "batch", "none")
BACKENDS = ("torch", "triton")


def _rewards(N, R, seed=0, holes=True, dtype=torch.float32):
    """Random rewards with None (NaN) holes: a partly scored row, a fully unscored row, a tie, a discrete column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, R, generator=g, dtype=torch.float64)
    if R > 1:
        x[:, -1] = (x[:, -1] > 0.5).double()
    if holes and N >= 4:
        x[1, 0] = NAN
        x[3] = NAN
        if N > 5:
            x[5] = x[4]
    return x.to(dtype)


def _check_stats(stats, ref_stats, atol):
    for key, ref in ref_stats.items():
        ours = getattr(stats, key)
        torch.testing.assert_close(ours.double(), ref.double(), atol=atol, rtol=1e-5, equal_nan=True, msg=key)


CASES = [  # (N, R, G, weights)
    pytest.param(16, 1, 4, None, id="R1-G4"),
    pytest.param(12, 3, 4, [1.0, 0.5, 2.0], id="R3-G4-weighted"),
    pytest.param(21, 2, 7, [1.0, -1.0], id="R2-G7-odd"),
    pytest.param(6, 2, 1, None, id="G1"),
    pytest.param(8, 2, 8, [0.3, 0.7], id="one-group"),
    pytest.param(192, 2, 64, None, id="G64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("N,R,G,weights", CASES)
def test_matches_ref(backend, agg, scale, N, R, G, weights, force_backend, poison, assert_close_2x):
    force_backend(backend)
    x = _rewards(N, R)
    adv, stats = group_advantages(x, G, weights, scale, agg)
    ref, ref_stats = group_advantages_ref(x, G, weights, scale, agg)
    plain, _ = group_advantages_ref(x, G, weights, scale, agg, dtype=torch.float32)
    assert adv.dtype == torch.float32 and adv.shape == (N,)
    assert_close_2x(adv, ref, plain, name=f"{backend}/{agg}/{scale}")
    _check_stats(stats, ref_stats, atol=1e-5)
    assert stats.num_unscorable.item() == ref_stats["num_unscorable"].item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_rloo_matches_ref(backend, scale, force_backend, poison, assert_close_2x):
    force_backend(backend)
    x = _rewards(20, 2, seed=3)
    adv, stats = group_advantages(x, 5, [1.0, 2.0], scale, estimator="rloo")
    ref, ref_stats = group_advantages_ref(x, 5, [1.0, 2.0], scale, estimator="rloo")
    plain, _ = group_advantages_ref(x, 5, [1.0, 2.0], scale, estimator="rloo", dtype=torch.float32)
    assert_close_2x(adv, ref, plain, name=f"rloo/{scale}")
    _check_stats(stats, ref_stats, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rloo_known_answer(backend, force_backend):
    force_backend(backend)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, NAN, NAN, NAN])  # group 2: a single scorable member
    adv, _ = group_advantages(x, 4, scale="none", estimator="rloo")
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.35], ids=["zero", "one", "non-dyadic"])
@pytest.mark.parametrize("agg,scale", [("sum_then_normalize", "group"), ("sum_then_normalize", "batch"),
                                       ("normalize_then_sum", "group")])  # fmt: skip
def test_all_equal_rewards_give_exact_zero(backend, value, agg, scale, force_backend, poison):
    force_backend(backend)
    x = torch.full((12, 2), value)
    adv, stats = group_advantages(x, 4, [0.7, 0.3], scale, agg)
    assert torch.equal(adv, torch.zeros(12)), adv
    assert stats.frac_reward_zero_std.item() == 1.0
    assert stats.num_unscorable.item() == 0
    if agg == "sum_then_normalize":
        rloo, _ = group_advantages(x, 4, [0.7, 0.3], scale, estimator="rloo")
        assert torch.equal(rloo, torch.zeros(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_equal_non_dyadic(backend, force_backend, assert_close_2x):
    """std ≈ 1e-7 against eps = 1e-4: rounding of r - mean is amplified 1e4 times; stay within 2x of plain fp32."""
    force_backend(backend)
    x = (0.35 + 1e-7 * (torch.arange(16, dtype=torch.float64) % 3)).float()
    adv, stats = group_advantages(x, 4)
    ref, _ = group_advantages_ref(x, 4)
    plain, _ = group_advantages_ref(x, 4, dtype=torch.float32)
    assert_close_2x(adv, ref, plain, name="near-equal")
    assert stats.frac_reward_zero_std.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_inf_is_unscored(backend, agg, force_backend):
    """Deviation from TRL (documented): ±inf rewards count as None, exactly like NaN."""
    force_backend(backend)
    x = _rewards(12, 2, seed=1)
    with_inf, with_nan = x.clone(), x.clone()
    with_inf[0, 0], with_inf[7] = INF, torch.tensor([-INF, INF])
    with_nan[0, 0], with_nan[7] = NAN, NAN
    a_inf, s_inf = group_advantages(with_inf, 4, multi_objective_aggregation=agg)
    a_nan, s_nan = group_advantages(with_nan, 4, multi_objective_aggregation=agg)
    assert torch.isfinite(a_inf).all()
    torch.testing.assert_close(a_inf, a_nan, rtol=0, atol=0)
    torch.testing.assert_close(s_inf.reward_mean_per_func, s_nan.reward_mean_per_func, rtol=0, atol=0)
    assert a_inf[3].item() == 0.0 and a_inf[7].item() == 0.0  # rows 3 and 7 are unscorable
    assert s_inf.num_unscorable.item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_unscorable_rows_and_groups(backend, scale, force_backend, poison):
    force_backend(backend)
    x = torch.tensor([[1.0, NAN], [0.0, NAN], [NAN, NAN], [1.0, 1.0],  # one unscorable member
                      [NAN, NAN], [NAN, NAN], [NAN, NAN], [NAN, NAN],  # whole group unscorable
                      [NAN, 0.5], [NAN, NAN], [NAN, NAN], [NAN, NAN]])  # fmt: skip  # one scorable member
    adv, stats = group_advantages(x, 4, scale=scale)
    ref, ref_stats = group_advantages_ref(x, 4, scale=scale)
    assert torch.isfinite(adv).all()
    assert (adv[[2, 4, 5, 6, 7, 8, 9, 10, 11]] == 0).all()
    torch.testing.assert_close(adv.double(), ref, atol=1e-5, rtol=1e-5)
    _check_stats(stats, ref_stats, atol=1e-6)
    assert stats.num_unscorable.item() == 8
    assert torch.isnan(stats.group_mean[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_size_one(backend, force_backend):
    force_backend(backend)
    x = torch.tensor([0.2, 0.9, NAN, 3.0])
    adv, stats = group_advantages(x, 1)
    assert torch.equal(adv, torch.zeros(4))
    assert stats.frac_reward_zero_std.item() == 1.0
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(x, 1, estimator="rloo")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_and_strides(backend, force_backend, assert_close_2x):
    force_backend(backend)
    x = _rewards(16, 3, seed=2, dtype=torch.float64)
    wide = torch.zeros(3, 40, dtype=torch.float64)
    wide[:, 0:32:2] = x.T
    strided = wide[:, 0:32:2].T  # [16, 3], strides (2, 40)
    assert not strided.is_contiguous()
    ref, _ = group_advantages_ref(x, 4)
    plain, _ = group_advantages_ref(x, 4, dtype=torch.float32)
    assert_close_2x(group_advantages(strided, 4)[0], ref, plain, name="strided")
    for dtype in (torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        ref_d, _ = group_advantages_ref(xd, 4)
        plain_d, _ = group_advantages_ref(xd, 4, dtype=torch.float32)
        assert_close_2x(group_advantages(xd, 4)[0], ref_d, plain_d, name=str(dtype))


def test_validation_messages():
    x = torch.rand(10, 2)
    with pytest.raises(ValueError, match="N=10.*group_size=4"):
        group_advantages(x, 4)
    with pytest.raises(ValueError, match="weights has 3 entries.*R=2"):
        group_advantages(x, 5, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(x, 5, scale="global")
    with pytest.raises(ValueError, match="multi_objective_aggregation must be one of"):
        group_advantages(x, 5, multi_objective_aggregation="mean")
    with pytest.raises(ValueError, match="estimator must be one of"):
        group_advantages(x, 5, estimator="ppo")
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(x, 5, multi_objective_aggregation="normalize_then_sum", estimator="rloo")
    with pytest.raises(ValueError, match="floating-point"):
        group_advantages(torch.ones(4, dtype=torch.long), 2)
    assert group_advantages(x, 5, scale=True)[0].shape == (10,)  # TRL's bool spelling of scale_rewards


def test_stats_dict_access():
    _, stats = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, NAN]]), 2)
    assert stats["reward"] is stats.reward and stats["reward_mean"] is stats.reward_mean_per_func
    torch.testing.assert_close(stats["reward_mean"], torch.tensor([0.75, 1 / 3]))
    assert stats.metrics(["a", "b"])["rewards/b/mean"] == pytest.approx(1 / 3)
    with pytest.raises(KeyError, match="keys"):
        stats["nope"]


# ---- parity with TRL's own code ----


def _trl_advantages(rewards: torch.Tensor, G: int, weights, scale: str, agg: str, trainer: str = "GRPOTrainer"):
    """Run ``<trainer>._generate_and_score_completions`` unbound on a stand-in trainer. Generation and log-probs are
    mocked; the real ``_calculate_rewards`` calls R reward functions returning the columns of ``rewards``
    (NaN → None). For RLOOTrainer, ``scale`` "batch" means ``normalize_advantages=True``."""
    trl = pytest.importorskip("trl")
    import importlib

    N, R = rewards.shape
    cls = getattr(trl, trainer)
    module = importlib.import_module(cls.__module__)

    def make(i):
        def func(prompts, completions, **kwargs):
            return [None if v != v else v for v in rewards[:, i].tolist()]

        func.__name__ = f"f{i}"
        return func

    def generate(prompts):
        ids = ([[1, 2]] * N, [[3, 4, 5]] * N)
        return (*ids, ["c"] * N) if trainer == "RLOOTrainer" else (*ids, None, ["c"] * N, None, {}, None, None)

    s = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), process_index=0, is_main_process=True,
                                          gather=lambda t: t, unwrap_model=lambda m: m),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        args=types.SimpleNamespace(steps_per_generation=1, gradient_accumulation_steps=1, report_to=[],
                                   per_device_train_batch_size=N, gradient_checkpointing_kwargs=None),
        environment_factories=None, tools=None, environments=None, num_iterations=1, use_vllm=False, beta=0.0,
        pad_to_multiple_of=None, mask_truncated_completions=False, _tokenizer=types.SimpleNamespace(pad_token_id=0),
        _generate=generate, _get_per_token_logps_and_entropies=lambda *a, **k: (torch.zeros(N, 3), None, None),
        reward_funcs=[make(i) for i in range(R)], reward_processing_classes=[None] * R,
        reward_func_names=[f"f{i}" for i in range(R)], state=types.SimpleNamespace(global_step=0),
        _log_completion_extra=lambda *a: None, _log_metric=lambda *a: None, num_generations=G,
        multi_objective_aggregation=agg, scale_rewards=scale, log_multimodal=False, chat_template_kwargs={},
        reward_clip_range=None, normalize_advantages=scale == "batch", eos_token_ids=[0],
        reward_weights=torch.tensor(weights, dtype=torch.float32) if weights is not None else torch.ones(R),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _logs={"prompt": [], "completion": [], "rewards": collections.defaultdict(list), "advantages": [],
               "extra": collections.defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={},
    )  # fmt: skip
    s._calculate_rewards = types.MethodType(cls._calculate_rewards, s)
    with pytest.MonkeyPatch.context() as mp:
        # TRL warns about all-None rows through accelerate's logger, which needs a global PartialState: mute it
        # rather than create process-wide distributed state inside the test session.
        mp.setattr(module.logger, "warning", lambda *a, **k: None)
        out = cls._generate_and_score_completions(s, [{"prompt": "p"} for _ in range(N)])
    return out["advantages"], {k: v[-1] for k, v in s._metrics["train"].items()}


TRL_CASES = [  # (N, R, G, weights)
    pytest.param(12, 3, 4, [1.0, 0.5, 2.0], id="R3-G4"),
    pytest.param(10, 1, 5, None, id="R1-G5"),
    pytest.param(4, 2, 1, [1.0, 1.0], id="G1"),
]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("N,R,G,weights", TRL_CASES)
def test_parity_with_trl(agg, scale, N, R, G, weights):
    x = _rewards(N, R, seed=N + R)
    if G == 1:
        x[1] = NAN
    trl_adv, trl_metrics = _trl_advantages(x, G, weights, scale, agg)
    for backend in BACKENDS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GRPO_FAST_BACKEND", backend)
            adv, stats = group_advantages(x, G, weights, scale, agg)
        # TRL computes in fp32 with a different summation order; both are within fp32 rounding of fp64.
        torch.testing.assert_close(adv, trl_adv, atol=2e-6, rtol=2e-5, msg=f"{backend} advantages")
        ours = stats.metrics([f"f{i}" for i in range(R)])
        for key, value in trl_metrics.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), f"{backend} {key}"


def test_parity_with_trl_degenerate():
    """All-equal groups and unscorable rows through TRL: frac_reward_zero_std and zeros agree."""
    x = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, NAN], [1.0, NAN], [NAN, NAN], [0.0, 1.0]])
    for scale in SCALES:
        trl_adv, trl_metrics = _trl_advantages(x, 4, None, scale, "sum_then_normalize")
        adv, stats = group_advantages(x, 4, None, scale)
        torch.testing.assert_close(adv, trl_adv, atol=2e-6, rtol=2e-5)
        ours = stats.metrics(["f0", "f1"])
        for key, value in trl_metrics.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), f"{scale} {key}"


@pytest.mark.parametrize("scale", ["none", "batch"], ids=["default", "normalize_advantages"])
def test_rloo_parity_with_trl(scale):
    x = _rewards(20, 2, seed=5)
    x[10] = NAN  # group 2 keeps four scorable members
    x[16:19] = NAN  # group 3 has a single scorable member: no baseline
    trl_adv, trl_metrics = _trl_advantages(x, 5, [1.0, 0.5], scale, "sum_then_normalize", trainer="RLOOTrainer")
    for backend in BACKENDS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GRPO_FAST_BACKEND", backend)
            adv, stats = group_advantages(x, 5, [1.0, 0.5], scale, estimator="rloo")
        torch.testing.assert_close(adv, trl_adv, atol=2e-6, rtol=2e-5, msg=f"{backend} advantages")
        ours = stats.metrics(["f0", "f1"])
        for key, value in trl_metrics.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), f"{backend} {key}"
