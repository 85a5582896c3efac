"""Which of TRL's GRPO tests the harness leaves out for a reason of its own, and the CI subset (see conftest.py)."""

HUB_ONLY = {
    "test_train_with_mask_truncated_completions":
        "its mocked generation hard-codes the Hub Qwen2.5 tokenizer's ids (pad 151643, eos 151645)",
    "test_train_with_mask_truncated_completions_all_masked":
        "assumes EOS is never sampled, true of the Hub's 151k-token vocabulary, not of a ~100-token stand-in",
}

# Representative and quick (~30 s a target): construction, a conversational run, a multi-iteration run (old
# log-probs), a KL run (reference model), a loss type that normalizes globally (dapo), and PEFT.
CI_SUBSET = (
    "test_init_minimal",
    "test_train_dataset_format[conversational_prompt_only]",
    "test_train_multiple_iterations",
    "test_train_beta_non_zero",
    "test_train_loss_types[dapo-False]",
    "test_train_peft_config",
)
