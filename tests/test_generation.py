"""The shared generation path on tiny random models: our greedy loop against transformers', continuous
batching against one-by-one decoding, and label log-likelihoods against a full forward pass."""

from __future__ import annotations

import pytest
import torch

from recipes.kit.generation import GrowingLayer, generate, label_logprobs, prompt_token_ids

PROMPTS = [
    "short",
    "a much longer prompt with many more tokens in it than the others have",
    "mid length prompt here",
    "x",
    "another prompt of some middling length for the batch",
    "the sixth",
    "seven prompts make the batches refill more than once",
]


def _hf_greedy(llm, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([prompt_token_ids(llm, prompt)])
    out = llm.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, pad_token_id=llm.tokenizer.pad_token_id,
    )  # fmt: skip
    return llm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_our_greedy_loop_matches_transformers_generate(tiny_llama):
    ours = generate(tiny_llama, PROMPTS[:3], max_new_tokens=12, batch_size=1)
    assert ours == [_hf_greedy(tiny_llama, p, 12) for p in PROMPTS[:3]]


@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_continuous_batching_gives_the_one_by_one_answers_in_order(tiny_llama, batch_size):
    single = [generate(tiny_llama, [p], max_new_tokens=10, batch_size=1)[0] for p in PROMPTS]
    assert generate(tiny_llama, PROMPTS, max_new_tokens=10, batch_size=batch_size) == single


def test_rows_finishing_at_different_steps_are_replaced_without_changing_answers(tiny_llama):
    """Make a token the random model writes mid-answer a stop token: answers end at different
    steps, finished rows leave, waiting prompts join mid-flight, and every answer is still the
    one that decoding the prompt alone gives."""
    ids = torch.tensor([prompt_token_ids(tiny_llama, PROMPTS[1])])
    with torch.no_grad():
        tokens = tiny_llama.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    config = tiny_llama.model.generation_config
    original = config.eos_token_id
    config.eos_token_id = [tiny_llama.tokenizer.eos_token_id, int(tokens[0, -1])]
    try:
        single = [generate(tiny_llama, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
        batched = generate(tiny_llama, PROMPTS, max_new_tokens=12, batch_size=3)
    finally:
        config.eos_token_id = original
    lengths = {len(tiny_llama.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in single}
    assert len(lengths) > 1, "the test needs answers of different lengths"
    assert batched == single


def _full_logprob(llm, prompt: str, answer: str) -> float:
    ids = prompt_token_ids(llm, prompt)
    answer_ids = llm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        if llm.is_seq2seq:
            decoder = [llm.model.config.decoder_start_token_id] + answer_ids[:-1]
            logits = llm.model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder])).logits[0]
            rows = range(len(answer_ids))
        else:
            logits = llm.model(input_ids=torch.tensor([ids + answer_ids])).logits[0]
            rows = range(len(ids) - 1, len(ids) - 1 + len(answer_ids))
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[r, t].item() for r, t in zip(rows, answer_ids))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_t5"])
def test_label_logprobs_equal_a_full_forward_pass(model, request):
    llm = request.getfixturevalue(model)
    labels = ['"travel"', '"style & beauty"', '"food & drink"', "[1]"]
    prompts = PROMPTS[:5]
    scores = label_logprobs(llm, prompts, labels, batch_size=2)
    expected = torch.tensor([[_full_logprob(llm, p, a) for a in labels] for p in prompts])
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=1e-4)
    assert label_logprobs(llm, prompts, labels, batch_size=3).argmax(dim=1).tolist() == expected.argmax(dim=1).tolist()


def test_a_growing_cache_layer_holds_what_concatenation_would_and_writes_steps_in_place():
    """The decoding cache keeps keys and values in buffers with spare room: each step must see
    exactly the concatenated history (through row selection and past the spare room), and an
    ordinary step must not copy the cache."""
    generator = torch.Generator().manual_seed(0)
    layer, keys, values = GrowingLayer(), None, None
    for step in range(3 * GrowingLayer.SPARE):
        width = 7 if step == 0 else 1
        new_k, new_v = (torch.randn(3 if step < 10 else 2, 2, width, 4, generator=generator) for _ in range(2))
        before = layer.keys.data_ptr() if step > 1 else None
        got_k, got_v = layer.update(new_k, new_v)
        keys = new_k if keys is None else torch.cat([keys, new_k], dim=-2)
        values = new_v if values is None else torch.cat([values, new_v], dim=-2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
        if step in (5, 40):
            assert got_k.data_ptr() == before, "an ordinary step copied the cache"
        if step == 9:  # a row leaves the batch
            layer.batch_select_indices(torch.tensor([2, 0]))
            keys, values = keys[[2, 0]], values[[2, 0]]
            assert torch.equal(layer.keys, keys)


def test_packed_linear_layers_compute_what_the_unpacked_ones_do_and_leave_the_model_trainable(tiny_llama):
    """Generation runs the linear layers with prepacked oneDNN weights on a CPU; logits at the row
    counts decoding uses must match the plain layers', nested blocks pack once, and afterwards every
    layer is the trainable module it was (a later adapt or OPPU step needs its gradient)."""
    from recipes.kit.packed_linear import packed_linears, packing_applies

    model = tiny_llama.model
    if not packing_applies(model):
        pytest.skip("this torch build has no oneDNN")
    ids = torch.tensor([prompt_token_ids(tiny_llama, p)[:3] for p in PROMPTS[:5]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with packed_linears(model, batched=True):
            with packed_linears(model, batched=True):
                assert "forward" in vars(model.lm_head)
            assert "forward" in vars(model.lm_head), "an inner block must not unpack the outer one"
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                packed = model(input_ids=ids).logits
    assert any("_linear_pointwise" in event.key for event in profile.key_averages()), "the packed path did not run"
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())
    weight = model.lm_head.weight
    weight.requires_grad_(True)
    try:
        model(input_ids=ids).logits.sum().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None


def test_generation_hands_the_kv_cache_over_by_the_name_this_transformers_release_takes(tiny_llama):
    """transformers 5.2x renamed forward's `past_key_values` to `cache` (the old name warns and is
    gone from 5.40): generation must pass the cache without a deprecation warning."""
    import warnings

    from recipes.kit.backbones import with_cache

    assert set(with_cache(tiny_llama.model, None)) <= {"cache", "past_key_values"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert generate(tiny_llama, PROMPTS[:3], max_new_tokens=4, batch_size=2) == [
            generate(tiny_llama, [p], max_new_tokens=4, batch_size=1)[0] for p in PROMPTS[:3]
        ]
